"""File metadata on the real agent: user.e2b.* xattrs set by WRITE or out of band are reported (only those, never through a symlink, within limits) by stat, list, read, write, mkdir and rename; a rewrite replaces them; bad metadata is refused before anything is written."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent import AgentClient, ExecRequest, FileInfo
from corral.agent.client import _file_info
from corral.agent.protocol import (
    Field,
    Fields,
    FieldValue,
    Frame,
    FrameType,
    encode_fields,
    encode_frame,
    read_frame,
)
from corral.errors import InvalidRequestError, QuotaExceededError, RuntimeFailure
from tests.integration import test_agent as base
from tests.integration.test_agent import Agent, chunks_of, run

# The real agent as pid 1 of a private pid namespace: test_agent.py's fixture, shared, not
# copied; and its marks (integration; needs root, unshare and gcc).
agent = base.agent
pytestmark = base.pytestmark

KiB = 1024


def e2b(path: Path) -> dict[str, bytes]:
    """The user.e2b.* xattrs of path itself, as the host sees them."""
    return {
        name.removeprefix("user.e2b."): os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if name.startswith("user.e2b.")
    }


def by_name(entries: list[FileInfo]) -> dict[str, FileInfo]:
    return {e.name: e for e in entries}


@contextlib.contextmanager
def mounted(fstype: str, where: Path) -> Iterator[Path]:
    """A fresh ``fstype`` mounted at ``where`` (the agent shares the test's mount namespace)."""
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("needs mount")
    done = subprocess.run(["mount", "-t", fstype, fstype, str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {fstype}: {done.stderr.decode(errors='replace')}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def raw_request(agent: Agent, type_: FrameType, items: list[tuple[int, FieldValue]]) -> Frame:
    """One request sent as is (no client-side checks) and the first frame of the reply."""
    reader, writer = await asyncio.open_unix_connection(str(agent.sock))
    try:
        writer.write(encode_frame(type_, encode_fields(items)))
        await writer.drain()
        return await asyncio.wait_for(read_frame(reader), 10)
    finally:
        writer.close()


# ----------------------------------------------------------------------------- set and report


async def test_write_sets_metadata_and_every_entry_reports_it(agent: Agent) -> None:
    c, w = agent.client, agent.work
    meta = {"owner": "alice", "a.b_c-D9": "héllo wörld", "empty": ""}
    info = await c.write_file(f"{w}/d/f.txt", chunks_of(b"data"), mode=0o444, metadata=meta)
    assert info.metadata == meta and info.size == 4 and info.mode == 0o444
    assert e2b(w / "d/f.txt") == {k: v.encode() for k, v in meta.items()}
    assert (w / "d/f.txt").read_bytes() == b"data"
    assert not [p for p in (w / "d").iterdir() if p.name != "f.txt"]  # no temporary left

    assert (await c.stat(f"{w}/d/f.txt")).metadata == meta
    assert by_name(await c.list_dir(f"{w}/d"))["f.txt"].metadata == meta
    deep = {e.path: e for e in await c.list_dir(str(w), depth=2)}
    assert deep[f"{w}/d/f.txt"].metadata == meta and deep[f"{w}/d"].metadata == {}

    # READ's FileInfo carries it too (read from the open file).
    reply = await raw_request(agent, FrameType.READ, [(Field.PATH, f"{w}/d/f.txt")])
    assert reply.type == FrameType.OK
    assert sorted(reply.fields().all_bytes(Field.XATTR)) == sorted(
        k.encode() + b"\x00" + v.encode() for k, v in meta.items()
    )

    moved = await c.rename(f"{w}/d/f.txt", f"{w}/g.txt")
    assert moved.name == "g.txt" and moved.metadata == meta

    # A rewrite replaces the file, and with it its metadata: without any, none is left.
    again = await c.write_file(f"{w}/g.txt", chunks_of(b"new"))
    assert again.metadata == {} and e2b(w / "g.txt") == {}
    assert (await c.stat(f"{w}/g.txt")).metadata == {}
    # With other metadata, only that.
    third = await c.write_file(f"{w}/g.txt", chunks_of(b"3"), metadata={"k": "v"})
    assert third.metadata == {"k": "v"} and e2b(w / "g.txt") == {"k": b"v"}
    fourth = await c.write_file(f"{w}/g.txt", chunks_of(b"4"), metadata={"other": "x"})
    assert fourth.metadata == {"other": "x"}
    # FileInfo stays hashable and compares by value.
    assert len({fourth, await c.stat(f"{w}/g.txt")}) == 1
    assert FileInfo("n", "/n", "file", 0, 0, 0.0, 0, 0, None).metadata == {}


async def test_metadata_set_out_of_band_is_reported(agent: Agent) -> None:
    c, w = agent.client, agent.work
    f, d = w / "f", w / "dir"
    f.write_text("x")
    d.mkdir()
    os.setxattr(f, "user.e2b.from-host", b"1")
    os.setxattr(d, "user.e2b.on-a-dir", b"yes")
    # From a process inside, as `setfattr -n user.e2b.k -v v` would.
    code = f"import os; os.setxattr({str(f)!r}, 'user.e2b.from.inside', b'in\\xc3\\xa9')"
    assert (await run(agent, ExecRequest([sys.executable, "-c", code])))[2] == 0
    want = {"from-host": "1", "from.inside": "iné"}
    assert (await c.stat(str(f))).metadata == want
    listed = by_name(await c.list_dir(str(w)))
    assert listed["f"].metadata == want and listed["dir"].metadata == {"on-a-dir": "yes"}
    assert (await c.stat(str(d))).metadata == {"on-a-dir": "yes"}
    # MKDIR's answer, for a directory that was there (parents=True) and a new one.
    assert (await c.mkdir(str(d))).metadata == {"on-a-dir": "yes"}
    assert (await c.mkdir(f"{w}/new", parents=False)).metadata == {}
    # Keys the client would not accept on a write are still reported as they are.
    os.setxattr(f, "user.e2b.odd key ✓", b"v")
    os.setxattr(f, "user.e2b.raw", b"caf\xe9")
    got = (await c.stat(str(f))).metadata
    assert got["odd key ✓"] == "v" and got["raw"] == b"caf\xe9".decode("utf-8", "surrogateescape")


async def test_only_the_user_e2b_namespace_is_reported(agent: Agent) -> None:
    c, w = agent.client, agent.work
    f = w / "f"
    f.write_text("x")
    os.setxattr(f, "user.e2b.kept", b"1")
    os.setxattr(f, "user.other", b"no")
    os.setxattr(f, "user.e2bx", b"no")  # not the prefix: no dot
    os.setxattr(f, "user.E2B.upper", b"no")
    os.setxattr(f, "trusted.e2b.k", b"no")
    with contextlib.suppress(OSError):  # an empty key, if the filesystem takes the name
        os.setxattr(f, "user.e2b.", b"no")
    os.setxattr(f, "user.e2b.nul", b"a\x00b")  # a value with a NUL cannot be reported
    assert (await c.stat(str(f))).metadata == {"kept": "1"}
    assert by_name(await c.list_dir(str(w)))["f"].metadata == {"kept": "1"}


async def test_symlinks_are_never_followed(agent: Agent) -> None:
    c, w = agent.client, agent.work
    await c.write_file(f"{w}/target", chunks_of(b"t"), metadata={"mine": "target"})
    (w / "d").mkdir()
    os.setxattr(w / "d", "user.e2b.dir", b"d")
    (w / "link").symlink_to("target")
    (w / "dlink").symlink_to("d")
    st = await c.stat(f"{w}/link")
    assert st.type == "symlink" and st.metadata == {}
    listed = by_name(await c.list_dir(str(w)))
    assert listed["link"].metadata == {} and listed["dlink"].metadata == {}
    assert listed["target"].metadata == {"mine": "target"}
    assert listed["d"].metadata == {"dir": "d"}
    # Writing at the symlink replaces it: the target keeps its metadata.
    info = await c.write_file(f"{w}/link", chunks_of(b"l"), metadata={"mine": "link"})
    assert info.type == "file" and info.metadata == {"mine": "link"}
    assert e2b(w / "target") == {"mine": b"target"} and (w / "target").read_bytes() == b"t"
    # A symlink renamed is still reported as itself.
    assert (await c.rename(f"{w}/dlink", f"{w}/dlink2")).metadata == {}


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"": "v"}, "invalid metadata key"),
        ({"a b": "v"}, "invalid metadata key"),
        ({"a/b": "v"}, "invalid metadata key"),
        ({"é": "v"}, "invalid metadata key"),
        ({"k\n": "v"}, "invalid metadata key"),
        ({"k" * 201: "v"}, "invalid metadata key"),
        ({"k": "v" * 4097}, "over 4096 bytes"),
        ({"k": "é" * 2049}, "over 4096 bytes"),
        ({"k": "a\x00b"}, "NUL"),
        ({"k": 1}, "must be a string"),
        ({1: "v"}, "invalid metadata key"),
        ({f"k{i}": "v" for i in range(65)}, "at most 64"),
        ({f"k{i:02d}": "v" * 4096 for i in range(16)}, "65536 bytes in all"),
        ([("k", "v")], "mapping"),
    ],
)
async def test_the_client_refuses_bad_metadata(agent: Agent, metadata: object, match: str) -> None:
    path = agent.work / "new/f"
    with pytest.raises(InvalidRequestError, match=match):
        await agent.client.write_file(str(path), chunks_of(b"x"), metadata=metadata)  # type: ignore[arg-type]
    assert not (agent.work / "new").exists()


def _entry(key: bytes, value: bytes) -> tuple[int, FieldValue]:
    return (Field.XATTR, key + b"\x00" + value)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([(Field.XATTR, b"no-separator")], "malformed metadata"),
        ([_entry(b"", b"v")], "invalid metadata key"),
        ([_entry(b"a b", b"v")], "invalid metadata key"),
        ([_entry(b"a/b", b"v")], "invalid metadata key"),
        ([_entry("é".encode(), b"v")], "invalid metadata key"),
        ([_entry(b"k" * 201, b"v")], "invalid metadata key"),
        ([_entry(b"k", b"v" * 4097)], "over 4096 bytes"),
        ([_entry(b"k", b"a\x00b")], "NUL"),
        ([_entry(b"k", b"1"), _entry(b"k", b"2")], "given twice"),
        ([_entry(b"k%d" % i, b"v") for i in range(65)], "at most 64"),
        ([_entry(b"k%02d" % i, b"v" * 4096) for i in range(16)], "65536 bytes in all"),
    ],
)
async def test_the_agent_refuses_bad_metadata_before_writing(
    agent: Agent, entries: list[tuple[int, FieldValue]], match: str
) -> None:
    path = agent.work / "new/sub/f"
    reply = await raw_request(agent, FrameType.WRITE, [(Field.PATH, str(path)), *entries])
    assert reply.type == FrameType.ERROR
    fields = reply.fields()
    assert fields.text(Field.CODE) == "invalid" and match in fields.text(Field.MSG)
    assert not (agent.work / "new").exists()  # not even the parents


async def test_limits_at_their_edges_and_beyond_on_tmpfs(agent: Agent) -> None:
    c = agent.client
    with mounted("tmpfs", agent.work / "t") as t:
        # The largest write accepted: 64 entries, keys of 200 bytes, 64 KiB in all.
        key = "k" * 198
        value = "v" * (1024 - 200)
        meta = {f"{key}{i:02d}": value for i in range(64)}
        assert sum(len(k) + len(v) for k, v in meta.items()) == 64 * KiB
        info = await c.write_file(f"{t}/max", chunks_of(b"x"), metadata=meta)
        assert info.metadata == meta
        assert (await c.stat(f"{t}/max")).metadata == meta
        edge = {"k" * 200: "v" * 4096}
        assert (await c.write_file(f"{t}/edge", chunks_of(), metadata=edge)).metadata == edge

        # Out of band, beyond what is reported: the first 64 KiB and 64 entries, never an error.
        big = t / "big"
        big.write_text("x")
        for i in range(40):
            os.setxattr(big, f"user.e2b.b{i:02d}", b"%02d" % i * 2000)  # 4003 bytes each
        got = (await c.stat(str(big))).metadata
        assert len(got) == 16 and sum(len(k) + len(v) for k, v in got.items()) <= 64 * KiB
        assert all(v == f"{k[1:]}" * 2000 for k, v in got.items())
        many = t / "many"
        many.write_text("x")
        for i in range(200):
            os.setxattr(many, f"user.e2b.m{i:03d}", b"v")
        assert len((await c.stat(str(many))).metadata) == 64
        # A value too large for what is left is skipped, smaller ones after it still come.
        huge = t / "huge"
        huge.write_text("x")
        os.setxattr(huge, "user.e2b.small1", b"1")
        os.setxattr(huge, "user.e2b.whole", b"w" * (64 * KiB))
        os.setxattr(huge, "user.e2b.small2", b"2")
        assert (await c.stat(str(huge))).metadata == {"small1": "1", "small2": "2"}

        # Many files full of metadata in one listing: every entry, each within the limits.
        for n in range(100):
            p = t / f"f{n:03d}"
            p.write_text("x")
            for i in range(70):
                os.setxattr(p, f"user.e2b.x{i:02d}", b"y" * 900)
        entries = await c.list_dir(str(t))
        assert len(entries) == 5 + 100
        for e in entries:
            if e.name.startswith("f"):
                assert len(e.metadata) == 64 and set(e.metadata.values()) == {"y" * 900}


async def test_many_xattrs_on_the_usual_filesystem(agent: Agent) -> None:
    c, w = agent.client, agent.work
    f = w / "f"
    f.write_text("x")
    n = 0
    with contextlib.suppress(OSError):  # as many as the filesystem holds (ext4: one block)
        while n < 200:
            os.setxattr(f, f"user.e2b.{n:03d}", b"v")
            n += 1
    assert n > 64
    (w / "g").write_text("y")
    listed = by_name(await c.list_dir(str(w)))
    assert len(listed["f"].metadata) == 64 and listed["g"].metadata == {}
    assert len((await c.stat(str(f))).metadata) == 64


async def test_metadata_the_filesystem_has_no_room_for(agent: Agent) -> None:
    c, w = agent.client, agent.work
    too_much = {f"k{i}": "v" * 4096 for i in range(4)}
    probe = w / "probe"
    probe.write_text("")
    try:
        for k, v in too_much.items():
            os.setxattr(probe, f"user.e2b.{k}", v.encode())
    except OSError as exc:
        assert exc.errno in (errno.ENOSPC, errno.E2BIG)
    else:
        pytest.skip("this filesystem holds 16 KiB of xattrs per file (ext4 does not)")
    finally:
        probe.unlink()
    # The write fails before any data is sent, and the old file stays as it was.
    old = await c.write_file(f"{w}/g", chunks_of(b"old"), metadata={"v": "1"})
    with pytest.raises(QuotaExceededError, match="no room for its metadata"):
        await c.write_file(f"{w}/g", chunks_of(b"new"), metadata=too_much)
    assert (w / "g").read_bytes() == b"old" and (await c.stat(f"{w}/g")) == old
    assert [p.name for p in w.iterdir()] == ["g"]


async def test_a_filesystem_without_xattrs(agent: Agent) -> None:
    c = agent.client
    with mounted("ramfs", agent.work / "r") as r:
        with pytest.raises(InvalidRequestError, match="keeps no metadata"):
            await c.write_file(f"{r}/f", chunks_of(b"x"), metadata={"k": "v"})
        assert list(r.iterdir()) == []  # neither the file nor its temporary
        info = await c.write_file(f"{r}/f", chunks_of(b"x"))
        assert info.metadata == {}
        assert by_name(await c.list_dir(str(r)))["f"].metadata == {}
        assert (await c.stat(str(r))).metadata == {}


# ----------------------------------------------------------------------------- a hostile agent


def _info(*extra: tuple[int, FieldValue]) -> bytes:
    fields: list[tuple[int, FieldValue]] = [
        (Field.NAME, "f"),
        (Field.PATH, "/f"),
        (Field.TYPE, "file"),
        (Field.SIZE, 0),
        (Field.MODE, 0o644),
        (Field.MTIME, 0),
        (Field.UID, 0),
        (Field.GID, 0),
        *extra,
    ]
    return encode_fields(fields)


def test_metadata_fields_decode() -> None:
    info = _file_info(Fields.decode(_info(_entry(b"a", b"1"), _entry(b"b", b""))))
    assert info.metadata == {"a": "1", "b": ""}
    assert _file_info(Fields.decode(_info())).metadata == {}


@pytest.mark.parametrize(
    "entries",
    [
        [(Field.XATTR, b"no-separator")],
        [_entry(b"", b"v")],
        [_entry(b"k", b"a\x00b")],
        [_entry(b"k" * 247, b"v")],
        [_entry(b"k", b"1"), _entry(b"k", b"2")],
        [_entry(b"k%d" % i, b"") for i in range(65)],
        [_entry(b"k%d" % i, b"v" * 8192) for i in range(9)],
    ],
)
async def test_garbled_metadata_from_the_agent_is_a_runtime_failure(
    tmp_path: Path, entries: list[tuple[int, FieldValue]]
) -> None:
    # A fake agent answering a stat with a FileInfo whose metadata is off.
    path = str(tmp_path / "fake.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(encode_frame(FrameType.OK, _info(*entries)))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path)
    async with server:
        client = AgentClient(lambda: asyncio.open_unix_connection(path))
        with pytest.raises(RuntimeFailure):
            await client.stat("/f")
