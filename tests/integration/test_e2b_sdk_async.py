"""The official ``e2b`` Python SDK (async), unchanged, against a real corral server: commands, PTY, files, streamed directory watches, pause."""

from __future__ import annotations

import asyncio
import time

import pytest

e2b = pytest.importorskip("e2b")

from e2b import AsyncSandbox, CommandExitException, FilesystemEvent  # noqa: E402
from e2b.exceptions import SandboxNotRunningException  # noqa: E402
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


async def test_commands_files_and_kill(e2b_env: str) -> None:
    sbx = await AsyncSandbox.create(metadata={"flavour": "async"}, envs={"A": "1"}, timeout=120)
    try:
        out: list[str] = []
        r = await sbx.commands.run("echo $A; echo err >&2", on_stdout=out.append)
        assert r.stdout == "1\n" and r.stderr == "err\n" and out == ["1\n"]
        with pytest.raises(CommandExitException) as failed:
            await sbx.commands.run("exit 7")
        assert failed.value.exit_code == 7

        h = await sbx.commands.run("read line; echo got $line", background=True, stdin=True)
        await sbx.commands.send_stdin(h.pid, "x\n")
        assert (await h.wait()).stdout == "got x\n"

        await sbx.files.write("/tmp/a/b.txt", "async")
        assert await sbx.files.read("/tmp/a/b.txt") == "async"
        assert [e.name for e in await sbx.files.list("/tmp/a")] == ["b.txt"]
        assert await sbx.files.exists("/tmp/a/b.txt")
        info = await AsyncSandbox.get_info(sbx.sandbox_id)
        assert info.metadata == {"flavour": "async"}
    finally:
        await sbx.kill()
    assert not await sbx.is_running()


async def test_streamed_watch_and_pty(e2b_env: str) -> None:
    sbx = await AsyncSandbox.create(timeout=120)
    try:
        await sbx.files.make_dir("/tmp/watched")
        seen: list[FilesystemEvent] = []
        handle = await sbx.files.watch_dir("/tmp/watched", seen.append, recursive=True)
        await sbx.commands.run(
            "mkdir /tmp/watched/d; echo 1 > /tmp/watched/d/f; mv /tmp/watched/d/f /tmp/watched/g"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.name == "g" for e in seen):
            await asyncio.sleep(0.1)
        await handle.stop()
        kinds = {(e.name, e.type.name) for e in seen}
        assert {("d", "CREATE"), ("d/f", "CREATE"), ("d/f", "RENAME"), ("g", "CREATE")} <= kinds

        data = bytearray()
        term = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=data.extend)
        await sbx.pty.send_stdin(term.pid, b"echo pty-$((40+2)); exit\n")
        await term.wait()
        assert b"pty-42" in data
    finally:
        await sbx.kill()


async def test_pause_and_connect(e2b_env: str) -> None:
    sbx = await AsyncSandbox.create(timeout=120)
    try:
        await sbx.files.write("/tmp/kept", "yes")
        assert await sbx.pause() is True
        with pytest.raises(SandboxNotRunningException):
            await sbx.files.read("/tmp/kept")
        back = await AsyncSandbox.connect(sbx.sandbox_id)
        assert await back.files.read("/tmp/kept") == "yes"
    finally:
        await sbx.kill()
