"""Tenant secrets over HTTP against a real server: create, replace, list, inspect and delete; no response ever carries a value; another tenant can neither see nor delete them; bad names and values are 400 naming the rule and unknown ones 404; the key file is 0600 in the data dir; and the value is nowhere in the SQLite files in plaintext."""

from __future__ import annotations

import secrets
import stat
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

FIELDS = {"name", "created_at", "updated_at"}


class Recording:
    """An API client that keeps every response body, so that a test can check that none
    of them carries a value."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.bodies: list[bytes] = []

    def __getattr__(self, method: str) -> object:
        call = getattr(self.client, method)

        def do(*args: object, **kwargs: object) -> httpx.Response:
            r: httpx.Response = call(*args, **kwargs)
            self.bodies.append(r.content)
            self.bodies.append(str(r.headers).encode())
            return r

        return do

    def assert_never_answered(self, *values: str) -> None:
        for value in values:
            hits = [b[:200] for b in self.bodies if value.encode() in b]
            assert not hits, f"a response carried a secret value: {hits}"


@pytest.fixture
def api(server: RunningServer) -> Iterator[Recording]:
    with server.client() as c:
        yield Recording(c)


@pytest.fixture
def name(api: Recording) -> Iterator[str]:
    """A secret name of this test's own; the secret is deleted afterwards."""
    n = "it-" + secrets.token_hex(4)
    yield n
    api.client.delete(f"/v1/secrets/{n}")


def _value() -> str:
    return "sk-test-" + secrets.token_hex(16)


def _tenant_client(server: RunningServer, api: Recording) -> httpx.Client:
    tenant = "sec-" + secrets.token_hex(3)
    assert api.post("/v1/tenants", json={"name": tenant}).status_code == 201
    key = api.post(f"/v1/tenants/{tenant}/keys", json={"name": "k"}).json()["key"]
    return server.client(key)


def test_crud_never_answers_the_value(api: Recording, name: str) -> None:
    first, second = _value(), _value()
    r = api.put(f"/v1/secrets/{name}", json={"value": first})
    assert r.status_code == 200, r.text
    made = r.json()
    assert set(made) == FIELDS and made["name"] == name
    assert made["created_at"] == made["updated_at"]

    r = api.get(f"/v1/secrets/{name}")
    assert (r.status_code, r.json()) == (200, made)
    listed = api.get("/v1/secrets").json()
    assert set(listed) == {"secrets"}
    (mine,) = [s for s in listed["secrets"] if s["name"] == name]
    assert mine == made
    names = [s["name"] for s in listed["secrets"]]
    assert names == sorted(names)

    r = api.put(f"/v1/secrets/{name}", json={"value": second})
    assert r.status_code == 200, r.text
    replaced = r.json()
    assert replaced["created_at"] == made["created_at"]
    assert replaced["updated_at"] > made["updated_at"]

    r = api.delete(f"/v1/secrets/{name}")
    assert (r.status_code, r.content) == (204, b"")
    assert api.get(f"/v1/secrets/{name}").status_code == 404
    assert all(s["name"] != name for s in api.get("/v1/secrets").json()["secrets"])
    api.assert_never_answered(first, second)


def test_the_openapi_document_has_no_route_answering_a_value(api: Recording) -> None:
    doc = api.get("/openapi.json").json()
    ops = [
        (path, method, op)
        for path, item in doc["paths"].items()
        if path.startswith("/v1/secrets")
        for method, op in item.items()
    ]
    assert len(ops) == 4
    for path, method, op in ops:
        ok = op["responses"].get("200")
        if ok is None:
            assert method == "delete" and "204" in op["responses"], (path, method)
            continue
        ref = ok["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in ("SecretOut", "SecretList"), (path, method, ref)
    for model in ("SecretOut", "SecretList"):
        assert "value" not in doc["components"]["schemas"][model]["properties"]


def test_another_tenant_can_neither_see_nor_delete(
    server: RunningServer, api: Recording, name: str
) -> None:
    value = _value()
    assert api.put(f"/v1/secrets/{name}", json={"value": value}).status_code == 200
    with _tenant_client(server, api) as other_client:
        other = Recording(other_client)
        assert other.get("/v1/secrets").json() == {"secrets": []}
        assert other.get(f"/v1/secrets/{name}").status_code == 404
        assert other.delete(f"/v1/secrets/{name}").status_code == 404
        # Its own secret of the same name is another secret.
        theirs = _value()
        r = other.put(f"/v1/secrets/{name}", json={"value": theirs})
        assert r.status_code == 200, r.text
        assert [s["name"] for s in other.get("/v1/secrets").json()["secrets"]] == [name]
        assert other.delete(f"/v1/secrets/{name}").status_code == 204
        other.assert_never_answered(value, theirs)
    # Untouched by all that.
    assert api.get(f"/v1/secrets/{name}").status_code == 200
    api.assert_never_answered(value)


@pytest.mark.parametrize(
    "bad_name", ["-lead", ".hidden", "a" * 65, "sp ace", "ü", "a:b", "a%0Ab", "a%00b"]
)
def test_bad_names_are_400_with_the_rule(api: Recording, bad_name: str) -> None:
    for method, kwargs in (
        ("put", {"json": {"value": "v"}}),
        ("get", {}),
        ("delete", {}),
    ):
        r = getattr(api, method)(f"/v1/secrets/{bad_name}", **kwargs)
        assert r.status_code == 400, (method, bad_name, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request"
        assert "1 to 64 characters of letters, digits" in err["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"value": ""}, "value"),
        ({"value": "x" * 16385}, "16384"),
        ({"value": "sk-header\r\nX-Evil: 1"}, "value"),
        ({"value": "sk-nul\x00"}, "value"),
        ({"value": 42}, "value"),
        ({}, "value"),
        ({"value": "ok", "extra": 1}, "unknown field"),
    ],
)
def test_bad_values_are_400_and_not_echoed(
    api: Recording, name: str, body: dict[str, object], needle: str
) -> None:
    r = api.put(f"/v1/secrets/{name}", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    if isinstance(body.get("value"), str) and body["value"]:
        api.assert_never_answered(str(body["value"]))
    assert api.get(f"/v1/secrets/{name}").status_code == 404  # nothing was stored


def test_unknown_secrets_are_404_naming_them(api: Recording) -> None:
    for method in ("get", "delete"):
        r = getattr(api, method)("/v1/secrets/never-made")
        assert r.status_code == 404
        assert r.json()["error"] == {
            "code": "not_found",
            "message": "no secret named 'never-made'",
        }


def test_secrets_need_a_key(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/v1/secrets").status_code == 401
        assert anonymous.put("/v1/secrets/x", json={"value": "v"}).status_code == 401


def test_key_file_is_0600_and_the_database_holds_no_plaintext(
    server: RunningServer, api: Recording, name: str
) -> None:
    key = server.data_dir / "secrets.key"
    st = key.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32
    value = _value()
    assert api.put(f"/v1/secrets/{name}", json={"value": value}).status_code == 200
    # Replaced once, so the first write's pages may linger in the WAL too.
    assert api.put(f"/v1/secrets/{name}", json={"value": value}).status_code == 200
    files = [p for p in server.data_dir.glob("corral.db*") if p.is_file()]
    assert any(p.name == "corral.db" for p in files)
    for path in files:
        raw = path.read_bytes()
        assert value.encode() not in raw, path
    assert name.encode() in b"".join(p.read_bytes() for p in files)  # the row is there
    # Nor in the server's log.
    log = server.data_dir / "server.log"
    if log.exists():
        assert value.encode() not in log.read_bytes()
