"""`corral run --secret` keeps a key out of the sandbox (real bwrap, real proxy, fake internet): curl, Python and Claude Code inside hold a placeholder, the bound host receives the real value over TLS and nothing else does, and the value is in no environment, argument, file or memory inside."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.local.net import _system_bundles
from examples.agent_with_secret import CLAUDE_BIN
from tests.conftest import _descendants
from tests.integration.fake_hosts import DNS_IP, FakeModel
from tests.integration.fake_internet import FakeInternet
from tests.security.local_world import USER, World
from tests.security.local_world import results as _results
from tests.security.local_world import world as world  # the fixture: pytest looks for it here
from tests.security.test_secrets import SCAN

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "curl", "unshare")),
        reason="needs root (a mount namespace for the fake DNS), bwrap, curl and unshare",
    ),
]

PLACEHOLDER = re.compile(r"corral-secret-[0-9a-f]{40}-[0-9a-f]{20}")
PYTHON = "/usr/bin/python3"  # the system's: the sandbox's user may not reach this one
HOST = "api.allowed.test"
# The directory corral makes for a run (the network's socket dir and CA files are inside).
RUN_DIR = re.compile(r"/tmp/corral-local-[^/]+")


def _key(prefix: str = "sk") -> str:
    """A fresh value: a non-secret prefix (the search is given it) and a secret rest."""
    return f"{prefix}-{secrets.token_hex(4)}-{secrets.token_hex(24)}"


def _fake_machine(world: World, fake_net: FakeInternet) -> list[str]:
    """A prefix that runs a command as if this machine's resolver were the fake internet's and
    its trust store held the fake's CA as well: both files bound over the real ones in a mount
    namespace of its own (the sandbox inside sees them too; it has no DNS anyway)."""
    etc = world.base / "fake-etc"
    etc.mkdir(exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
    system = _system_bundles()[0]
    roots = Path(system).read_text()
    (etc / "bundle.crt").write_text(
        roots + ("" if roots.endswith("\n") else "\n") + fake_net.ca_pem
    )
    for f in etc.iterdir():
        f.chmod(0o644)
    script = 'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" "$3" && shift 3 && exec "$@"'
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        str(etc / "resolv.conf"), str(etc / "bundle.crt"), system,
    ]  # fmt: skip


def _corral_run(
    world: World,
    fake_net: FakeInternet,
    script: str,
    flags: Sequence[str],
    env: dict[str, str],
    *,
    inspect: bool = False,
    timeout: float = 240,
) -> tuple[subprocess.CompletedProcess[str], dict[str, bytes]]:
    """``corral run FLAGS -- sh -c SCRIPT`` on the fake machine, as the world's mode runs it.

    With ``inspect``, the script touches ``ready`` and waits for ``go``; in between, this
    returns what the host sees of the run's processes: each one's environment and command line
    (corral's own environment excepted: it is where the value lives) and every memfd they hold
    (the bwrap options among them). And once the run is over, the directory corral made for it
    (found through its descriptors: other runs may be going on) is gone."""
    cmd, environ = world.command(["sh", "-c", script], flags, env)
    proc = subprocess.Popen(
        [*_fake_machine(world, fake_net), *cmd],
        cwd=world.project,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, bytes] = {}
    made: set[str] = set()
    try:
        if inspect:
            deadline = time.monotonic() + timeout
            while not (world.project / "ready").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the command never got ready"
                time.sleep(0.05)
            seen = _host_view(proc.pid)
            made = {m[0] for k in seen if (m := RUN_DIR.match(k.split("/", 1)[1]))}
            assert made, list(seen)
            (world.project / "go").touch()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert [d for d in made if os.path.lexists(d)] == []
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def _host_view(corral: int) -> dict[str, bytes]:
    seen: dict[str, bytes] = {}
    for pid in sorted({corral, *_descendants(corral)}):
        names = ["cmdline"] if pid == corral else ["cmdline", "environ"]
        for name in names:
            with contextlib.suppress(OSError):
                seen[f"{pid}/{name}"] = Path(f"/proc/{pid}/{name}").read_bytes()
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                target = os.readlink(fd)
                # memfds are read; other files only named (the run's directory is among them)
                seen[f"{pid}/{target}"] = (
                    Path(fd).read_bytes() if target.startswith("/memfd:") else b""
                )
            except OSError:
                pass
    return seen


def _sent_since(fake_net: FakeInternet, before: int) -> list[dict[str, Any]]:
    return fake_net.requests()[before:]


def test_the_bound_host_gets_the_value_and_nothing_else_does(
    world: World, fake_net: FakeInternet
) -> None:
    value = _key()
    auth = '-H "Authorization: Bearer $K"'
    python = (
        f"{PYTHON} -c 'import os, urllib.request as u;"
        f' r = u.Request("https://{HOST}/python", headers={{"Authorization": "Bearer " + os.environ["K"]}});'
        " print(u.urlopen(r, timeout=20).status)'"
    )
    script = (
        'echo "placeholder=$K"\n'
        f"curl -sS -m 20 {auth} https://{HOST}/curl >/dev/null; echo curl=$?\n"
        # A program ignoring the variables: the system bundle's own path trusts the run's CA.
        f"curl -sS -m 20 --cacert /etc/ssl/certs/ca-certificates.crt {auth}"
        f" https://{HOST}/system-bundle >/dev/null; echo system=$?\n"
        f"echo python=$({python})\n"
        # Allowed but not bound: spliced untouched, the placeholder arrives as it is.
        f"curl -sS -m 20 {auth} https://www.allowed.test/unbound >/dev/null; echo unbound=$?\n"
        # A secret never crosses the network in clear: refused before anything is sent.
        f"curl -sS -m 20 -o /dev/null -w 'plain=%{{http_code}}\\n' {auth} http://{HOST}/plain\n"
        "touch ready; while [ ! -e go ]; do sleep 0.05; done\n"
    )
    flags = [
        "-v",
        "--allow-domain", "allowed.test",
        "--allow-domain", "*.allowed.test",
        "--secret", f"K:{HOST}",
    ]  # fmt: skip
    before = len(fake_net.requests())
    r, seen = _corral_run(world, fake_net, script, flags, {"K": value}, inspect=True)
    assert r.returncode == 0, r.stderr
    res = _results(r.stdout)
    placeholder = res["placeholder"]
    assert PLACEHOLDER.fullmatch(placeholder), r.stdout
    assert (res["curl"], res["system"], res["python"], res["unbound"], res["plain"]) == (
        "0",
        "0",
        "200",
        "0",
        "502",
    ), r.stdout + r.stderr

    sent = {str(q["path"]): q for q in _sent_since(fake_net, before)}
    for path in ("/curl", "/system-bundle", "/python"):
        assert sent[path]["host"] == HOST
        assert sent[path]["headers"]["authorization"] == f"Bearer {value}", sent[path]
    assert sent["/unbound"]["headers"]["authorization"] == f"Bearer {placeholder}"
    assert "/plain" not in sent
    # -v shows each injection (never the value).
    for method_path in ("GET /curl", "GET /system-bundle", "GET /python"):
        assert f"injected K: {HOST} {method_path}" in r.stderr, r.stderr
    assert value not in r.stdout + r.stderr

    # What the host sees of the run: the placeholder in the environments, the value nowhere
    # (bwrap's and every process's environment and arguments, bwrap's options memfd).
    assert any(k.endswith("/environ") and placeholder.encode() in v for k, v in seen.items())
    assert any(b"--args" in v for k, v in seen.items() if k.endswith("/cmdline")), list(seen)
    assert any("memfd:corral-bwrap-args" in k for k in seen), list(seen)
    assert [k for k, v in seen.items() if value.encode() in v] == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", ["root"], indirect=True)
@pytest.mark.skipif(
    not CLAUDE_BIN.is_file(),
    reason=f"Claude Code's binary is absent ({CLAUDE_BIN}): run `make agent-cli`",
)
def test_claude_code_completes_with_a_key_it_never_holds(
    world: World, fake_net: FakeInternet
) -> None:
    """The real Claude Code under ``--profile claude-code`` answers through the fake Anthropic
    API; then, with a second one kept alive after its answer, a search of the sandbox finds
    the key in no process's environment, no file it can read and no memory. Only as root
    dropping to the user (how CI runs): the search reads the whole visible file system."""
    value = _key("sk-ant")
    keys = fake_net.directory / "model-keys"  # the fake's accepted keys, on the host only
    with keys.open("a") as f:
        f.write(value + "\n")
    home = world.home
    (home / ".claude").mkdir()
    (home / ".claude.json").write_text("{}\n")
    (world.project / "scan.py").write_text(SCAN)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(home)], check=True)
    # Where the sandbox sees it: a checkout under /tmp (CI's clone) is behind the fresh tmpfs
    # the jail puts on /tmp. A hard link costs nothing; a copy where links cannot go.
    (home / "bin").mkdir()
    claude_path = home / "bin" / "claude"
    try:
        os.link(CLAUDE_BIN, claude_path)
    except OSError:
        shutil.copy2(CLAUDE_BIN, claude_path)
    claude = str(claude_path)
    prefix = value[: value.rindex("-") + 1]
    digest = hashlib.sha256(value.encode()).hexdigest()
    prompt = json.dumps({"type": "user", "message": {"role": "user", "content": "Hi."}})
    script = (
        'echo "placeholder=$ANTHROPIC_API_KEY"\n'
        "touch ready; while [ ! -e go ]; do sleep 0.05; done\n"
        f'{claude} -p "Say hello." --output-format json > hello.json 2> hello.err; echo hello=$?\n'
        # The fake is no rubber stamp: another key (no placeholder, nothing injected) is a 401.
        "curl -sS -m 20 -o /dev/null -w 'wrong=%{http_code}\\n' -H 'x-api-key: sk-x'"
        f' -d \'{{"model": "m"}}\' https://{HOST}{FakeModel.PATH}\n'
        # A second one that stays alive after its answer, reading prompts from an open pipe.
        f"(echo '{prompt}'; sleep 600) | {claude} -p --input-format stream-json"
        " --output-format stream-json --verbose > live.jsonl 2>&1 &\n"
        'i=0; until grep -q \'"type":"result"\' live.jsonl 2>/dev/null; do'
        " i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.1; done\n"
        # The search replaces the shell (same pid): the live agent is its child.
        f'exec {PYTHON} scan.py {prefix} {len(value)} {digest} "$ANTHROPIC_API_KEY"\n'
    )
    flags = [
        "-v",
        "--profile", "claude-code",
        # The fake API instead of api.anthropic.com; the profile's binding gets this host too.
        "--allow-domain", HOST,
        "--secret", f"ANTHROPIC_API_KEY:{HOST}",
    ]  # fmt: skip
    env = {
        "ANTHROPIC_API_KEY": value,
        "ANTHROPIC_BASE_URL": f"https://{HOST}",
        # A refused key fails at once instead of being retried for minutes.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    before = len(fake_net.requests())
    try:
        r, seen = _corral_run(world, fake_net, script, flags, env, inspect=True, timeout=800)
    finally:
        keys.write_text("".join(k + "\n" for k in keys.read_text().split() if k != value))
    assert r.returncode == 0, r.stdout + r.stderr
    res = _results(r.stdout)
    assert PLACEHOLDER.fullmatch(res["placeholder"]), r.stdout
    assert res["hello"] == "0", (world.project / "hello.err").read_text()
    hello = json.loads((world.project / "hello.json").read_text())
    assert (hello["is_error"], hello["result"]) == (False, FakeModel.TEXT), hello
    live = (world.project / "live.jsonl").read_text().splitlines()
    assert json.loads(live[-1])["result"] == FakeModel.TEXT, live[-5:]
    assert res["wrong"] == "401"

    # Every Messages API call reached the fake with the real key; nothing else was tried.
    sent = [q for q in _sent_since(fake_net, before) if q["headers"].get("x-api-key") != "sk-x"]
    assert sent, "Claude Code sent nothing to the fake API"
    assert {(q["host"], str(q["path"]).split("?")[0]) for q in sent} == {(HOST, FakeModel.PATH)}
    assert all(q["headers"]["x-api-key"] == value for q in sent), sent
    # No network denial (Claude Code's writes the jail refuses are its business here).
    assert "denied tcp" not in r.stderr and "denied dns" not in r.stderr, r.stderr
    assert f"injected ANTHROPIC_API_KEY: {HOST} POST {FakeModel.PATH}" in r.stderr

    # The search: the key nowhere; the placeholder seen in environments and memory, and the
    # memory of the agent itself (~200 MB) read.
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(found[where][0] == 0 for where in ("environ", "files", "memory")), found
    assert found["environ"][1] > 0 and found["memory"][1] > 0, found
    assert found["scanned"] > 50 << 20, found
    # And on the host: no process of the run had it in its environment or arguments.
    assert [k for k, v in seen.items() if value.encode() in v] == []
