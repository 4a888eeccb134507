"""Secret bindings are checked before a sandbox exists (names, hosts, policy, variables), and what
is kept of them (placeholders, CA) round-trips through the store and restarts without a value."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from corral.core.bindings import CA_BUNDLE, CA_CERT, SecretBinder, SecretState
from corral.core.commands import SecretBinding
from corral.core.secrets import SecretService
from corral.errors import InvalidRequestError
from corral.net.policy import AddressGuard, compile_policy, parse_policy
from corral.store import Store, TenantRow

POLICY = compile_policy(
    parse_policy({"allow": [{"domain": "api.example.com"}, {"domain": "*.example.org"}]}),
    AddressGuard(),
)


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    from datetime import UTC, datetime

    s = Store(tmp_path / "db.sqlite")
    await s.migrate()
    await s.add_tenant(TenantRow(id="t1", name="t1", created_at=datetime.now(UTC)))
    return s


@pytest.fixture
async def binder(store: Store, tmp_path: Path) -> SecretBinder:
    svc = SecretService(store, tmp_path)
    svc.start()
    await svc.put("t1", "gh", "ghp_real_value")
    return SecretBinder(svc)


def b(**kw: object) -> SecretBinding:
    return SecretBinding.model_validate({"name": "gh", "hosts": ["api.example.com"], **kw})


async def test_state_has_placeholders_and_a_ca_never_the_value(binder: SecretBinder) -> None:
    state = await binder.prepare(
        "sb-1", "t1", [b(header="Authorization", format="token {value}")], POLICY, {}
    )
    assert state is not None
    (bound,) = state.bindings
    assert bound.placeholder.startswith("corral-secret-") and len(bound.placeholder) > 50
    assert bound.hosts == ("api.example.com",)
    env = state.environment()
    assert env["GH"] == bound.placeholder
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == CA_BUNDLE
    assert env["NODE_EXTRA_CA_CERTS"] == CA_CERT
    doc = state.to_doc()
    assert "ghp_real_value" not in json.dumps(doc)
    assert SecretState.from_doc(json.loads(json.dumps(doc))) == state
    assert state.public() == [
        {
            "name": "gh",
            "hosts": ["api.example.com"],
            "env": "GH",
            "header": "Authorization",
            "placeholder": bound.placeholder,
        }
    ]
    assert [SecretBinding.model_validate(x) for x in state.as_bindings()] == [
        b(header="Authorization", format="token {value}", env="GH")
    ]
    # Another sandbox's binding of the same secret gets another placeholder and CA.
    other = await binder.prepare("sb-2", "t1", [b()], POLICY, {})
    assert other is not None
    assert other.bindings[0].placeholder != bound.placeholder
    assert other.ca_cert != state.ca_cert


async def test_the_ca_comes_back_after_a_restart(
    binder: SecretBinder, store: Store, tmp_path: Path
) -> None:
    state = await binder.prepare("sb-1", "t1", [b()], POLICY, {})
    assert state is not None
    again = SecretService(store, tmp_path)
    again.start()
    ca = SecretBinder(again).ca(state)
    assert ca.cert_pem.decode() == state.ca_cert
    # What it signs after the restart verifies against the certificate the sandbox was given
    # at create: a real handshake, in memory, with only that certificate trusted.
    bios = {side: (ssl.MemoryBIO(), ssl.MemoryBIO()) for side in ("client", "server")}
    ends = {
        "client": ssl.create_default_context(cadata=state.ca_cert).wrap_bio(
            *bios["client"], server_hostname="api.example.com"
        ),
        "server": ca.server_context("api.example.com", ["http/1.1"]).wrap_bio(
            *bios["server"], server_side=True
        ),
    }
    done = {"client": False, "server": False}
    for _ in range(10):
        for me, peer in (("client", "server"), ("server", "client")):
            if not done[me]:
                try:
                    ends[me].do_handshake()
                    done[me] = True
                except ssl.SSLWantReadError:
                    pass
            bios[peer][0].write(bios[me][1].read())  # my outgoing → the peer's incoming
    assert done == {"client": True, "server": True}
    peer = ends["client"].getpeercert()
    assert peer is not None and ("DNS", "api.example.com") in peer["subjectAltName"]


@pytest.mark.parametrize(
    ("binding", "env", "why"),
    [
        ({"name": "nope"}, {}, "unknown secret 'nope'"),
        ({"hosts": ["*"]}, {}, "anywhere"),
        ({"hosts": ["."]}, {}, "anywhere"),
        ({"hosts": ["10.0.0.1"]}, {}, "IP address"),
        ({"hosts": ["[::1]"]}, {}, "IP address"),
        ({"hosts": ["*.com"]}, {}, "too broad"),
        ({"hosts": ["*.co.uk"]}, {}, "too broad"),
        ({"hosts": ["bad_label.example.com"]}, {}, "label"),
        ({"hosts": ["other.example.net"]}, {}, "does not let it reach"),
        ({"hosts": ["example.org"]}, {}, "does not let it reach"),
        ({"env": "9LIVES"}, {}, "variable name"),
        ({"env": "TOKEN"}, {"TOKEN": "x"}, "also set"),
    ],
)
async def test_bad_bindings(
    binder: SecretBinder, binding: dict[str, object], env: dict[str, str], why: str
) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        await binder.prepare("sb-1", "t1", [b(**binding)], POLICY, env)


async def test_wildcards_twice_bound_and_no_network(binder: SecretBinder) -> None:
    state = await binder.prepare(
        "sb-1", "t1", [b(hosts=["*.example.org", "API.example.com."])], POLICY, {}
    )
    assert state is not None and state.bindings[0].hosts == ("*.example.org", "api.example.com")
    assert state.bindings[0].covers("a.b.example.org")
    assert not state.bindings[0].covers("example.org")
    with pytest.raises(InvalidRequestError, match="bound twice"):
        await binder.prepare("sb-1", "t1", [b(), b(env="OTHER")], POLICY, {})
    with pytest.raises(InvalidRequestError, match="network layer"):
        await binder.prepare("sb-1", "t1", [b()], None, {})
    assert await binder.prepare("sb-1", "t1", [], None, {}) is None


def test_binding_shape() -> None:
    with pytest.raises(ValueError, match="value"):
        b(format="Bearer")
    with pytest.raises(ValueError):
        b(header="Bad Header")
    with pytest.raises(ValueError):
        b(format="Bearer {value}\r\nX-Evil: 1")
    with pytest.raises(ValueError):
        b(hosts=[])
