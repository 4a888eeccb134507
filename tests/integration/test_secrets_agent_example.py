"""Claude Code runs in a sandbox against a fake Anthropic API with a key that never enters it.

The docs' example (examples/agent_with_secret.py) against the fake internet: its functions make
the sandbox (network: the API host only; the key bound to it as ``ANTHROPIC_API_KEY``), upload
Claude Code's native binary (``make agent-cli``) and run ``claude -p``. The fake API answers only
to the real key, so a completed run shows the proxy put it in; then the sandbox is searched for
the key without sending it there.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from corral import secrets as corral_secrets
from examples.agent_with_secret import (
    CLAUDE_BIN,
    CLAUDE_PATH,
    agent_sandbox,
    install_claude,
    run_claude,
)
from tests.conftest import Conn
from tests.integration.fake_hosts import FakeModel
from tests.integration.fake_internet import FakeInternet
from tests.security.test_secrets import SCAN

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("server_no_leaks"),
    pytest.mark.skipif(
        not CLAUDE_BIN.is_file(),
        reason=f"Claude Code's binary is absent ({CLAUDE_BIN}): run `make agent-cli`",
    ),
]

HOST = "api.allowed.test"
SEARCHED = ("environ", "files", "memory")
# Claude Code reading prompts as JSON lines from a pipe kept open after the first one.
LIVE_AGENT = (
    '(echo \'{"type": "user", "message": {"role": "user", "content": "Hi."}}\';'
    " sleep 600) | " + CLAUDE_PATH + " -p --input-format stream-json"
    " --output-format stream-json --verbose > /tmp/live.jsonl 2>&1"
)


@pytest.fixture
def model_key(conn: Conn, fake_net: FakeInternet) -> Iterator[tuple[str, str]]:
    """A secret (name, value) holding a fresh API key, which the fake API accepts until the end
    of the test. The key is written on the host only, into the fake's list of accepted keys."""
    name = f"anthropic-{secrets.token_hex(3)}"
    # A non-secret prefix (the scan is given it to find candidates) and a secret rest.
    value = f"sk-ant-{secrets.token_hex(4)}-{secrets.token_hex(24)}"
    keys = fake_net.directory / "model-keys"
    with keys.open("a") as f:
        f.write(value + "\n")
    corral_secrets.set(name, value, **conn)
    try:
        yield name, value
    finally:
        corral_secrets.delete(name, **conn)
        keys.write_text("".join(k + "\n" for k in keys.read_text().split() if k != value))


def test_claude_code_completes_with_a_key_it_never_holds(
    conn: Conn, fake_net: FakeInternet, model_key: tuple[str, str]
) -> None:
    name, value = model_key
    before = len(fake_net.requests())
    sbx = agent_sandbox(
        name,
        HOST,
        # Toward the fake instead of api.anthropic.com; and a wrong key fails at once instead
        # of being retried for minutes (Claude Code retries a 401 too).
        env={"ANTHROPIC_BASE_URL": f"https://{HOST}", "CLAUDE_CODE_MAX_RETRIES": "0"},
        **conn,
    )
    try:
        info = sbx.info().raw
        (binding,) = info["secrets"]
        placeholder = binding["placeholder"]
        assert (binding["name"], binding["hosts"], binding["env"]) == (
            name,
            [HOST],
            "ANTHROPIC_API_KEY",
        )
        install_claude(sbx, CLAUDE_BIN)
        r = run_claude(sbx, "Say hello.", timeout=240)
        assert r.exit_code == 0, r.stdout + r.stderr
        result = json.loads(r.stdout)
        assert (result["is_error"], result["result"]) == (False, FakeModel.TEXT), result
        # A second one stays alive after its answer (it waits for more input), so that the
        # memory scan below covers an agent that has just talked to the API.
        sbx.exec(["sh", "-c", LIVE_AGENT], user="user", cwd="/home/user", background=True)
        live = sbx.exec(
            'for i in $(seq 600); do grep -q \'"type":"result"\' /tmp/live.jsonl && break;'
            " sleep 0.1; done; tail -n 1 /tmp/live.jsonl",
            timeout=120,
        )
        assert json.loads(live.stdout)["result"] == FakeModel.TEXT, live.stdout + live.stderr

        # What reached the fake internet while it ran: model API calls only, each with the key.
        sent: list[dict[str, Any]] = fake_net.requests()[before:]
        assert sent, "Claude Code sent nothing to the fake API"
        assert {(q["host"], str(q["path"]).split("?")[0]) for q in sent} == {
            (HOST, FakeModel.PATH)
        }, sent
        assert all(q["headers"]["x-api-key"] == value for q in sent)
        # ... and it tried no other host: nothing was refused (no telemetry, no update check).
        log = sbx.network.log()
        assert [e for e in log if e.decision == "deny"] == [], log
        injected = [e for e in log if e.kind == "inject"]
        assert injected and all(e.name == HOST and name in e.reason for e in injected), log
        # The fake is no rubber stamp: any other key is refused, as the real API would.
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-d", '{"model": "m"}']
        wrong = sbx.exec(
            [*curl, "-H", "x-api-key: sk-x", f"https://{HOST}{FakeModel.PATH}"], timeout=60
        )
        assert wrong.stdout == "401", wrong.stdout + wrong.stderr

        # Inside, the variable is the placeholder, and the key is nowhere: every process's
        # environment, every file (Claude Code's ~/.claude included), every live process's memory.
        out = sbx.exec("printenv ANTHROPIC_API_KEY", user="user")
        assert out.stdout.strip() == placeholder
        sbx.files.write("/tmp/scan.py", SCAN, mode=0o644)
        prefix = value[: value.rindex("-") + 1]
        digest = hashlib.sha256(value.encode()).hexdigest()
        found = {}
        # Once as each user: root here lacks CAP_SYS_PTRACE, so it cannot read the environ or
        # memory of the agent's processes (uid 1000), and the user cannot read root's.
        for who in ("root", "user"):
            scan = sbx.exec(
                f"python3 /tmp/scan.py {prefix} {len(value)} {digest} {placeholder}",
                user=who,
                timeout=300,
            )
            assert scan.exit_code == 0, scan.stdout + scan.stderr
            found[who] = json.loads(scan.stdout.strip().splitlines()[-1])
        assert all(f[where][0] == 0 for f in found.values() for where in SEARCHED), found
        # The search did see what is there: the placeholder in the agent's environment and
        # memory, and the agent's memory itself (~200 MB).
        agent = found["user"]
        assert agent["environ"][1] > 0 and agent["memory"][1] > 0, found
        assert agent["scanned"] > 50 << 20, found
    finally:
        sbx.kill()
