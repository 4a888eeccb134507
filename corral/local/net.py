"""Local mode's network, host side (docs/local.md): corral's egress proxy on a unix socket.

The jail runs the command in a new network namespace whose only interface is ``lo``, so nothing
it starts has a route anywhere. ``wrap`` makes the in-sandbox relay (``corral.local.relay``) the
first process: it listens on ``127.0.0.1:3128`` and carries each connection to
``<socket_dir>/proxy.sock``, which the jail binds at ``SANDBOX_NET_DIR``. Behind that socket is
the same ``EgressProxy`` server sandboxes use, in explicit mode (``CONNECT host:port`` and
absolute-form ``http://`` requests), with a policy allowing exactly the allowed domains; it
resolves names itself, refuses IP literals, private and host addresses, and emits an
``EgressEvent`` for every connection, allowed or not.

Enforcement is the namespace, not the environment: ``sandbox_env`` only tells proxy-aware
programs where the relay is. A program that ignores it has no route; one that resolves names
gets no answer (there is no DNS inside the sandbox, see ``corral.local.relay``), so no query
for any name, allowed or not, ever leaves through the sandbox.

Allowed domains are names or ``*.suffix`` patterns, as in server policies (a wildcard does not
cover the bare suffix), each on ports 80 and 443 unless written ``name:PORT``, which allows that
port (repeat the name for several).

**Secrets** (docs/local.md, "Secrets"): the settings' ``secrets`` bind a variable of the invoking
user's environment to hosts. The value stays in this process (the ``environ`` the run was started
with); the command gets a random placeholder in the variable instead, and the proxy, as for
server sandboxes (``corral.net.intercept``), terminates TLS toward the bound hosts with a CA made
for this run (its key only in this process's memory, name-constrained to those hosts), verifies
the real server against the host's trust store, and swaps the placeholder for the value on the
wire. The bindings are checked as the server checks them (``corral.core.bindings``): DNS names
only, each allowed on port 443. The CA certificate reaches the sandbox through ``socket_dir``:
``ca.pem`` (the CA alone, for ``NODE_EXTRA_CA_CERTS``) and ``ca-bundle.pem`` (the host's system
bundle plus the CA), which ``ro_files`` also binds over the system bundle paths the host has, so
that programs ignoring the variables trust it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import secrets
import shutil
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from corral.errors import InvalidRequestError, NotFoundError, RuntimeFailure
from corral.local.interpreter import interpreter
from corral.local.relay import PORT, SOCKET_NAME
from corral.net.dns import Upstream, upstreams_from_resolv_conf
from corral.net.policy import (
    AddressGuard,
    CompiledPolicy,
    NetworkPolicy,
    Rule,
    compile_policy,
    domain_pattern,
)
from corral.net.proxy import EgressProxy
from corral.net.view import EgressEvent, NetRegistry, SandboxNet, SandboxSecrets

if TYPE_CHECKING:
    from corral.local.settings import SecretSpec

__all__ = [
    "CA_BUNDLE_NAME",
    "CA_NAME",
    "DEFAULT_PORTS",
    "NO_PROXY",
    "PROXY_URL",
    "RELAY_NAME",
    "SANDBOX_ID",
    "SANDBOX_NET_DIR",
    "LocalNetwork",
    "local_policy",
]

SANDBOX_NET_DIR = "/run/corral-net"
SANDBOX_ID = "local"
DEFAULT_PORTS = (80, 443)
PROXY_URL = f"http://127.0.0.1:{PORT}"
# The sandbox's own loopback (the relay, and servers the command starts itself) is not proxied:
# it never leaves the namespace, and through the proxy it would mean the host's loopback.
NO_PROXY = "localhost,127.0.0.1,::1"
RELAY = Path(__file__).resolve().with_name("relay.py")
# Copied next to the socket: the sandbox's user may not be able to read corral's own copy
# (installed under /root, say, when root runs the command as the invoking user).
RELAY_NAME = "relay.py"
_MAX_DOMAINS = 64  # NetworkPolicy's own limit on rules
# sockaddr_un.sun_path is 108 bytes, the final NUL included.
_SUN_PATH = 107
# Next to the socket, when secrets are bound: the run's CA alone, and the host's roots plus it.
CA_NAME = "ca.pem"
CA_BUNDLE_NAME = "ca-bundle.pem"
# Where a system bundle bound over by ro_files may lie: not in the places the jail makes fresh.
_BUNDLE_ROOTS = ("/etc/", "/usr/")


def _parse_entry(raw: str) -> tuple[str, int | None]:
    """(pattern, port) from ``name``, ``*.suffix`` or either with ``:PORT``."""
    text = raw.strip()
    port: int | None = None
    name, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and name and ":" not in name:
        port = int(tail)
        if not 0 < port < 65536:
            raise InvalidRequestError(f"allowed domain {raw!r}: port {port} is outside 1-65535")
        text = name
    try:
        return domain_pattern(text), port
    except ValueError as exc:
        raise InvalidRequestError(f"allowed domain {raw!r}: {exc}") from None


def local_policy(allow_domains: Sequence[str]) -> NetworkPolicy:
    """The policy allowing exactly ``allow_domains`` (see the module docstring for the forms);
    InvalidRequestError names the entry that is not a domain."""
    ports: dict[str, set[int]] = {}
    for raw in allow_domains:
        pattern, port = _parse_entry(raw)
        ports.setdefault(pattern, set()).update(DEFAULT_PORTS if port is None else (port,))
    if len(ports) > _MAX_DOMAINS:
        raise InvalidRequestError(f"at most {_MAX_DOMAINS} allowed domains (got {len(ports)})")
    rules = [Rule(domain=pattern, ports=sorted(p)) for pattern, p in ports.items()]
    return NetworkPolicy(allow=rules)


class LocalNetwork:
    """The host side of one local sandbox's network: see the module docstring.

    ``run_dir`` holds ``socket_dir`` (a fresh ``net-*`` directory, mode 0700, removed by
    ``stop``); it is made (0700) if missing. ``owner`` (uid, gid) owns what is made, the socket
    included, when the sandboxed command runs as another user than this process (only root can
    give files away); by default this process's.
    ``dns_upstreams`` are the resolvers the proxy asks (default: the host's resolv.conf).
    """

    def __init__(
        self,
        allow_domains: Sequence[str],
        run_dir: Path,
        *,
        dns_upstreams: Sequence[tuple[str, int]] | None = None,
        on_event: Callable[[EgressEvent], None] | None = None,
        owner: tuple[int, int] | None = None,
        secrets: Sequence[SecretSpec] = (),
        environ: Mapping[str, str] | None = None,
        upstream_ca_file: Path | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        # Compiled now: a bad domain fails before anything is started.
        self.policy: CompiledPolicy = compile_policy(local_policy(allow_domains), AddressGuard())
        self._run_dir = Path(run_dir)
        self._upstreams = None if dns_upstreams is None else list(dns_upstreams)
        self._on_event = on_event
        self._owner = owner
        self._python = interpreter(owner)
        self._dir: Path | None = None
        self._dir_fd: int | None = None
        self._proxy: EgressProxy | None = None
        self._upstream: Upstream | None = None
        # Secrets: the bindings whose variable is set, with the values taken now from the run's
        # environment and kept in this process only. Every binding's hosts are checked, set or
        # not: a wrong one fails every run alike.
        for spec in secrets:
            _check_reachable(self.policy, spec)
        source = os.environ if environ is None else environ
        self._values: dict[str, str] = {}
        for spec in secrets:
            value = source.get(spec.env, "")
            if value:
                self._values[spec.env] = value
            elif note is not None:
                note(f"secret {spec.env}: not set in the environment, not bound")
        self._specs = tuple(s for s in secrets if s.env in self._values)
        self._upstream_ca_file = upstream_ca_file
        self._secrets: SandboxSecrets | None = None
        self._secret_env: dict[str, str] = {}
        self._ca_pem: bytes | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def socket_dir(self) -> Path:
        """The host directory holding ``proxy.sock`` and ``relay.py``; the jail binds it at
        SANDBOX_NET_DIR (read-only is enough: connecting to a socket writes nothing).

        When ``<socket_dir>/proxy.sock`` is longer than a socket address can be, the socket is
        bound through ``/proc/self/fd/N/`` (our descriptor of the directory), and that is the
        name /proc/net/unix shows for it.
        """
        if self._dir is None:
            raise RuntimeError("LocalNetwork is not started")
        return self._dir

    async def start(self) -> None:
        """Check the secret bindings (InvalidRequestError before anything is made), then make
        ``socket_dir`` and listen on its socket."""
        if self._proxy is not None:
            return
        store = await self._bind_secrets() if self._specs else None
        servers = self._upstreams if self._upstreams is not None else upstreams_from_resolv_conf()
        if not servers:
            raise RuntimeFailure(
                "no DNS server to resolve allowed domains with: /etc/resolv.conf names none"
            )
        upstream_tls = self._upstream_context() if self._secrets is not None else None
        upstream = Upstream(servers)
        registry = NetRegistry()
        # The address is never looked up: the unix listener names the sandbox itself.
        registry.add(
            SandboxNet(
                SANDBOX_ID,
                SANDBOX_ID,
                ipaddress.IPv4Address("0.0.0.0"),
                self.policy,
                secrets=self._secrets,
            )
        )
        proxy = EgressProxy(
            registry,
            upstream.resolve,
            self._emit,
            host=None,
            port=0,
            secret_values=store.values if store is not None else None,
            upstream_tls=upstream_tls,
        )
        directory = self._make_dir()
        try:
            relay = directory / RELAY_NAME
            shutil.copyfile(RELAY, relay)
            os.chmod(relay, 0o644)
            made = [relay]
            if self._ca_pem is not None:
                made += self._write_ca(directory, self._ca_pem)
            await proxy.listen_unix(self._bind_path(directory), SANDBOX_ID)
            if self._owner is not None:
                for path in (*made, directory / SOCKET_NAME):
                    os.chown(path, *self._owner)
        except BaseException:
            await proxy.stop()
            await upstream.close()
            self._remove_dir()
            raise
        self._upstream, self._proxy = upstream, proxy

    async def stop(self) -> None:
        """Close the proxy (live connections are cut) and remove ``socket_dir``; idempotent."""
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            await proxy.stop()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.close()
        self._remove_dir()

    async def __aenter__(self) -> LocalNetwork:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ the sandbox's side

    def sandbox_env(self) -> dict[str, str]:
        """Variables pointing proxy-aware programs at the relay (a convenience, not the fence).

        Both spellings of the usual ones (curl, git, pip/requests, httpx, Go, Rust), ALL_PROXY
        (HTTP, not SOCKS: clients such as httpx fail on a socks URL without extra packages),
        GRPC_PROXY (gRPC's C core and grpc-js, CONNECT only), NODE_USE_ENV_PROXY (Node's own
        http, https and fetch honour the variables with it, from Node 22.21/24.5) and
        GLOBAL_AGENT_* (the global-agent package some Node programs bootstrap).
        """
        env = {
            name: PROXY_URL
            for name in (
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "ALL_PROXY",
                "GRPC_PROXY",
                "GLOBAL_AGENT_HTTP_PROXY",
                "GLOBAL_AGENT_HTTPS_PROXY",
            )
        }
        env |= {name.lower(): PROXY_URL for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
        env["grpc_proxy"] = PROXY_URL
        env |= {"NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY, "GLOBAL_AGENT_NO_PROXY": NO_PROXY}
        env["NODE_USE_ENV_PROXY"] = "1"
        # With secrets: their placeholders and the variables that make programs trust the run's
        # CA (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS).
        env |= self._secret_env
        return env

    @property
    def placeholders(self) -> dict[str, str]:
        """The placeholder of each bound variable (not secret: the sandbox holds them)."""
        if self._secrets is None:
            return {}
        return {b.name: b.placeholder for b in self._secrets.bindings}

    def ro_files(self) -> list[tuple[Path, str]]:
        """Host files the jail binds read-only into the sandbox: with secrets, the bundle that
        trusts the run's CA over each system bundle the host has (each real file once)."""
        if self._secrets is None or self._dir is None:
            return []
        bundle = self._dir / CA_BUNDLE_NAME
        return [(bundle, path) for path in _system_bundles()]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` behind the relay: the relay starts, then execs ``argv`` in its place.

        The relay is the copy in SANDBOX_NET_DIR, run as a script in isolated mode without
        site (-I -S): only the standard library is needed, it starts in a few milliseconds, and
        no ``corral`` directory in the project (the working directory) or PYTHONPATH can stand
        in for it. The interpreter is this one, unless ``owner`` cannot reach it.
        """
        if not argv:
            raise InvalidRequestError("no command to run")
        relay = f"{SANDBOX_NET_DIR}/{RELAY_NAME}"
        return [self._python, "-I", "-S", relay, "--dir", SANDBOX_NET_DIR, "--", *argv]

    # ------------------------------------------------------------------ secrets

    async def _bind_secrets(self) -> _EnvironStore:
        """Check the bindings whose variable is set as the server does and bind them: their
        placeholders, the run's CA, what the proxy needs. The store that answers the values."""
        # Here, not at the top: the server's binding code and the CA's cryptography are needed
        # only by runs with secrets.
        from pydantic import ValidationError

        from corral.core.bindings import CA_BUNDLE, CA_CERT, SecretBinder
        from corral.core.commands import SecretBinding

        for env, value in self._values.items():
            _check_value(env, value)
        store = _EnvironStore(self._values)
        # The store stands in for the server's secret service: SecretBinder asks it only
        # whether secrets exist, for a key to derive the CA's from, and for values.
        binder = SecretBinder(store)  # type: ignore[arg-type]

        try:
            given = [
                SecretBinding(
                    name=s.env, hosts=list(s.hosts), env=s.env, header=s.header, format=s.format
                )
                for s in self._specs
            ]
        except ValidationError as exc:
            raise InvalidRequestError(f"secret binding: {exc}") from None
        # The server's checks (hosts, variable names), placeholders and CA.
        state = await binder.prepare(SANDBOX_ID, SANDBOX_ID, given, self.policy, {})
        assert state is not None  # there is a binding
        bound = tuple(
            dataclasses.replace(b, placeholder=_local_placeholder(b.placeholder, env))
            for b, env in zip(state.bindings, state.envs, strict=True)
        )
        by_env = {env: b.placeholder for b, env in zip(bound, state.envs, strict=True)}
        self._secrets = SandboxSecrets(bound, binder.ca(state))
        self._ca_pem = state.ca_cert.encode()
        # The server's variables (placeholders and CA paths), its CA paths moved to ours.
        moved = {
            CA_BUNDLE: f"{SANDBOX_NET_DIR}/{CA_BUNDLE_NAME}",
            CA_CERT: f"{SANDBOX_NET_DIR}/{CA_NAME}",
        }
        self._secret_env = {
            name: by_env.get(name) or moved.get(value, value)
            for name, value in state.environment().items()
        }
        return store

    def _upstream_context(self) -> ssl.SSLContext:
        """Verifies the servers secrets are sent to: the host's trust store, plus
        ``upstream_ca_file`` when given (a private PKI; tests)."""
        ctx = ssl.create_default_context()
        if self._upstream_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self._upstream_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeFailure(
                    f"{self._upstream_ca_file}: cannot load CA certificates ({exc})"
                ) from exc
        return ctx

    def _write_ca(self, directory: Path, pem: bytes) -> list[Path]:
        """``ca.pem`` and ``ca-bundle.pem`` in ``directory``, readable by the sandbox's user."""
        if not pem.endswith(b"\n"):
            pem += b"\n"
        roots = _system_roots()
        if roots and not roots.endswith(b"\n"):
            roots += b"\n"
        made = []
        for name, data in ((CA_NAME, pem), (CA_BUNDLE_NAME, roots + pem)):
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, 0o644)  # the umask filtered the mode
            finally:
                os.close(fd)
            made.append(path)
        return made

    # ------------------------------------------------------------------ internals

    def _emit(self, event: EgressEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _make_dir(self) -> Path:
        try:
            if not self._run_dir.is_dir():
                self._run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                if self._owner is not None:
                    os.chown(self._run_dir, *self._owner)  # made for the sandbox's user
            # A fresh name that mkdir refuses if anything (a planted symlink) is there already.
            directory = self._run_dir / f"net-{secrets.token_hex(6)}"
            directory.mkdir(mode=0o700)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot make the network directory in {self._run_dir}: {exc}"
            ) from exc
        self._dir = directory
        try:
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
            if self._owner is not None:
                os.chown(directory, *self._owner)
            self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            self._remove_dir()
            raise RuntimeFailure(f"cannot prepare {directory}: {exc}") from exc
        return directory

    def _bind_path(self, directory: Path) -> Path:
        path = directory / SOCKET_NAME
        if len(os.fsencode(path)) <= _SUN_PATH:
            return path
        # Too long for sockaddr_un: reach the directory through our descriptor of it instead.
        assert self._dir_fd is not None
        return Path(f"/proc/self/fd/{self._dir_fd}/{SOCKET_NAME}")

    def _remove_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _EnvironStore:
    """What ``SecretBinder`` needs of the server's secret service, over the values taken from
    the run's environment (never written anywhere): a secret is a variable, the key the CA's is
    derived from is random per run."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._key = secrets.token_bytes(32)

    async def exists(self, tenant_id: str, names: Sequence[str]) -> list[str]:
        return [n for n in names if n not in self._values]

    def derive_key(self, label: bytes) -> bytes:
        return hmac.digest(self._key, label, "sha256")

    async def value(self, tenant_id: str, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            raise NotFoundError(f"${name} is not set in corral's environment") from None

    async def values(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        return {n: await self.value(tenant_id, n) for n in names}


def _check_reachable(policy: CompiledPolicy, spec: SecretSpec) -> None:
    """The run must be allowed to reach every bound host on port 443, as ``SecretBinder`` checks
    a server sandbox's bindings; here for unset variables too, without loading the server's
    code for bindings that do nothing."""
    for host in spec.hosts:
        decision = policy.check_bound_host(host)
        if not decision.allowed:
            raise InvalidRequestError(
                f"secret {spec.env!r} is bound to {host}, which this run may not reach on port "
                f"443 ({decision.reason}); allow it (--allow-domain {host}, or allow_domains in "
                "the settings)"
            )


def _check_value(env: str, value: str) -> None:
    """What the server's secret store refuses of a value, said of the variable."""
    from corral.core.commands import check_secret_value

    try:
        check_secret_value(value)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"${env}: {exc}") from None


def _local_placeholder(placeholder: str, env: str) -> str:
    """The server's random placeholder with a tail that is the same in every run for ``env``.

    Claude Code remembers which API keys the user approved by their last 20 characters
    (``customApiKeyResponses`` in ~/.claude.json) and, interactive, ignores an unapproved
    ``ANTHROPIC_API_KEY``: with a placeholder new in each run it would ask every time. The tail
    says nothing about the value; the random part keeps the placeholder unguessable.
    """
    tail = hashlib.sha256(f"corral local placeholder {env}".encode()).hexdigest()[:20]
    return f"{placeholder}-{tail}"


def _system_bundles() -> list[str]:
    """The host's system CA bundles (real paths, each once), where a bind can cover them."""
    from corral.core.bindings import SYSTEM_BUNDLES

    found: dict[str, None] = {}
    for path in SYSTEM_BUNDLES:
        real = os.path.realpath(path)
        if os.path.isfile(real) and real.startswith(_BUNDLE_ROOTS):
            found.setdefault(real, None)
    return list(found)


def _system_roots() -> bytes:
    """The host's system bundle (the first there is), empty when it has none."""
    for path in _system_bundles():
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return b""
