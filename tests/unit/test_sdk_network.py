"""The SDK's and CLI's networking logic without a server: policy documents, routes, parsing, URLs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import corral
from corral import errors
from corral.cli._net import (
    egress_table,
    follow_log,
    load_policy_file,
    network_rows,
    network_table,
    policy_from_flags,
    policy_summary,
)
from corral.cli.main import app
from corral.sdk import _wire
from corral.sdk._config import ClientConfig
from corral.sdk._http import AsyncHttp, SyncHttp
from corral.sdk._wire import calls, ingress_url, network_document, network_policy
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.models import EgressEvent, NetworkInfo, SandboxInfo
from corral.sdk.sandbox import Sandbox

URL = "http://corral.test:7700"
CONFIG = ClientConfig(URL, "k-123")
POLICY = {
    "preset": "none",
    "allow": [
        {"domain": "pypi.org", "cidr": None, "ports": [443], "protocol": "any"},
        {"domain": None, "cidr": "203.0.113.0/24", "ports": None, "protocol": "udp"},
    ],
    "deny": [],
    "egress_mbit": None,
}
SANDBOX = {
    "id": "sb-3f9a1c2b7d4e",
    "state": "running",
    "network": {"address": "10.201.0.7", "policy": POLICY, "proxy": "http://10.201.0.1:3128"},
    "access_token": "tok/en+1",
    "public_ports": False,
    "ingress_domain": None,
}
EVENT = {
    "id": 7,
    "time": 1_700_000_000.5,
    "kind": "dns",
    "decision": "deny",
    "reason": "default deny",
    "name": "blocked.test",
    "ip": None,
    "port": 53,
    "bytes_out": 0,
    "bytes_in": 0,
}


# ---------------------------------------------------------------- policy documents


def test_network_policy_builds_only_what_was_given() -> None:
    assert network_policy() == {}
    doc = network_policy(
        "registries",
        allow_domains=["pypi.org", "*.github.com"],
        allow_cidrs="203.0.113.0/24",
        deny_domains="evil.github.com",
        deny_cidrs=["203.0.113.9"],
        ports=[443, "8000-8100"],
        egress_mbit=5,
    )
    assert doc == {
        "preset": "registries",
        "allow": [
            {"domain": "pypi.org", "ports": [443, "8000-8100"]},
            {"domain": "*.github.com", "ports": [443, "8000-8100"]},
            {"cidr": "203.0.113.0/24", "ports": [443, "8000-8100"]},
        ],
        # Deny rules cover every port whatever ``ports`` says.
        "deny": [{"domain": "evil.github.com"}, {"cidr": "203.0.113.9"}],
        "egress_mbit": 5,
    }
    assert corral.network_policy is network_policy
    assert network_policy(allow_domains="a.example", ports=443)["allow"] == [
        {"domain": "a.example", "ports": [443]}
    ]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ports": [443]}, "ports restricts allow_domains/allow_cidrs"),
        ({"allow_domains": ["ok.example", 3]}, "allow_domains: 3"),
        ({"deny_cidrs": [""]}, "deny_cidrs: ''"),
        ({"allow_domains": "x.example", "ports": True}, "ports: True"),
    ],
)
def test_network_policy_refuses_what_cannot_be_a_rule(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(errors.InvalidRequestError, match=needle):
        network_policy(**kwargs)


def test_a_whole_policy_and_shortcuts_together_are_refused() -> None:
    with pytest.raises(errors.InvalidRequestError, match="preset/allow_domains, not both"):
        network_document({"preset": "public"}, allow_domains=["x.example"], preset="none")
    assert network_document(None) is None
    assert network_document(None, preset="public") == {"preset": "public"}
    assert network_document({"preset": "public"}) == {"preset": "public"}


def test_a_pydantic_model_is_dumped_and_anything_else_refused() -> None:
    class Model:
        def model_dump(self, *, mode: str) -> dict[str, Any]:
            assert mode == "json"
            return {"preset": "registries"}

    assert network_document(Model()) == {"preset": "registries"}
    with pytest.raises(errors.InvalidRequestError, match=r"must be a mapping.*not list"):
        network_document(["pypi.org"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- routes and bodies


def test_create_body_carries_network_and_public_ports_only_when_given() -> None:
    plain = calls.create_sandbox("base", None, None, None, None, None, None)
    assert "network" not in plain.body and "public_ports" not in plain.body
    call = calls.create_sandbox(
        "base", None, None, None, None, None, None, network={"preset": "none"}, public_ports=True
    )
    assert call.body["network"] == {"preset": "none"} and call.body["public_ports"] is True


def test_network_routes() -> None:
    assert (calls.get_network("sb-1").method, calls.get_network("sb-1").path) == (
        "GET",
        "/v1/sandboxes/sb-1/network",
    )
    up = calls.update_network("sb-1", {"preset": "public"})
    assert (up.method, up.path, up.body) == (
        "PATCH",
        "/v1/sandboxes/sb-1/network",
        {"preset": "public"},
    )
    log = calls.network_log("../x", 5, 10)
    assert log.path == "/v1/sandboxes/..%2Fx/network/log"
    assert log.params == (("after", "5"), ("limit", "10"))


def _recording(
    answer: Callable[[httpx.Request], httpx.Response],
) -> tuple[list[httpx.Request], httpx.MockTransport]:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return answer(req)

    return seen, httpx.MockTransport(handler)


def test_create_sends_the_document_built_from_shortcuts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, transport = _recording(lambda req: httpx.Response(201, json=SANDBOX))
    monkeypatch.setattr(
        "corral.sdk.sandbox.SyncHttp", lambda cfg: SyncHttp(cfg, transport=transport)
    )
    sbx = Sandbox.create(
        "minimal",
        allow_domains=["pypi.org"],
        preset="registries",
        public_ports=True,
        api_key="k",
        base_url=URL,
    )
    body = json.loads(seen[0].content)
    assert body["network"] == {"preset": "registries", "allow": [{"domain": "pypi.org"}]}
    assert body["public_ports"] is True
    assert sbx.access_token == "tok/en+1"
    sbx.close()
    with pytest.raises(errors.InvalidRequestError, match="not both"):
        Sandbox.create(network={}, allow_cidrs=["203.0.113.0/24"], api_key="k", base_url=URL)
    assert len(seen) == 1  # refused before any request


def test_network_handle_info_update_and_log() -> None:
    net = {"address": "10.201.0.7", "policy": POLICY, "proxy": "http://10.201.0.1:3128"}

    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/log"):
            return httpx.Response(200, json=[EVENT, {**EVENT, "id": 8, "kind": "tcp"}])
        if req.method == "PATCH" and json.loads(req.content).get("allow") == [{"domain": "*.com"}]:
            body = {
                "error": {
                    "code": "invalid_request",
                    "message": "allow rule 1: '*.com' is too broad",
                }
            }
            return httpx.Response(400, json=body)
        return httpx.Response(200, json=net)

    seen, transport = _recording(answer)
    sbx = Sandbox("sb-1", SyncHttp(CONFIG, transport=transport))
    info = sbx.network.info()
    assert info == NetworkInfo("10.201.0.7", POLICY, "http://10.201.0.1:3128")
    sbx.network.update(allow_domains=["x.example"], egress_mbit=2)
    assert json.loads(seen[-1].content) == {"allow": [{"domain": "x.example"}], "egress_mbit": 2}
    # Nothing given replaces the policy with deny-all.
    sbx.network.update()
    assert json.loads(seen[-1].content) == {}
    with pytest.raises(errors.InvalidRequestError, match=r"allow rule 1: '\*\.com'"):
        sbx.network.update({"allow": [{"domain": "*.com"}]})
    events = sbx.network.log(after=6, limit=2)
    assert [e.id for e in events] == [7, 8] and events[0].name == "blocked.test"
    assert seen[-1].url.params.multi_items() == [("after", "6"), ("limit", "2")]
    sbx.close()


async def test_async_network_handle_mirrors_the_sync_one() -> None:
    net = {"address": "10.201.0.7", "policy": {"preset": "public"}, "proxy": None}

    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/log"):
            return httpx.Response(200, json=[EVENT])
        return httpx.Response(200, json=net)

    seen, transport = _recording(answer)
    sbx = AsyncSandbox("sb-1", AsyncHttp(CONFIG, transport=transport))
    assert (await sbx.network.info()).policy == {"preset": "public"}
    await sbx.network.update(preset="public")
    assert seen[-1].method == "PATCH" and json.loads(seen[-1].content) == {"preset": "public"}
    assert [e.decision for e in await sbx.network.log()] == ["deny"]
    with pytest.raises(errors.CorralError, match="await info"):
        sbx.get_url(8000)
    await sbx.close()


# ---------------------------------------------------------------- answers


def test_sandbox_info_carries_the_network_fields() -> None:
    info = SandboxInfo.from_json(SANDBOX)
    assert info.address == "10.201.0.7" and info.network == POLICY
    assert info.access_token == "tok/en+1" and info.public_ports is False
    assert info.ingress_domain is None
    bare = SandboxInfo.from_json({"id": "sb-1", "state": "running"})
    assert (bare.address, bare.network, bare.access_token, bare.public_ports) == (
        None,
        None,
        None,
        False,
    )
    with pytest.raises(errors.CorralError, match="malformed network"):
        SandboxInfo.from_json({**SANDBOX, "network": {"address": "10.201.0.7"}})


def test_egress_event_parses_and_rejects_garbage() -> None:
    e = EgressEvent.from_json(EVENT)
    assert (e.id, e.kind, e.decision, e.allowed, e.port) == (7, "dns", "deny", False, 53)
    assert e.time is not None and e.time.timestamp() == 1_700_000_000.5
    assert e.raw["reason"] == "default deny"
    with pytest.raises(errors.CorralError, match="malformed egress event"):
        EgressEvent.from_json({"kind": "dns"})


# ---------------------------------------------------------------- ingress URLs


def test_path_form_urls() -> None:
    assert ingress_url(URL, "sb-1", 8000) == f"{URL}/sandboxes/sb-1/ports/8000/"
    assert ingress_url("https://h/corral/", "sb-1", 80, "api/x?a=1#top", token="t k") == (
        "https://h/corral/sandboxes/sb-1/ports/80/api/x?a=1&corral_token=t+k#top"
    )
    # A path cannot turn into a host name for whoever parses the URL.
    assert ingress_url(URL, "sb-1", 80, "//evil.example/x") == (
        f"{URL}/sandboxes/sb-1/ports/80/evil.example/x"
    )


def test_host_form_urls_keep_the_scheme_and_server_port() -> None:
    assert ingress_url(URL, "sb-1", 8000, ingress_domain="sbx.example.com") == (
        "http://8000-sb-1.sbx.example.com:7700/"
    )
    assert ingress_url(
        "https://corral.example.com/prefix", "SB-1", 443, "/p", ingress_domain="sbx.example.com",
        token="t",
    ) == "https://443-sb-1.sbx.example.com/p?corral_token=t"  # fmt: skip
    with pytest.raises(errors.InvalidRequestError, match="host name"):
        ingress_url(URL, "sb_1", 80, ingress_domain="sbx.example.com")


@pytest.mark.parametrize("port", [0, 65536, True, "80"])
def test_a_bad_port_is_refused(port: Any) -> None:
    with pytest.raises(errors.InvalidRequestError, match="not a port number"):
        ingress_url(URL, "sb-1", port)


def test_get_url_uses_what_create_answered_without_a_request() -> None:
    def fail(req: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    http = SyncHttp(CONFIG, transport=httpx.MockTransport(fail))
    sbx = Sandbox("sb-1", http, SandboxInfo.from_json({**SANDBOX, "id": "sb-1"}))
    assert sbx.get_url(3000) == f"{URL}/sandboxes/sb-1/ports/3000/"
    assert sbx.get_url(3000, "/x", with_token=True) == (
        f"{URL}/sandboxes/sb-1/ports/3000/x?corral_token=tok%2Fen%2B1"
    )
    hosted = SandboxInfo.from_json({**SANDBOX, "id": "sb-1", "ingress_domain": "s.example"})
    assert Sandbox("sb-1", http, hosted).get_url(3000) == "http://3000-sb-1.s.example:7700/"
    # Public ports: whatever token the server holds is not handed out.
    public = Sandbox("sb-1", http, SandboxInfo.from_json({**SANDBOX, "public_ports": True}))
    assert public.access_token is None
    assert "corral_token" not in public.get_url(3000, with_token=True)
    asbx = AsyncSandbox("sb-1", AsyncHttp(CONFIG), hosted)
    assert asbx.get_url(3000) == "http://3000-sb-1.s.example:7700/"
    assert asbx.access_token == "tok/en+1"
    http.close()


# ---------------------------------------------------------------- CLI pieces


def test_cli_flags_and_files_become_documents(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(
        file=None, preset=None, allow_domains=None, allow_cidrs=None, deny_domains=None,
        deny_cidrs=None, ports=None, egress_mbit=None,
    )  # fmt: skip
    assert policy_from_flags(**kw) is None
    assert policy_from_flags(**{**kw, "allow_domains": ["a.example"], "ports": ["443", "8-9"]}) == {
        "allow": [{"domain": "a.example", "ports": [443, "8-9"]}]
    }
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"preset": "public"}))
    assert policy_from_flags(**{**kw, "file": f}) == {"preset": "public"}
    with pytest.raises(errors.InvalidRequestError, match="not both"):
        policy_from_flags(**{**kw, "file": f, "preset": "none"})
    f.write_text("[1]")
    with pytest.raises(errors.InvalidRequestError, match="must be a JSON object"):
        load_policy_file(f)
    f.write_text("{")
    with pytest.raises(errors.InvalidRequestError, match="is not JSON"):
        load_policy_file(f)
    with pytest.raises(errors.InvalidRequestError, match="cannot read"):
        load_policy_file(tmp_path / "missing.json")


def _render(renderable: Any) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    text = console.export_text()
    console.file.close()
    return text


def test_policies_and_logs_print_readably_and_safely() -> None:
    assert policy_summary(POLICY) == (
        "preset none; allow pypi.org ports 443, 203.0.113.0/24 udp; deny -; egress server default"
    )
    assert policy_summary(None) == "disabled on this server"
    rows = dict(network_rows(SandboxInfo.from_json(SANDBOX)))
    assert rows["address"] == "10.201.0.7" and "token required" in rows["ports"]
    shown = _render(network_table(NetworkInfo.from_json(SANDBOX["network"])))
    assert "pypi.org ports 443" in shown and "http://10.201.0.1:3128" in shown
    # A name chosen inside the sandbox must not drive the terminal or rich markup.
    hostile = EgressEvent.from_json({**EVENT, "name": "\x1b[2J[bold]x[/bold].test"})
    table = _render(egress_table([hostile]))
    assert "\x1b" not in table and "\\x1b[2J[bold]x[/bold].test" in table


class _FakeNetwork:
    def __init__(self, pages: list[list[EgressEvent]]) -> None:
        self.pages = pages
        self.asked: list[int] = []

    def log(self, after: int = 0, limit: int = 1000) -> list[EgressEvent]:
        self.asked.append(after)
        return self.pages.pop(0) if self.pages else []


class _FakeSandbox:
    def __init__(self, pages: list[list[EgressEvent]], states: list[str]) -> None:
        self.network = _FakeNetwork(pages)
        self.states = states

    def info(self) -> SandboxInfo:
        state = self.states.pop(0)
        if state == "gone":
            raise errors.NotFoundError("no such sandbox")
        return SandboxInfo("sb-1", state)


def _ev(i: int) -> EgressEvent:
    return EgressEvent.from_json({**EVENT, "id": i})


@pytest.mark.parametrize("end", ["stopped", "gone"])
def test_follow_drains_the_log_until_the_sandbox_ends(end: str) -> None:
    # Full pages are fetched again at once; after the end one last look collects stragglers.
    fake = _FakeSandbox([[_ev(3), _ev(4)], [_ev(5)], [], [_ev(6)]], ["running", "running", end])
    got: list[int] = []
    follow_log(
        fake,  # type: ignore[arg-type]
        [_ev(1), _ev(2)], after=0, limit=2, interval=0.01,
        emit=lambda batch: got.extend(e.id for e in batch),
    )  # fmt: skip
    assert got == [1, 2, 3, 4, 5, 6]
    assert fake.network.asked == ([2, 4, 5, 5, 6] if end == "stopped" else [2, 4, 5, 5])


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    monkeypatch.setenv("CORRAL_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "no-data-dir"))
    return CliRunner()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["net", "update", "sb-1"], "no policy given"),
        (["net", "update", "sb-1", "--preset", "all"], "Invalid value for '--preset'"),
        (["create", "--port", "443"], "ports restricts"),
        (["url", "sb-1", "70000"], "Invalid value for 'PORT'"),
    ],
)
def test_cli_refuses_bad_network_input_before_any_request(
    runner: CliRunner, args: list[str], needle: str
) -> None:
    result = runner.invoke(app, ["--api-key", "k", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_public_names_are_exported() -> None:
    assert {"network_policy", "network_document", "ingress_url"} <= set(_wire.__all__)
    assert {"network_policy", "NetworkInfo", "EgressEvent"} <= set(corral.__all__)
