"""The real agent binary, run as pid 1 of a fresh pid namespace, does exec, processes, PTYs, files and tar through AgentClient."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import struct
import tarfile
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.agent import (
    AgentClient,
    ExecRequest,
    OutputEvent,
    agent_binary_path,
    download_tar,
    upload_tar,
)
from corral.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RuntimeFailure,
    SandboxNotRunningError,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("gcc") is None,
        reason="needs root, unshare and gcc",
    ),
]

MiB = 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Agent:
    client: AgentClient
    sock: Path
    host_pid: int  # the agent's pid as the host sees it (it is pid 1 inside)
    work: Path  # a scratch directory for file tests


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _die_with_parent() -> None:
    # Even if pytest itself is killed, `unshare` (and with it the agent's namespace) goes too.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    binary = agent_binary_path()
    base = Path(tempfile.mkdtemp(prefix="corral-agent-test-"))
    sock = base / "agent.sock"
    work = base / "work"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CORRAL_BASE": "base", "HOME": "/x"}
    # A private pid namespace makes the agent a real init (orphans are reparented to it) and
    # killing `unshare` takes everything the test started down with it.
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", "--kill-child=SIGKILL", str(binary), "--listen", str(sock),
        env=env, preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        client = AgentClient(lambda: asyncio.open_unix_connection(str(sock)))
        deadline = time.monotonic() + 5
        while True:
            try:
                await client.ping()
                break
            except SandboxNotRunningError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        kids = _children(proc.pid)
        assert len(kids) == 1
        yield Agent(client, sock, kids[0], work)
    finally:
        # Killing the agent (pid 1 inside) kills its whole namespace; `unshare` reaps it.
        kids = _children(proc.pid)
        for pid in kids or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(base, ignore_errors=True)


async def collect(events: AsyncIterator[OutputEvent]) -> tuple[bytes, bytes, int | None]:
    out, err, code = bytearray(), bytearray(), None
    async for ev in events:
        if ev.kind == "stdout":
            out += ev.data
        elif ev.kind == "stderr":
            err += ev.data
        else:
            code = ev.exit_code
    return bytes(out), bytes(err), code


async def run(agent: Agent, req: ExecRequest) -> tuple[bytes, bytes, int | None]:
    _, events = await agent.client.exec_stream(req)
    return await asyncio.wait_for(collect(events), 30)


async def until(pred: object, timeout: float = 5.0) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time: {getattr(pred, '__doc__', '')}")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- exec


async def test_ping(agent: Agent) -> None:
    info = await agent.client.ping()
    assert info["version"] and info["protocol"] == "1"


async def test_exec_output_and_exit_code(agent: Agent) -> None:
    out, err, code = await run(agent, ExecRequest(["sh", "-c", "echo out; echo err >&2; exit 7"]))
    assert (out, err, code) == (b"out\n", b"err\n", 7)


async def test_argv_is_not_parsed_by_a_shell(agent: Agent) -> None:
    out, _, code = await run(agent, ExecRequest(["printf", "%s|", "a b", "$HOME", "*", "; id"]))
    assert (out, code) == (b"a b|$HOME|*|; id|", 0)


async def test_exec_failures_are_synchronous_errors(agent: Agent, tmp_path: Path) -> None:
    c = agent.client
    with pytest.raises(InvalidRequestError, match="command not found: no-such-cmd"):
        await c.spawn(ExecRequest(["no-such-cmd"]))
    with pytest.raises(InvalidRequestError, match="command not found: /no/such"):
        await c.exec_stream(ExecRequest(["/no/such"]))
    with pytest.raises(InvalidRequestError, match="cannot change directory to /nope"):
        await c.spawn(ExecRequest(["true"], cwd="/nope"))
    with pytest.raises(InvalidRequestError, match="unknown user: no-such-user"):
        await c.spawn(ExecRequest(["true"], user="no-such-user"))
    script = agent.work / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(InvalidRequestError, match="permission denied"):
        await c.spawn(ExecRequest([str(script)]))
    with pytest.raises(InvalidRequestError):
        await c.spawn(ExecRequest([]))
    with pytest.raises(InvalidRequestError):
        await c.spawn(ExecRequest(["a\0b"]))
    assert await c.list_processes() == []


async def test_user_switch_and_environment(agent: Agent) -> None:
    script = (
        'echo "$(id -u) $(id -g) $HOME $USER $LOGNAME $(pwd)"; echo "$CORRAL_BASE $EXTRA $PATH"'
    )
    out, _, code = await run(
        agent, ExecRequest(["sh", "-c", script], user="nobody", env={"EXTRA": "x y"})
    )
    lines = out.decode().splitlines()
    assert code == 0
    # nobody's home does not exist, so the cwd falls back to /.
    assert lines[0] == "65534 65534 /nonexistent nobody nobody /"
    assert lines[1] == f"base x y {os.environ.get('PATH', '/usr/bin:/bin')}"
    out, _, _ = await run(agent, ExecRequest(["sh", "-c", "id -u; echo $HOME; pwd"], user="0"))
    assert out.decode().split() == ["0", "/root", "/root"]
    out, _, _ = await run(agent, ExecRequest(["pwd"], cwd="/tmp", env={"HOME": "/override"}))
    assert out == b"/tmp\n"
    out, _, _ = await run(agent, ExecRequest(["id", "-G"], user="root"))
    assert b"0" in out.split()


async def test_default_path_when_none_is_given(agent: Agent) -> None:
    # The agent's own environment has a PATH; an exec without one in either falls back.
    out, _, _ = await run(agent, ExecRequest(["sh", "-c", "echo $PATH"], env={"PATH": "/bin"}))
    assert out == b"/bin\n"


async def test_stdin_write_and_close(agent: Agent) -> None:
    c = agent.client
    pid, events = await c.exec_stream(ExecRequest(["cat"]))
    # Read while writing: cat blocks on a full stdout otherwise (backpressure, by design).
    output = asyncio.create_task(collect(events))
    await c.write_stdin(pid, b"hello ")
    await c.write_stdin(pid, b"x" * (3 * MiB))  # more than one request and than a pipe buffer
    await c.close_stdin(pid)
    out, _, code = await asyncio.wait_for(output, 30)
    assert out == b"hello " + b"x" * (3 * MiB) and code == 0
    out, _, code = await run(agent, ExecRequest(["cat"], stdin=False))
    assert (out, code) == (b"", 0)
    with pytest.raises(ConflictError):
        await c.write_stdin(pid, b"late")
    with pytest.raises(NotFoundError):
        await c.write_stdin(999999, b"x")


async def test_large_output_with_a_slow_reader_is_lossless_and_bounded(agent: Agent) -> None:
    data = os.urandom(50 * MiB)
    blob = agent.work / "blob"
    blob.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    del data
    pid, events = await agent.client.exec_stream(ExecRequest(["cat", str(blob)]))
    # Do not read for a while: the agent must pause the pipe, not buffer 50 MiB.
    await asyncio.sleep(1.0)
    assert _rss_kib(agent.host_pid) < 16 * 1024
    procs = await agent.client.list_processes()
    assert [p.running for p in procs if p.pid == pid] == [True]
    h = hashlib.sha256()
    got = 0
    async for ev in events:
        if ev.kind == "stdout":
            h.update(ev.data)
            got += len(ev.data)
            if got < 5 * MiB:
                await asyncio.sleep(0.001)
        elif ev.kind == "exit":
            assert ev.exit_code == 0
    assert got == 50 * MiB and h.hexdigest() == want


async def test_signal_death_and_wait(agent: Agent) -> None:
    c = agent.client
    pid = await c.spawn(ExecRequest(["sleep", "100"]))
    await c.signal(pid, signal.SIGTERM)
    assert await asyncio.wait_for(c.wait(pid), 10) == 128 + signal.SIGTERM
    _, _, code = await run(agent, ExecRequest(["sh", "-c", "kill -KILL $$"]))
    assert code == 128 + signal.SIGKILL
    with pytest.raises(ConflictError):
        await c.signal(pid, signal.SIGTERM)
    with pytest.raises(InvalidRequestError):
        await c.signal(pid, 0)
    with pytest.raises(NotFoundError):
        await c.wait(999999)


async def test_signal_reaches_the_whole_process_group(agent: Agent) -> None:
    c = agent.client
    pid = await c.spawn(ExecRequest(["sh", "-c", "sleep 100 & sleep 100 & wait"]))
    await until(lambda: len(_children(agent.host_pid)) >= 1)
    await asyncio.sleep(0.2)
    await c.signal(pid, signal.SIGKILL)
    assert await asyncio.wait_for(c.wait(pid), 10) == 128 + signal.SIGKILL
    # The sleeps were in the same group: nothing of the group is left.
    await until(lambda: _children(agent.host_pid) == [])


async def test_background_process_list_attach_replay_stdin(agent: Agent) -> None:
    c = agent.client
    pid = await c.spawn(
        ExecRequest(["sh", "-c", "echo started; read x; echo got $x >&2; exit 4"], tag="job-1")
    )
    await asyncio.sleep(0.2)
    [info] = [p for p in await c.list_processes() if p.pid == pid]
    assert info.running and info.tag == "job-1" and info.exit_code is None and not info.pty
    assert info.argv[0] == "sh" and info.user == "root" and info.cwd == "/root"
    assert abs(info.started_at - time.time()) < 10
    events = c.attach(pid)
    first = await events.__anext__()
    assert first == OutputEvent("stdout", b"started\n")
    await c.write_stdin(pid, b"hello\n")
    out, err, code = await asyncio.wait_for(collect(events), 10)
    assert (out, err, code) == (b"", b"got hello\n", 4)
    [info] = [p for p in await c.list_processes() if p.pid == pid]
    assert not info.running and info.exit_code == 4
    # After the exit, attach replays everything and ends with the exit event again.
    assert await collect(c.attach(pid)) == (b"started\n", b"got hello\n", 4)
    assert await collect(c.attach(pid, replay=False)) == (b"", b"", 4)
    with pytest.raises(NotFoundError):
        await collect(c.attach(999999))


async def test_replay_keeps_the_last_mebibyte(agent: Agent) -> None:
    c = agent.client
    pid = await c.spawn(
        ExecRequest(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a; echo END"])
    )
    assert await c.wait(pid) == 0
    out, _, code = await collect(c.attach(pid))
    assert code == 0 and len(out) == MiB and out.endswith(b"aaaEND\n")


async def test_closing_exec_stream_kills_the_process_group(agent: Agent) -> None:
    c = agent.client
    pid, events = await c.exec_stream(ExecRequest(["sh", "-c", "sleep 100 & sleep 100; wait"]))
    await asyncio.sleep(0.2)
    await events.aclose()
    assert await asyncio.wait_for(c.wait(pid), 10) == 128 + signal.SIGKILL
    await until(lambda: _children(agent.host_pid) == [])


async def test_pty(agent: Agent) -> None:
    c = agent.client
    pid, events = await c.exec_stream(ExecRequest(["sh"], pty=(24, 80), env={"PS1": "$ "}))
    buf = bytearray()
    exit_codes: list[int | None] = []

    async def reader() -> None:
        async for ev in events:
            if ev.kind == "stdout":
                buf.extend(ev.data)
            elif ev.kind == "exit":
                exit_codes.append(ev.exit_code)

    task = asyncio.create_task(reader())
    try:
        # The quotes keep the terminal's echo of the command from matching its output.
        await c.write_stdin(pid, b'echo h""i\n')
        await until(lambda: b"hi\r\n" in buf)
        await c.resize(pid, 40, 100)
        await c.write_stdin(pid, b"stty size; tty\n")
        await until(lambda: b"40 100" in buf)
        assert re.search(rb"/dev/pts/\d+", bytes(buf))
        [info] = [p for p in await c.list_processes() if p.pid == pid]
        assert info.pty
        await c.write_stdin(pid, b"exit 3\n")
        await asyncio.wait_for(task, 10)
        assert exit_codes == [3]
    finally:
        task.cancel()
        await events.aclose()
    with pytest.raises(InvalidRequestError):
        await c.resize(await c.spawn(ExecRequest(["true"])), 10, 10)


async def test_pty_close_stdin_sends_eof(agent: Agent) -> None:
    c = agent.client
    pid, events = await c.exec_stream(ExecRequest(["cat"], pty=(24, 80)))
    await c.write_stdin(pid, b"abc\n")
    await c.close_stdin(pid)
    out, _, code = await asyncio.wait_for(collect(events), 10)
    assert code == 0 and b"abc" in out


async def test_exit_is_reported_while_a_descendant_holds_the_pipes(agent: Agent) -> None:
    t = time.monotonic()
    out, _, code = await run(agent, ExecRequest(["sh", "-c", "echo before; sleep 30 & exit 5"]))
    assert (out, code) == (b"before\n", 5)
    assert time.monotonic() - t < 5


async def test_a_descendant_flooding_the_pipe_does_not_hold_back_the_exit(agent: Agent) -> None:
    t = time.monotonic()
    out, _, code = await run(agent, ExecRequest(["sh", "-c", "yes & sleep 0.2; exit 2"]))
    assert code == 2 and out.startswith(b"y\n")
    assert time.monotonic() - t < 10
    assert (await agent.client.ping())["protocol"] == "1"
    # With its pipe closed, `yes` dies of SIGPIPE and is reaped.
    await until(lambda: _children(agent.host_pid) == [])


async def test_many_concurrent_execs(agent: Agent) -> None:
    async def one(i: int) -> None:
        out, err, code = await run(
            agent, ExecRequest(["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 7}"])
        )
        assert (out, err, code) == (f"{i}\n".encode(), f"e{i}\n".encode(), i % 7)

    await asyncio.gather(*(one(i) for i in range(60)))


async def test_listen_fd_mode() -> None:
    base = Path(tempfile.mkdtemp(prefix="corral-agent-test-"))
    path = str(base / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    fd = listener.fileno()
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", "--kill-child=SIGKILL",
        str(agent_binary_path()), "--listen-fd", str(fd),
        pass_fds=(fd,), preexec_fn=_die_with_parent,
    )  # fmt: skip
    listener.close()  # the agent has its own copy now
    try:
        client = AgentClient(lambda: asyncio.open_unix_connection(path))
        assert (await client.ping())["protocol"] == "1"
        out, _, code = await collect(
            (await client.exec_stream(ExecRequest(["ls", "/proc/self/fd"])))[1]
        )
        assert code == 0 and sorted(int(x) for x in out.split()) == [0, 1, 2, 3]
    finally:
        for pid in _children(proc.pid) or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox-static")
async def test_bare_rootfs_without_shell_passwd_or_dev() -> None:
    """Chrooted into a root holding only the agent and one static binary."""
    root = Path(tempfile.mkdtemp(prefix="corral-agent-test-"))
    busybox = shutil.which("busybox")
    assert busybox is not None
    (root / "bin").mkdir()
    shutil.copy(busybox, root / "bin/busybox")
    shutil.copy(agent_binary_path(), root / "agent")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", "--kill-child=SIGKILL", f"--root={root}", "/agent", "--listen", "/s",
        env={}, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        client = AgentClient(lambda: asyncio.open_unix_connection(str(root / "s")))
        await until(lambda: (root / "s").exists())
        out, _, code = await collect(
            (await client.exec_stream(ExecRequest(["busybox", "echo", "hi"])))[1]
        )
        assert (out, code) == (b"hi\n", 0)
        # No /etc/passwd: root is uid 0 with HOME /root, and the cwd falls back to /.
        script = ["busybox", "sh", "-c", "echo $HOME $USER $PATH; busybox pwd; busybox id -u"]
        out, _, _ = await collect((await client.exec_stream(ExecRequest(script)))[1])
        assert out.decode().split() == ["/root", "root", DEFAULT_PATH, "/", "0"]
        with pytest.raises(InvalidRequestError, match="unknown user"):
            await client.spawn(ExecRequest(["busybox"], user="nobody"))
        info = await client.write_file("/data/f", chunks_of(b"x"), user="1234")
        assert (info.uid, info.gid) == (1234, 1234)
        assert [e.name for e in await client.list_dir("/data")] == ["f"]
    finally:
        for pid in _children(proc.pid) or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(root, ignore_errors=True)


async def test_orphans_are_reaped(agent: Agent) -> None:
    script = "for i in 1 2 3 4 5; do (sleep 0.2 &) ; done; sh -c 'sleep 0.1 &'; exit 0"
    _, _, code = await run(agent, ExecRequest(["sh", "-c", script]))
    assert code == 0
    await asyncio.sleep(0.3)
    await until(lambda: _children(agent.host_pid) == [])
    for pid in _children(agent.host_pid):
        assert _state(pid) != "Z"


async def test_exited_processes_are_pushed_out_by_newer_ones(agent: Agent) -> None:
    c = agent.client
    pids = []
    for _ in range(70):
        pid = await c.spawn(ExecRequest(["true"]))
        assert await c.wait(pid) == 0
        pids.append(pid)
    listed = [p.pid for p in await c.list_processes()]
    assert listed == pids[-64:]
    running = await c.spawn(ExecRequest(["sleep", "100"]))
    assert running in [p.pid for p in await c.list_processes()]


async def test_agent_ignores_signals_from_inside(agent: Agent) -> None:
    for sig in ("TERM", "INT", "HUP", "USR1"):
        _, _, code = await run(agent, ExecRequest(["kill", f"-{sig}", "1"]))
        assert code == 0
    assert (await agent.client.ping())["protocol"] == "1"


async def test_processes_inherit_no_agent_fds(agent: Agent) -> None:
    out, _, _ = await run(agent, ExecRequest(["ls", "/proc/self/fd"]))
    # 0, 1, 2 and the fd ls itself opened to read the directory.
    assert sorted(int(x) for x in out.split()) == [0, 1, 2, 3]


async def _raw(agent: Agent, data: bytes, *, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(agent.sock))
    writer.write(data)
    await writer.drain()
    got = b""
    if read:
        with contextlib.suppress(ConnectionError):
            got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return got


async def test_agent_survives_garbage_and_disconnects(agent: Agent) -> None:
    c = agent.client
    # Garbage: refused with an error frame (type 129) or a closed stream, never a crash.
    reply = await _raw(agent, b"\xff" + os.urandom(10000))
    assert reply == b"" or reply[4] == 129
    reply = await _raw(agent, struct.pack(">IB", 0xFFFFFFFF, 2))  # a 4 GiB frame
    assert reply[4] == 129 and b"exceeds" in reply
    reply = await _raw(agent, struct.pack(">IB", 5, 2) + b"\x01\x00\x00\x00\xff")  # bad field
    assert reply[4] == 129
    reply = await _raw(agent, struct.pack(">IB", 0, 77))  # unknown type
    assert reply[4] == 129
    await _raw(agent, struct.pack(">IB", 100, 2) + b"short", read=False)  # truncated
    await _raw(agent, b"\x00\x00", read=False)
    # A connection dropped in the middle of a streamed write leaves no file behind.
    target = agent.work / "never"
    path = str(target).encode()
    write_req = b"\x0d" + struct.pack(">I", len(path)) + path
    await _raw(
        agent,
        struct.pack(">IB", len(write_req), 19) + write_req + struct.pack(">IB", 3, 32) + b"abc",
        read=False,
    )
    # Many connections opened and dropped at once.
    socks = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(agent.sock))
        socks.append(s)
    for s in socks:
        s.close()
    assert (await c.ping())["protocol"] == "1"
    out, _, code = await run(agent, ExecRequest(["echo", "alive"]))
    assert (out, code) == (b"alive\n", 0)
    await until(lambda: not any(p.name.startswith(".never") for p in agent.work.iterdir()))
    assert not target.exists()


async def test_unreachable_agent_is_sandbox_not_running(tmp_path: Path) -> None:
    client = AgentClient(lambda: asyncio.open_unix_connection(str(tmp_path / "nothing")))
    with pytest.raises(SandboxNotRunningError):
        await client.ping()


async def test_garbled_agent_reply_is_runtime_failure(tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(struct.pack(">IB", 50 * MiB, 128))  # a frame larger than any allowed
        await writer.drain()
        writer.close()

    path = str(tmp_path / "fake.sock")
    server = await asyncio.start_unix_server(handle, path)
    async with server:
        client = AgentClient(lambda: asyncio.open_unix_connection(path))
        with pytest.raises(RuntimeFailure):
            await client.ping()


# ----------------------------------------------------------------------------- files


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def read_all(agent: Agent, path: str, **kw: str) -> bytes:
    return b"".join([c async for c in agent.client.read_file(path, **kw)])


async def test_file_operations(agent: Agent) -> None:
    c = agent.client
    w = agent.work
    info = await c.write_file(f"{w}/a/b/file.txt", chunks_of(b"hello ", b"world"), mode=0o640)
    assert (info.name, info.type, info.size, info.mode) == ("file.txt", "file", 11, 0o640)
    assert info.path == f"{w}/a/b/file.txt" and info.uid == 0
    assert await read_all(agent, f"{w}/a/b/file.txt") == b"hello world"
    # Overwrite replaces the content and the owner.
    info = await c.write_file(f"{w}/a/b/file.txt", chunks_of(b"x"), user="nobody")
    assert (info.size, info.uid, info.gid, info.mode) == (1, 65534, 65534, 0o644)
    assert (w / "a/b/file.txt").read_bytes() == b"x"
    # Empty file.
    assert (await c.write_file(f"{w}/empty", chunks_of())).size == 0
    assert await read_all(agent, f"{w}/empty") == b""

    st = await c.stat(f"{w}/a")
    assert st.type == "dir" and st.name == "a"
    assert abs(st.mtime - (w / "a").stat().st_mtime) < 1e-3
    with pytest.raises(NotFoundError):
        await c.stat(f"{w}/missing")
    with pytest.raises(NotFoundError):
        await read_all(agent, f"{w}/missing")
    with pytest.raises(InvalidRequestError):
        await read_all(agent, f"{w}/a")
    with pytest.raises(InvalidRequestError):
        await c.stat("relative/path")

    d = await c.mkdir(f"{w}/m/n/o", user="nobody")
    assert d.type == "dir" and d.uid == 65534
    assert (w / "m").stat().st_uid == 65534
    assert (await c.mkdir(f"{w}/m/n/o")).type == "dir"  # parents=True: exists is fine
    with pytest.raises(ConflictError):
        await c.mkdir(f"{w}/m/n/o", parents=False)
    with pytest.raises(NotFoundError):
        await c.mkdir(f"{w}/nope/x", parents=False)
    with pytest.raises(ConflictError):
        await c.mkdir(f"{w}/empty/sub")
    with pytest.raises(InvalidRequestError):
        await c.write_file(f"{w}/m", chunks_of(b"x"))

    await c.symlink("a/b/file.txt", f"{w}/link", user="nobody")
    st = await c.stat(f"{w}/link")
    assert st.type == "symlink" and st.link_target == "a/b/file.txt" and st.uid == 65534
    assert await read_all(agent, f"{w}/link") == b"x"
    with pytest.raises(ConflictError):
        await c.symlink("elsewhere", f"{w}/link")

    r = await c.rename(f"{w}/a/b/file.txt", f"{w}/moved.txt")
    assert r.name == "moved.txt" and r.type == "file"
    assert not (w / "a/b/file.txt").exists()
    with pytest.raises(NotFoundError):
        await c.rename(f"{w}/a/b/file.txt", f"{w}/x")

    entries = await c.list_dir(str(w))
    assert sorted(e.name for e in entries) == ["a", "empty", "link", "m", "moved.txt"]
    deep = await c.list_dir(str(w), depth=3)
    paths = {e.path for e in deep}
    assert f"{w}/a/b" in paths and f"{w}/m/n/o" in paths and f"{w}/m/n" in paths
    assert max(e.path.count("/") for e in deep) == str(w).count("/") + 3
    link = next(e for e in entries if e.name == "link")
    assert link.link_target == "a/b/file.txt"
    with pytest.raises(InvalidRequestError):
        await c.list_dir(f"{w}/moved.txt")
    with pytest.raises(NotFoundError):
        await c.list_dir(f"{w}/missing")

    with pytest.raises(ConflictError):
        await c.remove(f"{w}/m")
    await c.remove(f"{w}/m", recursive=True)
    await c.remove(f"{w}/link")
    assert (w / "moved.txt").exists()  # removing the link left its target
    await c.remove(f"{w}/moved.txt")
    await c.remove(f"{w}/a/b")  # an empty directory needs no recursive
    with pytest.raises(NotFoundError):
        await c.remove(f"{w}/m")
    assert sorted(p.name for p in w.iterdir()) == ["a", "empty"]


async def test_recursive_remove_does_not_follow_symlinks(agent: Agent) -> None:
    w = agent.work
    outside = w / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (w / "tree/sub").mkdir(parents=True)
    (w / "tree/sub/f").write_text("f")
    (w / "tree/sub/escape").symlink_to(outside)
    await agent.client.remove(f"{w}/tree", recursive=True)
    assert not (w / "tree").exists()
    assert (outside / "keep").read_text() == "keep"


async def test_streaming_a_big_file_both_ways(agent: Agent) -> None:
    size = 256 * MiB
    sent = hashlib.sha256()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(size // MiB):
            block = hashlib.sha256(i.to_bytes(8, "big")).digest() * (MiB // 32)
            sent.update(block)
            yield block

    path = f"{agent.work}/big.bin"
    info = await agent.client.write_file(path, gen())
    assert info.size == size
    got = hashlib.sha256()
    n = 0
    async for chunk in agent.client.read_file(path):
        got.update(chunk)
        n += len(chunk)
    assert n == size and got.hexdigest() == sent.hexdigest()


async def test_beneath_refuses_escapes(agent: Agent) -> None:
    c = agent.client
    w = agent.work
    base, outside = w / "base", w / "outside"
    (base / "inside").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (base / "out").symlink_to(outside)  # absolute symlink leaving base
    (base / "rel-out").symlink_to("../outside")
    (base / "in").symlink_to("inside")  # a symlink that stays inside
    (base / "inside/file").write_text("inner")
    b = str(base)

    escapes = [f"{b}/out/x", f"{b}/rel-out/x", f"{b}/../outside/x", f"{b}/inside/../../outside/x"]
    for path in escapes:
        with pytest.raises(InvalidRequestError):
            await c.write_file(path, chunks_of(b"pwned"), beneath=b)
        with pytest.raises(InvalidRequestError):
            await c.mkdir(path, beneath=b)
        with pytest.raises(InvalidRequestError):
            await c.symlink("/etc/passwd", path, beneath=b)
        with pytest.raises(InvalidRequestError):
            await c.stat(path, beneath=b)
    for path in (f"{b}/out/secret", f"{b}/rel-out/secret"):
        with pytest.raises(InvalidRequestError):
            await read_all(agent, path, beneath=b)
    # An intermediate symlink, deeper down: base/inside/deep -> outside.
    (base / "inside/deep").symlink_to(outside)
    with pytest.raises(InvalidRequestError):
        await c.write_file(f"{b}/inside/deep/sub/x", chunks_of(b"pwned"), beneath=b)
    with pytest.raises(InvalidRequestError):
        await c.mkdir(f"{b}/inside/deep/sub", beneath=b)
    with pytest.raises(InvalidRequestError, match="not beneath"):
        await c.stat("/etc/passwd", beneath=b)
    with pytest.raises(InvalidRequestError, match="not beneath"):
        await c.stat(f"{b}x/file", beneath=b)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]

    # lstat of the link itself is fine; writing over a final symlink replaces the link.
    assert (await c.stat(f"{b}/out", beneath=b)).type == "symlink"
    await c.write_file(f"{b}/out", chunks_of(b"replaced"), beneath=b)
    assert not (base / "out").is_symlink() and (base / "out").read_bytes() == b"replaced"
    assert (outside / "secret").read_text() == "secret"
    # Symlinks that stay inside work.
    await c.write_file(f"{b}/in/new", chunks_of(b"ok"), beneath=b)
    assert (base / "inside/new").read_bytes() == b"ok"
    assert await read_all(agent, f"{b}/in/file", beneath=b) == b"inner"
    names = sorted(e.name for e in await c.list_dir(b, beneath=b))
    assert names == ["in", "inside", "out", "rel-out"]


# ----------------------------------------------------------------------------- tar


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:  # fmt: skip
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        ti.size = len(data)
        return ti, data
    return ti, None


async def body_of(data: bytes, piece: int = 777) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


def tree(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            yield os.path.relpath(os.path.join(dirpath, n), root)


async def test_tar_upload_and_download_round_trip(agent: Agent) -> None:
    c = agent.client
    long_name = "d/" + "n" * 150 + "/" + "f" * 120
    members = [
        member("d", tarfile.DIRTYPE),
        member("d/hello.txt", data=b"hello", mode=0o600),
        member("d/run.sh", data=b"#!/bin/sh\necho hi\n", mode=0o755),
        member("d/sub/deep.bin", data=os.urandom(300_000)),  # parent dir not in the archive
        member("d/link", tarfile.SYMTYPE, linkname="hello.txt"),
        member("d/hard", tarfile.LNKTYPE, linkname="d/hello.txt"),
        member(long_name, data=b"long"),
        member("d/fifo", tarfile.FIFOTYPE),
        member("./", tarfile.DIRTYPE),
    ]
    for gz in (False, True):
        dest = agent.work / f"up-{gz}"
        n = await upload_tar(c, str(dest), body_of(make_tar(members, gz=gz)), user="nobody")
        assert n == 8
        assert (dest / "d/hello.txt").read_bytes() == b"hello"
        assert (dest / "d/hello.txt").stat().st_mode & 0o7777 == 0o600
        assert (dest / "d/run.sh").stat().st_mode & 0o7777 == 0o755
        assert (dest / "d/sub/deep.bin").read_bytes() == members[3][1]
        assert os.readlink(dest / "d/link") == "hello.txt"
        assert (dest / "d/hard").read_bytes() == b"hello"
        assert (dest / long_name).read_bytes() == b"long"
        assert not (dest / "d/fifo").exists()
        assert (dest / "d/sub").stat().st_uid == 65534
        assert (dest / "d/hello.txt").stat().st_uid == 65534

    src = agent.work / "up-False"
    old = 1_600_000_000
    os.utime(src / "d/hello.txt", (old, old))
    data = b"".join([chunk async for chunk in download_tar(c, str(src))])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        got = {m.name: m for m in tf.getmembers()}
        assert set(got) == set(tree(src))
        assert tf.extractfile("d/sub/deep.bin").read() == members[3][1]  # type: ignore[union-attr]
        hello = got["d/hello.txt"]
        assert hello.mode == 0o600 and hello.mtime == old and hello.uid == 65534
        assert got["d/link"].issym() and got["d/link"].linkname == "hello.txt"
        assert got["d"].isdir()
        assert tf.extractfile(long_name).read() == b"long"  # type: ignore[union-attr]
    # What we download uploads again to the same tree.
    again = agent.work / "again"
    await upload_tar(c, str(again), body_of(data, 65536))
    assert list(tree(again)) == list(tree(src))
    with pytest.raises(InvalidRequestError):
        await collect_bytes(download_tar(c, f"{src}/d/hello.txt"))
    with pytest.raises(NotFoundError):
        await collect_bytes(download_tar(c, f"{src}/missing"))


async def collect_bytes(gen: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in gen])


async def test_malicious_tar_writes_nothing_outside(agent: Agent) -> None:
    c = agent.client
    outside = agent.work / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    dest = agent.work / "dest"

    def big_pax(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
        ti, data = member("innocent", data=b"pwned")
        ti.pax_headers = {"path": name}
        return ti, data

    cases: list[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]] = [
        ("abs-evil' has an absolute path", [member(f"{outside}/abs-evil", data=b"pwned")]),
        ("'../evil' leaves", [member("../evil", data=b"pwned")]),
        ("a/../../evil", [member("a/../../evil", data=b"pwned")]),
        ("link/evil", [
            member("link", tarfile.SYMTYPE, linkname=str(outside)),
            member("link/evil", data=b"pwned"),
        ]),
        ("rel/evil", [
            member("rel", tarfile.SYMTYPE, linkname="../outside"),
            member("rel/evil", data=b"pwned"),
        ]),
        ("rel2/sub", [
            member("rel2", tarfile.SYMTYPE, linkname="../outside"),
            member("rel2/sub/", tarfile.DIRTYPE),
        ]),
        ("rel3/l", [
            member("rel3", tarfile.SYMTYPE, linkname="../outside"),
            member("rel3/l", tarfile.SYMTYPE, linkname="/etc/passwd"),
        ]),
        ("hard", [member("hard", tarfile.LNKTYPE, linkname="../outside/secret")]),
        ("hard2", [
            member("lnk", tarfile.SYMTYPE, linkname=str(outside)),
            member("hard2", tarfile.LNKTYPE, linkname="lnk/secret"),
        ]),
        ("'../pax-evil' leaves", [big_pax("../pax-evil")]),
    ]  # fmt: skip
    for name, members in cases:
        with pytest.raises(InvalidRequestError, match=re.escape(name)):
            await upload_tar(c, str(dest), body_of(make_tar(members)))
        assert sorted(p.name for p in outside.iterdir()) == ["secret"], name
        assert (outside / "secret").read_text() == "secret"
        assert not (agent.work / "evil").exists() and not (agent.work / "pax-evil").exists()
    for p in dest.iterdir():
        assert p.is_symlink()  # only the harmless symlinks were created
    with pytest.raises(InvalidRequestError):
        await upload_tar(c, str(dest), body_of(b"this is not a tar archive" * 100))
    with pytest.raises(InvalidRequestError):
        await upload_tar(c, str(dest), body_of(make_tar([member("t", data=b"x" * 5000)])[:2000]))
