"""``corral.secrets`` and ``AsyncSecrets`` against a real server: set, replace, list, get and delete with the connection given or from the environment; nothing the SDK hands back carries the value; bad names and values are ``InvalidRequestError``, unknown ones ``NotFoundError``; another tenant's key sees none of them."""

from __future__ import annotations

import contextlib
import secrets as random
from collections.abc import Iterator

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from corral import AsyncSecrets, SecretInfo, errors, secrets
from tests.conftest import Conn
from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def name(conn: Conn) -> Iterator[str]:
    """A secret name of this test's own; the secret is deleted afterwards."""
    n = "sdk-" + random.token_hex(4)
    yield n
    with contextlib.suppress(errors.NotFoundError):
        secrets.delete(n, **conn)


def _value() -> str:
    return "sk-sdk-" + random.token_hex(16)


def _shown(*infos: object) -> str:
    return "".join(repr(i) + repr(getattr(i, "raw", "")) for i in infos)


def test_set_list_get_delete(conn: Conn, name: str) -> None:
    first, second = _value(), _value()
    made = secrets.set(name, first, **conn)
    assert isinstance(made, SecretInfo) and made.name == name
    assert made.created_at == made.updated_at
    assert set(made.raw) == {"name", "created_at", "updated_at"}
    replaced = secrets.set(name, second, **conn)
    assert replaced.created_at == made.created_at and replaced.updated_at > made.updated_at
    got = secrets.get(name, **conn)
    assert got == replaced
    listed = secrets.list(**conn)
    assert name in [s.name for s in listed]
    assert first not in _shown(made, replaced, got, *listed)
    assert second not in _shown(made, replaced, got, *listed)
    secrets.delete(name, **conn)
    with pytest.raises(errors.NotFoundError, match=f"no secret named '{name}'"):
        secrets.get(name, **conn)
    with pytest.raises(errors.NotFoundError):
        secrets.delete(name, **conn)


def test_connection_from_the_environment(
    server: RunningServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_URL", server.url)
    monkeypatch.setenv("CORRAL_API_KEY", server.admin_key)
    secrets.set(name, _value())
    assert secrets.get(name).name == name


async def test_async_secrets(conn: Conn, name: str) -> None:
    value = _value()
    made = await AsyncSecrets.set(name, value, **conn)
    assert made.name == name
    assert name in [s.name for s in await AsyncSecrets.list(**conn)]
    assert (await AsyncSecrets.get(name, **conn)).created_at == made.created_at
    await AsyncSecrets.delete(name, **conn)
    with pytest.raises(errors.NotFoundError):
        await AsyncSecrets.get(name, **conn)
    with pytest.raises(errors.InvalidRequestError, match="1 to 64 characters"):
        await AsyncSecrets.set("-x", value, **conn)


@pytest.mark.parametrize(
    ("bad_name", "value", "needle"),
    [
        ("-lead", "v", "1 to 64 characters of letters, digits"),
        ("a" * 65, "v", "1 to 64 characters of letters, digits"),
        ("ok", "", "value"),
        ("ok", "line\nbreak", "value"),
        ("ok", "x" * 16385, "16384"),
    ],
)
def test_bad_input_is_invalid_request(conn: Conn, bad_name: str, value: str, needle: str) -> None:
    with pytest.raises(errors.InvalidRequestError, match=needle) as got:
        secrets.set(bad_name, value, **conn)
    if len(value) > 3:
        assert value not in got.value.message


def test_another_tenant_sees_none_of_them(server: RunningServer, conn: Conn, name: str) -> None:
    secrets.set(name, _value(), **conn)
    tenant = "sdks-" + random.token_hex(3)
    with server.client() as admin:
        assert admin.post("/v1/tenants", json={"name": tenant}).status_code == 201
        key = admin.post(f"/v1/tenants/{tenant}/keys", json={"name": "k"}).json()["key"]
    other = {"api_key": key, "base_url": server.url}
    assert secrets.list(**other) == []
    with pytest.raises(errors.NotFoundError):
        secrets.get(name, **other)
    with pytest.raises(errors.NotFoundError):
        secrets.delete(name, **other)
    assert secrets.get(name, **conn).name == name
