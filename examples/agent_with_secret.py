"""Run Claude Code in a corral sandbox whose Anthropic API key never enters it.

The key is stored as a corral secret and bound to api.anthropic.com. Inside the sandbox,
``ANTHROPIC_API_KEY`` holds only a placeholder; corral's egress proxy swaps it for the key on the
wire, on its way to api.anthropic.com, and the sandbox may reach no other host. Claude Code is
uploaded as its native binary rather than installed from the internet, so that one host is all
its network policy has to allow.

Needs: a corral server (``CORRAL_URL`` and ``CORRAL_API_KEY``, or run it on the server's host),
your key in ``ANTHROPIC_API_KEY`` here (on the host), and Claude Code's linux-x64 binary here:
``make agent-cli`` puts it under tests/integration/agent_cli/node_modules (any other copy: set
``CLAUDE_BIN``). Then:

    python examples/agent_with_secret.py "Write fizzbuzz.py, run it, show the first 15 lines"

tests/integration/test_secrets_agent_example.py runs these same functions against a fake
Anthropic API and checks that the key went out on the wire and is nowhere in the sandbox.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corral import ExecResult, Sandbox, SecretBinding, secrets

API_HOST = "api.anthropic.com"
SECRET = "anthropic"
CLAUDE_BIN = Path(
    os.environ.get(
        "CLAUDE_BIN",
        Path(__file__).resolve().parents[1]
        / "tests/integration/agent_cli/node_modules/@anthropic-ai/claude-code-linux-x64/claude",
    )
)
# Where Claude Code's own installer puts it, for the sandbox's unprivileged user.
CLAUDE_PATH = "/home/user/.local/bin/claude"
# With these, Claude Code talks to the model API and nothing else (no telemetry, error reports,
# update checks or feature-flag fetches), so the network policy can allow that one host.
QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}


def agent_sandbox(
    secret: str = SECRET,
    api_host: str = API_HOST,
    env: Mapping[str, str] | None = None,
    **conn: Any,
) -> Sandbox:
    """A sandbox that may reach ``api_host`` only, with ``secret`` bound to it as
    ``ANTHROPIC_API_KEY`` (a placeholder inside; the value is put in on the wire)."""
    return Sandbox.create(
        "base",
        network={"allow": [{"domain": api_host}]},
        secrets=[SecretBinding(secret, [api_host], env="ANTHROPIC_API_KEY")],
        env={**QUIET, **(env or {})},
        # Claude Code alone takes ~200 MB, and what it runs needs room too.
        memory_mb=2048,
        timeout=1800,
        **conn,
    )


def install_claude(sbx: Sandbox, binary: Path = CLAUDE_BIN) -> None:
    """Upload the native binary (one file, ~400 MB; streamed, not read into memory)."""
    with binary.open("rb") as f:
        sbx.files.write(CLAUDE_PATH, f, mode=0o755, user="user")


def run_claude(sbx: Sandbox, prompt: str, *, timeout: float = 900) -> ExecResult:
    """Claude Code, non-interactive, with a JSON result on stdout. It may run any tool without
    asking: the sandbox is the boundary (it reaches only the model API and holds no key)."""
    return sbx.exec(
        [CLAUDE_PATH, "-p", prompt, "--output-format", "json", "--dangerously-skip-permissions"],
        cwd="/home/user",
        user="user",
        timeout=timeout,
    )


def main(prompt: str) -> int:
    # Stored encrypted by the server; never returned by any call (`corral secret rm anthropic`).
    secrets.set(SECRET, os.environ["ANTHROPIC_API_KEY"])
    with agent_sandbox() as sbx:
        install_claude(sbx)
        r = run_claude(sbx, prompt)
        if r.exit_code != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return 1
        print(json.loads(r.stdout)["result"])
        print(sbx.exec("ls -la /home/user").stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or "Say hello and tell me which OS you are running on."))
