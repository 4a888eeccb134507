"""``corral create`` network flags, ``corral net show/update/log`` and ``corral url`` against a real
server: policies shown and replaced, bad rules refused by name, the egress log, port URLs."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from tests.integration.cli_harness import CORRAL, TEMPLATE, corral
from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


def _policy(env: dict[str, str], sid: str) -> dict[str, object]:
    net = json.loads(corral(env, "net", "show", sid, "--json").stdout)
    assert isinstance(net["policy"], dict)
    return net["policy"]


def _targets(policy: dict[str, object], kind: str = "allow") -> list[object]:
    rules = policy[kind]
    assert isinstance(rules, list)
    return [r.get("domain") or r.get("cidr") for r in rules]


@pytest.fixture
def sid(env: dict[str, str]) -> Iterator[str]:
    out = corral(
        env, "create", "--template", TEMPLATE, "--timeout", "600",
        "--allow-domain", "allowed.test", "--allow-cidr", "203.0.113.0/24",
        "--deny-domain", "api.allowed.test", "--port", "443", "--egress-mbit", "20",
    )  # fmt: skip
    sandbox_id = out.stdout.decode().strip()
    yield sandbox_id
    corral(env, "kill", sandbox_id, check=False)


def test_create_flags_become_the_policy_info_shows(env: dict[str, str], sid: str) -> None:
    policy = _policy(env, sid)
    assert _targets(policy) == ["allowed.test", "203.0.113.0/24"]
    assert [r["ports"] for r in policy["allow"]] == [[443], [443]]  # type: ignore[attr-defined]
    assert _targets(policy, "deny") == ["api.allowed.test"]
    assert policy["egress_mbit"] == 20
    info = json.loads(corral(env, "info", sid, "--json").stdout)
    assert info["network"]["policy"] == policy and info["network"]["address"]
    text = corral(env, "info", sid).stdout.decode()
    assert info["network"]["address"] in text
    assert "allow allowed.test ports 443, 203.0.113.0/24 ports 443" in text
    assert "deny api.allowed.test" in text and "20 Mbit/s" in text
    shown = corral(env, "net", "show", sid).stdout.decode()
    assert "allowed.test ports 443" in shown and info["network"]["address"] in shown


def test_update_replaces_the_policy_from_flags_or_a_file(
    env: dict[str, str], sid: str, tmp_path: Path
) -> None:
    out = corral(env, "net", "update", sid, "--preset", "registries", "--deny-cidr", "203.0.113.9")
    assert "registries" in out.stdout.decode()
    policy = _policy(env, sid)
    assert policy["preset"] == "registries" and _targets(policy) == []
    assert _targets(policy, "deny") == ["203.0.113.9"]

    doc = {"allow": [{"cidr": "198.51.100.0/24", "protocol": "udp", "ports": [53]}]}
    f = tmp_path / "policy.json"
    f.write_text(json.dumps(doc))
    updated = json.loads(corral(env, "net", "update", sid, "--file", str(f), "--json").stdout)
    assert updated["policy"] == _policy(env, sid)
    assert _targets(updated["policy"]) == ["198.51.100.0/24"]
    piped = corral(env, "net", "update", sid, "--file", "-", input=b'{"preset": "public"}')
    assert "public" in piped.stdout.decode() and _policy(env, sid)["preset"] == "public"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow-domain", "*.com"], "error: allow rule 1: '*.com' is too broad"),
        (["--allow-domain", "ok.test", "--allow-cidr", "300.1.2.3/8"], "allow rule 2"),
        (["--allow-cidr", "169.254.169.254"], "never reachable"),
        (["--allow-domain", "ok.test", "--port", "0"], "allow rule 1"),
        (["--preset", "all"], "Invalid value for '--preset'"),
        (["--preset", "none", "--file", "policy.json"], "not both"),
        ([], "no policy given"),
    ],
)
def test_a_bad_update_fails_by_name_and_keeps_the_old_policy(
    env: dict[str, str], sid: str, args: list[str], needle: str
) -> None:
    before = _policy(env, sid)
    res = corral(env, "net", "update", sid, *args, check=False)
    assert res.returncode == 2, res.stderr
    err = res.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert _policy(env, sid) == before


def test_a_bad_file_and_a_bad_create_fail_cleanly(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = corral(env, "net", "update", "sb-whatever", "--file", str(bad), check=False)
    assert res.returncode == 2 and b"is not JSON" in res.stderr
    before = json.loads(corral(env, "ls", "--json").stdout)
    res = corral(env, "create", "--template", TEMPLATE, "--allow-domain", "*", check=False)
    assert res.returncode == 2 and res.stderr.startswith(b"error: allow rule 1: '*'"), res.stderr
    assert json.loads(corral(env, "ls", "--json").stdout) == before


def _read_lines_until(proc: subprocess.Popen[bytes], needle: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while not any(needle in line for line in lines):
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not in {lines}"
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the follower ended early: {lines}"
            buf += chunk
            *done, rest = buf.split(b"\n")
            buf = rest
            lines += [d.decode() for d in done]
    return lines


def test_log_shows_a_refused_lookup_and_follow_ends_with_the_sandbox(
    env: dict[str, str], sid: str
) -> None:
    follower = subprocess.Popen(
        [CORRAL, "net", "log", sid, "--follow", "--json", "--interval", "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        corral(env, "exec", sid, "--", "nslookup blocked.test; true")
        lines = _read_lines_until(follower, "blocked.test", timeout=20)
        events = [json.loads(line) for line in lines]
        denied = [e for e in events if e["name"] and e["name"].startswith("blocked.test")]
        assert denied and denied[0]["kind"] == "dns" and denied[0]["decision"] == "deny"

        logged = json.loads(corral(env, "net", "log", sid, "--json").stdout)
        assert [e["id"] for e in logged][: len(events)] == [e["id"] for e in events]
        after = json.loads(
            corral(env, "net", "log", sid, "--json", "--after", str(denied[0]["id"])).stdout
        )
        assert all(e["id"] > denied[0]["id"] for e in after)
        table = corral(env, "net", "log", sid).stdout.decode()
        assert "blocked.test" in table and "deny" in table and "DECISION" in table

        corral(env, "kill", sid)
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        assert follower.stderr is not None
        err = follower.stderr.read()
        follower.stdout.close()  # type: ignore[union-attr]
        follower.stderr.close()
        assert b"Traceback" not in err, err


def test_url_follows_the_server_form(env: dict[str, str], sid: str, server: RunningServer) -> None:
    url = corral(env, "url", sid, "8000").stdout.decode().strip()
    domain = json.loads(corral(env, "info", sid, "--json").stdout)["ingress_domain"]
    if domain is None:
        assert url == f"{server.url}/sandboxes/{sid}/ports/8000/"
    else:
        assert url == f"http://8000-{sid}.{domain}:{urlsplit(server.url).port}/"
    token = json.loads(corral(env, "info", sid, "--json").stdout)["access_token"]
    with_token = corral(env, "url", sid, "8000", "--path", "/x?a=1", "--with-token").stdout
    assert with_token.decode().strip() == f"{url}x?a=1&corral_token={token}"
    res = corral(env, "url", sid, "0", check=False)
    assert res.returncode == 2 and res.stderr.startswith(b"error: ")
