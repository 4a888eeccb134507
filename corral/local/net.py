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
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from corral.errors import InvalidRequestError, RuntimeFailure
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
from corral.net.view import EgressEvent, NetRegistry, SandboxNet

__all__ = [
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
# Interpreters for the relay when this one is out of the sandbox user's reach (it needs only
# the standard library, Python 3.8 or later).
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_MAX_DOMAINS = 64  # NetworkPolicy's own limit on rules
# sockaddr_un.sun_path is 108 bytes, the final NUL included.
_SUN_PATH = 107


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
    ) -> None:
        # Compiled now: a bad domain fails before anything is started.
        self.policy: CompiledPolicy = compile_policy(local_policy(allow_domains), AddressGuard())
        self._run_dir = Path(run_dir)
        self._upstreams = None if dns_upstreams is None else list(dns_upstreams)
        self._on_event = on_event
        self._owner = owner
        self._python = _interpreter(owner)
        self._dir: Path | None = None
        self._dir_fd: int | None = None
        self._proxy: EgressProxy | None = None
        self._upstream: Upstream | None = None

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
        if self._proxy is not None:
            return
        servers = self._upstreams if self._upstreams is not None else upstreams_from_resolv_conf()
        if not servers:
            raise RuntimeFailure(
                "no DNS server to resolve allowed domains with: /etc/resolv.conf names none"
            )
        upstream = Upstream(servers)
        registry = NetRegistry()
        # The address is never looked up: the unix listener names the sandbox itself.
        registry.add(
            SandboxNet(SANDBOX_ID, SANDBOX_ID, ipaddress.IPv4Address("0.0.0.0"), self.policy)
        )
        proxy = EgressProxy(registry, upstream.resolve, self._emit, host=None, port=0)
        directory = self._make_dir()
        try:
            relay = directory / RELAY_NAME
            shutil.copyfile(RELAY, relay)
            os.chmod(relay, 0o644)
            await proxy.listen_unix(self._bind_path(directory), SANDBOX_ID)
            if self._owner is not None:
                for path in (relay, directory / SOCKET_NAME):
                    os.chown(path, *self._owner)
        except BaseException:
            await proxy.stop()
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
        return env

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


def _interpreter(owner: tuple[int, int] | None) -> str:
    """This interpreter, or a system one when ``owner`` could not run this one."""
    if owner is None or owner[0] == os.geteuid():
        return sys.executable
    for candidate in (sys.executable, *_FALLBACK_PYTHONS):
        if _runnable_by(candidate, *owner):
            return candidate
    raise RuntimeFailure(
        f"no Python interpreter that uid {owner[0]} can run for the network relay "
        f"({sys.executable} is out of its reach; install python3)"
    )


def _runnable_by(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may execute ``path``, by the mode bits of it and of every
    directory on the way (as given and resolved). Supplementary groups and ACLs are not
    consulted: a false "no" only picks a system interpreter instead."""
    if uid == 0:
        return os.path.isfile(path)
    real = Path(os.path.realpath(path))
    given = Path(os.path.abspath(path))
    steps = {*given.parents, *real.parents}
    try:
        if not real.is_file():
            return False
        return _allows(real.stat(), uid, gid, 0o1) and all(
            _allows(d.stat(), uid, gid, 0o1) for d in steps
        )
    except OSError:
        return False


def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits
