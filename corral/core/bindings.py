"""Secret bindings: which tenant secrets a sandbox may use, toward which hosts, and how.

A binding is checked once, at create: the secret exists, every host is a DNS name (or a
``*.domain`` pattern two labels deep at least) that the sandbox's network policy lets it reach.
The sandbox then gets, per binding, a random placeholder in an environment variable, and one
certificate authority of its own whose certificate (never its key) is put in its trust store. The
egress proxy terminates TLS toward bound hosts only, with certificates of that CA, and swaps
placeholders for values on the wire (``corral.net.intercept``).

What is kept (the sandbox row's ``secrets`` column, and a snapshot's source) is the *state*: the
bindings with their placeholders, the CA's seed and certificate. Never a value: values are read
from the secret store per connection, so a rotated secret is used from the next connection on and
a deleted one makes the proxy answer 502.
"""

from __future__ import annotations

import re
import secrets as random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.errors import InvalidRequestError, NotFoundError
from corral.net.ca import SandboxCA
from corral.net.policy import secret_host
from corral.net.view import BoundSecret, SandboxSecrets

if TYPE_CHECKING:
    from corral.agent import AgentClient
    from corral.core.commands import SecretBinding
    from corral.core.secrets import SecretService
    from corral.net.policy import CompiledPolicy

__all__ = ["CA_BUNDLE", "CA_CERT", "SYSTEM_BUNDLES", "SecretBinder", "SecretState"]

# Inside the sandbox: the sandbox's CA alone (for NODE_EXTRA_CA_CERTS, which adds to Node's own
# roots), and the template's roots plus it (for the variables that replace the roots).
CA_DIR = "/etc/corral"
CA_CERT = f"{CA_DIR}/sandbox-ca.pem"
CA_BUNDLE = f"{CA_DIR}/ca-bundle.pem"
# Where distributions keep the bundle that curl, git, wget, apt and OpenSSL's defaults read; the
# CA is appended to each one the template has, so tools that ignore the variables trust it too.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # Alpine (libressl), macOS-style
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _default_env(name: str) -> str:
    env = re.sub(r"[^A-Z0-9_]", "_", name.upper())
    return env if not env[0].isdigit() else f"_{env}"


def _host(binding: str, raw: str) -> str:
    """A bound host in canonical form; InvalidRequestError saying why it cannot be one."""
    try:
        return secret_host(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"secret {binding!r}: host {raw!r} {exc}") from None


@dataclass(frozen=True)
class SecretState:
    """A sandbox's bindings as kept in the store (see the module docstring)."""

    bindings: tuple[BoundSecret, ...]
    envs: tuple[str, ...]  # the variable holding each binding's placeholder
    ca_seed: str
    ca_cert: str

    def to_doc(self) -> dict[str, Any]:
        return {
            "ca_seed": self.ca_seed,
            "ca_cert": self.ca_cert,
            "bindings": [
                {**given, "placeholder": b.placeholder}
                for given, b in zip(self.as_bindings(), self.bindings, strict=True)
            ],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> SecretState:
        items = list(doc["bindings"])
        return cls(
            bindings=tuple(
                BoundSecret(
                    name=str(b["name"]),
                    hosts=tuple(str(h) for h in b["hosts"]),
                    placeholder=str(b["placeholder"]),
                    header=b.get("header"),
                    format=str(b.get("format") or "{value}"),
                )
                for b in items
            ),
            envs=tuple(str(b["env"]) for b in items),
            ca_seed=str(doc["ca_seed"]),
            ca_cert=str(doc["ca_cert"]),
        )

    def as_bindings(self) -> list[dict[str, Any]]:
        """The bindings as a create gives them (``CreateSandbox.secrets``)."""
        return [
            {"name": b.name, "hosts": list(b.hosts), "env": env, "header": b.header,
             "format": b.format}
            for b, env in zip(self.bindings, self.envs, strict=True)
        ]  # fmt: skip

    def public(self) -> list[dict[str, Any]]:
        """What the API shows of it: the bindings with their placeholders (never the CA)."""
        return [{k: v for k, v in d.items() if k != "format"} for d in self.to_doc()["bindings"]]

    def environment(self) -> dict[str, str]:
        """What every process of the sandbox starts with, on top of the template's and the
        caller's variables."""
        env = {e: b.placeholder for b, e in zip(self.bindings, self.envs, strict=True)}
        env.update(
            {
                "SSL_CERT_FILE": CA_BUNDLE,
                "REQUESTS_CA_BUNDLE": CA_BUNDLE,
                "CURL_CA_BUNDLE": CA_BUNDLE,
                "NODE_EXTRA_CA_CERTS": CA_CERT,
            }
        )
        return env


class SecretBinder:
    """Turns the ``secrets`` of a create into a sandbox's :class:`SecretState` and puts that
    state in force: the CA in the sandbox's trust store, the bindings with the egress proxy."""

    def __init__(self, store: SecretService) -> None:
        self._store = store
        self._cas: dict[str, SandboxCA] = {}  # by seed: one CA object per state, not per use

    async def prepare(
        self,
        sandbox_id: str,
        tenant_id: str,
        bindings: Sequence[SecretBinding],
        policy: CompiledPolicy | None,
        env: Mapping[str, str],
    ) -> SecretState | None:
        """Check ``bindings`` and make their state; None when there are none."""
        if not bindings:
            return None
        if policy is None:
            raise InvalidRequestError(
                "secrets need the server's network layer (the egress proxy injects them), "
                "which is disabled here"
            )
        names = [b.name for b in bindings]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InvalidRequestError(f"secret {sorted(dup)[0]!r} is bound twice")
        missing = await self._store.exists(tenant_id, names)
        if missing:
            raise InvalidRequestError(
                f"unknown secret {missing[0]!r}; create it first (PUT /v1/secrets/{missing[0]})"
            )
        bound: list[BoundSecret] = []
        envs: list[str] = []
        for b in bindings:
            hosts = tuple(dict.fromkeys(_host(b.name, h) for h in b.hosts))
            for host in hosts:
                decision = policy.check_bound_host(host)
                if not decision.allowed:
                    raise InvalidRequestError(
                        f"secret {b.name!r} is bound to {host}, which the sandbox's network "
                        f"policy does not let it reach on port 443 ({decision.reason}); allow it"
                    )
            var = b.env or _default_env(b.name)
            if not _ENV_NAME.match(var):
                raise InvalidRequestError(
                    f"secret {b.name!r}: env {var!r} is not a valid variable name"
                )
            if var in env or var in envs:
                raise InvalidRequestError(
                    f"secret {b.name!r}: env {var!r} is also set otherwise; the placeholder "
                    "needs a variable of its own"
                )
            envs.append(var)
            bound.append(
                BoundSecret(
                    name=b.name,
                    hosts=hosts,
                    # Long and random: the proxy swaps it wherever it appears, so it must
                    # never occur by chance, and another sandbox cannot guess it.
                    placeholder=f"corral-secret-{random.token_hex(20)}",
                    header=b.header,
                    format=b.format,
                )
            )
        seed = random.token_hex(16)
        permitted = sorted({h.removeprefix("*.") for b in bound for h in b.hosts})
        ca = SandboxCA.create(self._seed_key(seed), sandbox_id, permitted)
        self._cas[seed] = ca
        return SecretState(tuple(bound), tuple(envs), seed, ca.cert_pem.decode())

    def _seed_key(self, seed: str) -> bytes:
        return self._store.derive_key(b"corral sandbox ca\0" + seed.encode())

    def ca(self, state: SecretState) -> SandboxCA:
        ca = self._cas.get(state.ca_seed)
        if ca is None:
            ca = SandboxCA.load(self._seed_key(state.ca_seed), state.ca_cert.encode())
            self._cas[state.ca_seed] = ca
        return ca

    def view(self, state: SecretState) -> SandboxSecrets:
        """What the egress proxy needs of the state."""
        return SandboxSecrets(state.bindings, self.ca(state))

    def forget(self, state: SecretState) -> None:
        self._cas.pop(state.ca_seed, None)

    async def install(self, agent: AgentClient, state: SecretState) -> None:
        """Put the sandbox's CA certificate in its trust store (idempotent)."""
        pem = state.ca_cert.encode()
        if not pem.endswith(b"\n"):
            pem += b"\n"
        await agent.mkdir(CA_DIR, parents=True)
        await _write(agent, CA_CERT, pem)
        roots = b""
        for path in SYSTEM_BUNDLES:
            try:
                current = await _read(agent, path)
            except NotFoundError:
                continue
            if not roots:
                roots = current
            if pem not in current:
                sep = b"" if not current or current.endswith(b"\n") else b"\n"
                await _write(agent, path, current + sep + pem)
        sep = b"" if not roots or roots.endswith(b"\n") else b"\n"
        await _write(agent, CA_BUNDLE, roots + sep + pem if pem not in roots else roots)

    async def values(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        """The current values of ``names`` (NotFoundError naming a deleted one)."""
        return {n: await self._store.value(tenant_id, n) for n in names}


async def _read(agent: AgentClient, path: str) -> bytes:
    out = bytearray()
    async for chunk in agent.read_file(path):
        out += chunk
    return bytes(out)


async def _write(agent: AgentClient, path: str, data: bytes) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield data

    await agent.write_file(path, body(), mode=0o644)
