"""The ``corral`` command end to end: a real binary against a real server and real sandboxes of
both isolation tiers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from tests.integration.cli_harness import CORRAL, TEMPLATE, corral
from tests.integration.server_harness import (
    network_config_for_tests,
    release_data_dir,
)
from tests.integration.tiers import cli_args

pytestmark = pytest.mark.integration


@pytest.fixture
def sid(env: dict[str, str], isolation: dict[str, Any]) -> Iterator[str]:
    sandbox_id = corral(
        env, "create", "--template", TEMPLATE, "--timeout", "600", *cli_args(isolation)
    ).stdout
    sandbox_id_text = sandbox_id.decode().strip()
    yield sandbox_id_text
    corral(env, "kill", sandbox_id_text, check=False)


def test_create_ls_info_kill(env: dict[str, str], isolation: dict[str, Any]) -> None:
    tag = os.urandom(4).hex()
    created = corral(
        env, "create", "--template", TEMPLATE, "--metadata", f"t={tag}", "--env", "A=1",
        "--timeout", "300", "--json", *cli_args(isolation),
    )  # fmt: skip
    obj = json.loads(created.stdout)
    sandbox_id = obj["id"]
    assert obj["state"] == "running" and obj["metadata"] == {"t": tag}
    assert obj["runtime"] == isolation.get("isolation", "container")

    listed = json.loads(corral(env, "ls", "--metadata", f"t={tag}", "--json").stdout)
    assert [s["id"] for s in listed] == [sandbox_id]
    table = corral(env, "ls", "--metadata", f"t={tag}").stdout.decode()
    assert sandbox_id in table and "running" in table

    info = json.loads(corral(env, "info", sandbox_id, "--json").stdout)
    assert info["env_keys"] == ["A"]
    assert sandbox_id in corral(env, "info", sandbox_id).stdout.decode()

    killed = json.loads(corral(env, "kill", sandbox_id, "--json").stdout)
    assert killed == [{"id": sandbox_id, "killed": True}]
    assert (
        json.loads(
            corral(env, "ls", "--state", "running", "--metadata", f"t={tag}", "--json").stdout
        )
        == []
    )


def test_exec_streams_and_exits_with_the_command_status(env: dict[str, str], sid: str) -> None:
    res = corral(env, "exec", sid, "--", "echo out; echo err >&2; exit 3", check=False)
    assert (res.stdout, res.stderr, res.returncode) == (b"out\n", b"err\n", 3)
    argv = corral(
        env, "exec", sid, "--env", "X=y z", "--cwd", "/tmp", "--", "sh", "-c", 'echo "$X" $(pwd)'
    )
    assert argv.stdout == b"y z /tmp\n"
    binary = corral(env, "exec", sid, "--", "printf '\\000\\377'")
    assert binary.stdout == b"\x00\xff"
    piped = corral(env, "exec", sid, "-i", "--", "cat", input="from stdin ✓\n".encode())
    assert piped.stdout == "from stdin ✓\n".encode()
    as_json = json.loads(corral(env, "exec", sid, "--json", "--", "echo hi", check=False).stdout)
    assert as_json["stdout"] == "hi\n" and as_json["exit_code"] == 0


def test_exec_failures(env: dict[str, str], sid: str) -> None:
    timeout = corral(env, "exec", sid, "--timeout", "1", "--", "sleep 30", check=False)
    assert timeout.returncode == 1 and timeout.stderr.startswith(b"error: ")
    missing = corral(env, "exec", sid, "--", "/no/such/program", "arg", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith(b"error: ")
    unknown = corral(env, "exec", "sb-nope", "--", "true", check=False)
    assert unknown.returncode == 1 and unknown.stderr.startswith(b"error: ")
    bad_key = corral({**env, "CORRAL_API_KEY": "nope"}, "ls", check=False)
    assert bad_key.returncode == 1 and bad_key.stderr.count(b"\n") == 1


def test_cp_files_and_directories_both_ways(env: dict[str, str], sid: str, tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("one\n")
    os.chmod(f, 0o750)
    corral(env, "cp", str(f), f"{sid}:/root/one.txt")
    assert corral(env, "exec", sid, "--", "cat /root/one.txt").stdout == b"one\n"
    corral(env, "exec", sid, "--", "mkdir -p /data")
    corral(env, "cp", str(f), f"{sid}:/data")  # an existing directory: copied into it
    assert corral(env, "exec", sid, "--", "cat /data/one.txt").stdout == b"one\n"

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "c.txt").write_text("deep\n")
    corral(env, "cp", str(tree), f"{sid}:/srv/tree")
    assert corral(env, "exec", sid, "--", "cat /srv/tree/a/b/c.txt").stdout == b"deep\n"

    back = tmp_path / "back.txt"
    corral(env, "cp", f"{sid}:/data/one.txt", str(back))
    assert back.read_text() == "one\n" and back.stat().st_mode & 0o777 == 0o750
    out = tmp_path / "out"
    out.mkdir()
    corral(env, "cp", f"{sid}:/srv/tree", str(out))  # into an existing local directory
    assert (out / "tree" / "a" / "b" / "c.txt").read_text() == "deep\n"

    missing = corral(env, "cp", f"{sid}:/nope", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1 and missing.stderr.startswith(b"error: ")
    assert not (tmp_path / "x").exists()


def test_template_list(env: dict[str, str]) -> None:
    names = {t["name"]: t for t in json.loads(corral(env, "template", "list", "--json").stdout)}
    assert names[TEMPLATE]["built"] is True
    assert TEMPLATE in corral(env, "template", "list").stdout.decode()


def test_shell_with_piped_input(env: dict[str, str], sid: str) -> None:
    res = corral(
        env, "shell", sid, "--cmd", "/bin/sh", input=b"echo hi-$((1+1))\nexit 6\n", check=False
    )
    assert res.returncode == 6, res.stderr
    assert b"hi-2" in res.stdout


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _expect(master: int, needle: bytes, seen: bytearray, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not in {bytes(seen)!r}"
        if select.select([master], [], [], left)[0]:
            with contextlib.suppress(OSError):
                seen += os.read(master, 65536)


def test_shell_on_a_real_terminal_resizes_and_restores_it(env: dict[str, str], sid: str) -> None:
    master, slave = pty.openpty()
    _set_size(slave, 31, 101)
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [CORRAL, "shell", sid], env=env, stdin=slave, stdout=slave,  # the login shell
        stderr=slave, start_new_session=True,
    )  # fmt: skip
    seen = bytearray()
    try:
        os.write(master, b"stty size; echo mark-$((3*3))\n")
        _expect(master, b"mark-9", seen)
        assert b"31 101" in seen
        # Raw mode: the local terminal no longer echoes or cooks input itself.
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        _set_size(slave, 45, 120)
        proc.send_signal(signal.SIGWINCH)
        time.sleep(0.3)
        os.write(master, b"stty size\n")
        _expect(master, b"45 120", seen)
        os.write(master, b"exit 4\n")
        assert proc.wait(timeout=30) == 4
        assert termios.tcgetattr(slave) == before  # the terminal is given back as it was
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_command_starts_a_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Host objects of its own (never the default names a real server on this host would use);
    # release_data_dir finds them through this file.
    config = data_dir / "server.json"
    config.write_text(json.dumps({"network": network_config_for_tests(None)}))
    url = f"http://127.0.0.1:{_free_port()}"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [CORRAL, "server", "--listen", url.removeprefix("http://"), "--data-dir", str(data_dir),
         "--config", str(config)],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not answer within 60 s"
            time.sleep(0.1)
        # Zero configuration on the server's host: the key is found in the data dir.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(CORRAL_URL=url, CORRAL_DATA_DIR=str(data_dir))
        assert json.loads(corral(env, "ls", "--json").stdout) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        release_data_dir(data_dir)
