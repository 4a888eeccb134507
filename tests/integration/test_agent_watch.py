"""WATCH on the real agent reports create, write, remove, rename and chmod under fsnotify's names, recursively (also in directories made after it started), in order, and its helper ends when the stream closes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from corral.agent import AgentClient, ExecRequest, WatchEvent
from corral.agent.client import WatchKind
from corral.agent.protocol import Field, FrameType, encode_fields, encode_frame
from corral.errors import InvalidRequestError, NotFoundError, QuotaExceededError, RuntimeFailure
from tests.integration import test_agent as base
from tests.integration.test_agent import Agent, _children, _rss_kib, run, until

# The real agent as pid 1 of a private pid namespace: test_agent.py's fixture, shared, not
# copied; and its marks (integration; needs root, unshare and gcc).
agent = base.agent
pytestmark = base.pytestmark

Events = AsyncGenerator[WatchEvent, None]


def ev(name: str, kind: WatchKind) -> WatchEvent:
    return WatchEvent(name, kind)


async def read_until(events: Events, last: WatchEvent, timeout: float = 10) -> list[WatchEvent]:
    """Events up to and including ``last`` (a sentinel the test made after what it checks)."""
    got: list[WatchEvent] = []

    async def go() -> None:
        async for e in events:
            got.append(e)
            if e == last:
                return
        raise AssertionError(f"the stream ended before {last}: {got}")

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {last} in time; got {got}") from None
    return got


def squash(events: list[WatchEvent]) -> list[WatchEvent]:
    """Consecutive duplicates folded (a truncate and a write are both IN_MODIFY)."""
    out: list[WatchEvent] = []
    for e in events:
        if not out or out[-1] != e:
            out.append(e)
    return out


def in_order(expected: list[WatchEvent], got: list[WatchEvent]) -> bool:
    """``expected`` is a subsequence of ``got``."""
    it = iter(got)
    return all(any(e == g for g in it) for e in expected)


def touch(path: Path, data: bytes = b"") -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def helpers(agent: Agent) -> list[int]:
    return _children(agent.host_pid)


def watches(pid: int) -> int:
    """How many inotify watches the process holds (from its fdinfo)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                n += sum(line.startswith("inotify wd:") for line in info.splitlines())
    return n


async def test_every_kind_under_its_name(agent: Agent) -> None:
    w = agent.work
    (w / "existing").write_text("x")
    events = await agent.client.watch(str(w), recursive=False)
    try:
        touch(w / "f.txt")
        with open(w / "f.txt", "ab") as f:
            f.write(b"hello")
        os.chmod(w / "f.txt", 0o600)
        os.rename(w / "f.txt", w / "g.txt")
        os.unlink(w / "g.txt")
        os.mkdir(w / "d")
        os.chmod(w / "d", 0o700)
        os.rmdir(w / "d")
        (w / "existing").write_text("y")  # truncate + write
        touch(w / "end")
        got = squash(await read_until(events, ev("end", "create")))
        assert got == [
            ev("f.txt", "create"),
            ev("f.txt", "write"),
            ev("f.txt", "chmod"),
            ev("f.txt", "rename"),
            ev("g.txt", "create"),
            ev("g.txt", "remove"),
            ev("d", "create"),
            ev("d", "chmod"),
            ev("d", "remove"),
            ev("existing", "write"),
            ev("end", "create"),
        ]
    finally:
        await events.aclose()


async def test_the_directory_itself_and_the_end_of_the_stream(agent: Agent) -> None:
    root = agent.work / "r"
    root.mkdir()
    events = await agent.client.watch(str(root), recursive=True)
    try:
        os.chmod(root, 0o700)
        moved = agent.work / "r2"
        os.rename(root, moved)  # the watch follows the directory: names stay relative to it
        touch(moved / "x")
        os.unlink(moved / "x")
        os.rmdir(moved)

        async def rest() -> list[WatchEvent]:
            return [e async for e in events]

        got = await asyncio.wait_for(rest(), 10)  # the stream ends once the directory is gone
        assert got == [
            ev(".", "chmod"),
            ev(".", "rename"),
            ev("x", "create"),
            ev("x", "remove"),
            ev(".", "remove"),
        ]
    finally:
        await events.aclose()
    await until(lambda: helpers(agent) == [])


async def test_recursive_sees_nested_and_new_directories(agent: Agent) -> None:
    w = agent.work
    t = w / "t"
    (t / "a/b").mkdir(parents=True)
    events = await agent.client.watch(str(t), recursive=True)
    try:
        # Directories that were there when the watch started.
        touch(t / "a/b/f")
        touch(t / "s1")
        assert await read_until(events, ev("s1", "create")) == [
            ev("a/b/f", "create"),
            ev("s1", "create"),
        ]

        # mkdir -p and a file right after: made before the agent could watch x, x/y or x/y/z.
        (t / "x/y/z").mkdir(parents=True)
        touch(t / "x/y/z/f", b"1")
        touch(t / "s2")
        got = await read_until(events, ev("s2", "create"))
        made = [ev("x", "create"), ev("x/y", "create"), ev("x/y/z", "create"), ev("x/y/z/f", "create")]  # fmt: skip
        assert in_order(made, got), got
        # A create racing the scan of a new directory may be reported twice; nothing else comes.
        assert set(got) <= {*made, ev("x/y/z/f", "write"), ev("s2", "create")}, got
        # And x/y/z is watched now.
        with open(t / "x/y/z/f", "ab") as f:
            f.write(b"2")
        touch(t / "s3")
        assert await read_until(events, ev("s3", "create")) == [
            ev("x/y/z/f", "write"),
            ev("s3", "create"),
        ]

        # A directory renamed inside the tree keeps its watches under the new names.
        os.rename(t / "a", t / "c")
        touch(t / "c/b/g")
        touch(t / "s4")
        assert await read_until(events, ev("s4", "create")) == [
            ev("a", "rename"),
            ev("c", "create"),
            ev("c/b/g", "create"),
            ev("s4", "create"),
        ]

        # One moved out is no longer watched; one moved in is, with what it holds.
        os.rename(t / "c", w / "outside")
        touch(w / "outside/b/h")
        (w / "in-src/q").mkdir(parents=True)
        touch(w / "in-src/q/r")
        os.rename(w / "in-src", t / "moved-in")
        touch(t / "s5")
        assert await read_until(events, ev("s5", "create")) == [
            ev("c", "rename"),
            ev("moved-in", "create"),
            ev("moved-in/q", "create"),
            ev("moved-in/q/r", "create"),
            ev("s5", "create"),
        ]
        touch(t / "moved-in/q/s")
        touch(w / "outside/b/i")
        touch(t / "s6")
        assert await read_until(events, ev("s6", "create")) == [
            ev("moved-in/q/s", "create"),
            ev("s6", "create"),
        ]

        # A tree removed: children first.
        shutil.rmtree(t / "x")
        touch(t / "s7")
        assert await read_until(events, ev("s7", "create")) == [
            ev("x/y/z/f", "remove"),
            ev("x/y/z", "remove"),
            ev("x/y", "remove"),
            ev("x", "remove"),
            ev("s7", "create"),
        ]
    finally:
        await events.aclose()


async def test_watches_follow_renames_and_go_with_their_directories(agent: Agent) -> None:
    t = agent.work / "t"
    for i in range(100):
        (t / f"d{i}/e").mkdir(parents=True)
    events = await agent.client.watch(str(t), recursive=True)
    try:
        [helper] = helpers(agent)
        assert watches(helper) == 201
        names = [f"r{i}" if i % 2 == 0 else f"d{i}" for i in range(100)]
        expected = []
        for i in range(0, 100, 2):
            os.rename(t / f"d{i}", t / f"r{i}")
            expected += [ev(f"d{i}", "rename"), ev(f"r{i}", "create")]
        os.rename(t / "d1/e", t / "d3/e1")  # from one watched directory into another
        expected += [ev("d1/e", "rename"), ev("d3/e1", "create")]
        subdirs = [f"{name}/e" for name in names if name != "d1"] + ["d3/e1"]
        for sub in subdirs:
            touch(t / sub / "f")
            expected.append(ev(f"{sub}/f", "create"))
        touch(t / "s1")
        assert await read_until(events, ev("s1", "create")) == [*expected, ev("s1", "create")]
        assert watches(helper) == 201

        for name in names:
            shutil.rmtree(t / name)
        touch(t / "s2")
        got = await read_until(events, ev("s2", "create"))
        gone = {*names, *subdirs, *(f"{sub}/f" for sub in subdirs)}
        assert sorted(got[:-1], key=str) == sorted((ev(n, "remove") for n in gone), key=str)
        await until(lambda: watches(helper) == 1)
        # The names a new tree gets are its own, not those of a dropped one.
        (t / "d0/e").mkdir(parents=True)
        touch(t / "d0/e/new")
        touch(t / "s3")
        got = await read_until(events, ev("s3", "create"))
        assert in_order([ev("d0", "create"), ev("d0/e", "create"), ev("d0/e/new", "create")], got)
        assert watches(helper) == 3
    finally:
        await events.aclose()


async def test_not_recursive_sees_only_direct_children(agent: Agent) -> None:
    t = agent.work / "t"
    (t / "sub").mkdir(parents=True)
    events = await agent.client.watch(str(t), recursive=False)
    try:
        touch(t / "sub/f")
        (t / "new").mkdir()
        touch(t / "new/f")
        os.chmod(t / "sub/f", 0o600)
        touch(t / "end")
        assert await read_until(events, ev("end", "create")) == [
            ev("new", "create"),
            ev("end", "create"),
        ]
    finally:
        await events.aclose()


async def test_errors_are_those_of_stat_and_list_dir(agent: Agent) -> None:
    c = agent.client
    w = agent.work
    (w / "file").write_text("x")
    (w / "base/inside").mkdir(parents=True)
    (w / "base/out").symlink_to(w)
    with pytest.raises(NotFoundError):
        await c.watch(f"{w}/missing", recursive=False)
    with pytest.raises(NotFoundError):
        await c.watch(f"{w}/missing/deeper", recursive=True)
    with pytest.raises(InvalidRequestError, match="Not a directory"):
        await c.watch(f"{w}/file", recursive=True)
    with pytest.raises(InvalidRequestError, match="absolute"):
        await c.watch("relative", recursive=False)
    with pytest.raises(InvalidRequestError, match="leaves"):
        await c.watch(f"{w}/base/out", recursive=False, beneath=f"{w}/base")
    with pytest.raises(InvalidRequestError, match="not beneath"):
        await c.watch(str(w), recursive=False, beneath=f"{w}/base")
    with pytest.raises(InvalidRequestError):
        await c.watch(str(w), recursive=1)  # type: ignore[arg-type]
    # Confined but fine.
    events = await c.watch(f"{w}/base/inside", recursive=False, beneath=f"{w}/base")
    try:
        touch(w / "base/inside/f")
        assert await read_until(events, ev("f", "create")) == [ev("f", "create")]
    finally:
        await events.aclose()
    await until(lambda: helpers(agent) == [])


async def test_limits_on_directories_and_depth(agent: Agent) -> None:
    c = agent.client
    wide = agent.work / "wide"
    wide.mkdir()
    for i in range(8191):  # with wide itself: 8192 watches, the most one watch may hold
        (wide / f"{i}").mkdir()
    events = await c.watch(str(wide), recursive=True)
    try:
        (wide / "one-more").mkdir()
        assert await anext(events) == ev("one-more", "create")
        with pytest.raises(QuotaExceededError, match="more than 8192 directories"):
            await asyncio.wait_for(anext(events), 10)
    finally:
        await events.aclose()
    with pytest.raises(QuotaExceededError, match="more than 8192 directories"):
        await c.watch(str(wide), recursive=True)
    events = await c.watch(str(wide), recursive=False)  # not recursive: one watch is fine
    await events.aclose()

    deep = agent.work / "deep"
    (deep / "/".join(["n"] * 256)).mkdir(parents=True)
    events = await c.watch(str(deep), recursive=True)
    try:
        (deep / "/".join(["n"] * 257)).mkdir()
        touch(deep / "end")
        with pytest.raises(InvalidRequestError, match="deeper than 256"):
            await read_until(events, ev("end", "create"))
    finally:
        await events.aclose()
    (deep / "/".join(["n"] * 258)).mkdir()
    with pytest.raises(InvalidRequestError, match="deeper than 256"):
        await c.watch(str(deep), recursive=True)
    await until(lambda: helpers(agent) == [])


async def test_closing_the_stream_ends_the_helper(agent: Agent) -> None:
    w = agent.work
    for i in range(50):
        (w / f"d{i}/e").mkdir(parents=True)
    events = await agent.client.watch(str(w), recursive=True)
    assert len(helpers(agent)) == 1
    await events.aclose()
    await until(lambda: helpers(agent) == [])
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()

    # Cancelling a pending read closes it too.
    events = await agent.client.watch(str(w), recursive=False)
    task = asyncio.create_task(events.__anext__())
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await until(lambda: helpers(agent) == [])

    # Several at once, never read.
    streams = [await agent.client.watch(str(w), recursive=True) for _ in range(5)]
    assert len(helpers(agent)) == 5
    for s in streams:
        await s.aclose()
    await until(lambda: helpers(agent) == [])
    assert (await agent.client.ping())["protocol"] == "1"


async def test_many_events_keep_their_order(agent: Agent) -> None:
    w = agent.work
    (w / "sub").mkdir()
    n = 5000
    events = await agent.client.watch(str(w), recursive=True)

    def churn() -> None:
        for i in range(n):
            (w / f"sub/{i:05}").write_bytes(b"x")  # a new file: create, then write
        touch(w / "end")

    try:
        # Made while the stream is read, in a thread: the agent and the host run concurrently.
        writer = asyncio.create_task(asyncio.to_thread(churn))
        got = await read_until(events, ev("end", "create"), timeout=60)
        await writer
        expected = []
        for i in range(n):
            expected += [ev(f"sub/{i:05}", "create"), ev(f"sub/{i:05}", "write")]
        assert got == [*expected, ev("end", "create")]
        # Still alive and reporting.
        (w / "sub/after").mkdir()
        assert await read_until(events, ev("sub/after", "create")) == [ev("sub/after", "create")]
        touch(w / "sub/after/f")
        assert await read_until(events, ev("sub/after/f", "create")) == [
            ev("sub/after/f", "create")
        ]
    finally:
        await events.aclose()


async def test_an_unread_watch_overflows_into_an_error_with_bounded_memory(agent: Agent) -> None:
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    sockbuf = int(Path("/proc/sys/net/core/wmem_default").read_text())
    # What the kernel queue holds, what the socket buffers (an event frame is 21 bytes), and more.
    count = queued + sockbuf // 16 + 10_000
    if count > 200_000:
        pytest.skip(f"{count} files would be needed to overflow the queue")
    w = agent.work
    touch(w / "a")
    touch(w / "b")
    events = await agent.client.watch(str(w), recursive=False)
    try:
        [helper] = helpers(agent)

        def flood() -> None:
            # Alternating names: the kernel folds an event into an identical one queued last.
            for i in range(count):
                os.chmod(w / "ab"[i % 2], 0o600 + i % 2)

        await asyncio.to_thread(flood)
        assert _rss_kib(helper) < 8 * 1024  # blocked in send, holding one batch

        async def drain() -> int:
            seen = 0
            async for e in events:
                assert e == ev("ab"[seen % 2], "chmod")  # in order, none lost before the end
                seen += 1
            return seen

        with pytest.raises(RuntimeFailure, match="too many events"):
            await asyncio.wait_for(drain(), 60)
    finally:
        await events.aclose()
    await until(lambda: helpers(agent) == [])


async def test_a_helper_does_not_keep_the_agents_memory(agent: Agent) -> None:
    # Full output rings: ~16 MiB of the agent's heap that a forked helper would share, and keep
    # as its own copy once the agent rewrote it.
    script = "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2"
    for _ in range(8):
        assert (await run(agent, ExecRequest(["sh", "-c", script])))[2] == 0
    assert _rss_kib(agent.host_pid) > 10 * 1024
    events = await agent.client.watch(str(agent.work), recursive=True)
    try:
        [helper] = helpers(agent)
        assert _rss_kib(helper) < 4 * 1024
    finally:
        await events.aclose()


async def _fake_agent(tmp_path: Path, reply: bytes) -> tuple[asyncio.Server, AgentClient]:
    """A fake agent that arms any watch, sends ``reply`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(encode_frame(FrameType.OK) + reply)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    path = str(tmp_path / "fake.sock")
    server = await asyncio.start_unix_server(handle, path)
    return server, AgentClient(lambda: asyncio.open_unix_connection(path))


def _event(*fields: tuple[int, str | int | bytes]) -> bytes:
    return encode_frame(FrameType.EVENT, encode_fields(list(fields)))


@pytest.mark.parametrize(
    "reply",
    [
        _event((Field.NAME, "a"), (Field.KIND, "explode")),
        _event((Field.NAME, "a")),
        _event((Field.KIND, "create")),
        _event((Field.NAME, "/etc/passwd"), (Field.KIND, "create")),
        _event((Field.NAME, "a/../../x"), (Field.KIND, "create")),
        _event((Field.NAME, "a//b"), (Field.KIND, "create")),
        _event((Field.NAME, ""), (Field.KIND, "create")),
        _event((Field.NAME, "a\x00b"), (Field.KIND, "create")),
        _event((Field.NAME, "x" * 5000), (Field.KIND, "create")),
        _event((Field.NAME, 7), (Field.KIND, "create")),
        encode_frame(FrameType.STDOUT, b"hi"),
        struct.pack(">IB", 3, FrameType.EVENT) + b"\x19\x00\x00",  # a truncated field
        encode_frame(FrameType.EVENT, encode_fields([(Field.NAME, "a")]))[:9],  # cut short
        b"",  # no END: the agent hung up
    ],
)
async def test_garbled_events_are_runtime_failures(tmp_path: Path, reply: bytes) -> None:
    server, client = await _fake_agent(tmp_path, reply)
    async with server:
        events = await client.watch("/w", recursive=True)
        with pytest.raises(RuntimeFailure):
            await events.__anext__()
        with pytest.raises(StopAsyncIteration):  # closed by the failure
            await events.__anext__()


async def test_errors_in_the_stream_are_domain_errors(tmp_path: Path) -> None:
    good = _event((Field.NAME, "sub/ok"), (Field.KIND, "rename"))
    error = encode_frame(
        FrameType.ERROR, encode_fields([(Field.CODE, "no_space"), (Field.MSG, "full")])
    )
    server, client = await _fake_agent(
        tmp_path, good + _event((Field.NAME, "."), (Field.KIND, "chmod")) + error
    )
    async with server:
        events = await client.watch("/w", recursive=True)
        assert await events.__anext__() == ev("sub/ok", "rename")
        assert await events.__anext__() == ev(".", "chmod")
        with pytest.raises(QuotaExceededError, match="full"):
            await events.__anext__()
    # END closes the stream quietly.
    server, client = await _fake_agent(tmp_path, good + encode_frame(FrameType.END))
    async with server:
        events = await client.watch("/w", recursive=True)
        assert [e async for e in events] == [ev("sub/ok", "rename")]
