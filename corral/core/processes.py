"""Commands and processes inside a sandbox: exec with streaming, background jobs, PTYs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from corral.agent import AgentClient, ExecRequest, OutputEvent, ProcessInfo
from corral.core.commands import ExecCommand
from corral.core.sandboxes import SandboxService
from corral.core.streams import peek
from corral.core.tenants import Principal
from corral.errors import ConflictError, CorralError, InvalidRequestError

__all__ = ["ExecTimedOut", "ProcessService", "RunningExec"]


@dataclass(frozen=True)
class ExecTimedOut:
    """The last event of a stream whose process was killed for running past its timeout."""

    timeout: float


@dataclass
class RunningExec:
    pid: int
    events: AsyncIterator[OutputEvent | ExecTimedOut]


async def _guard(
    agent: AgentClient,
    pid: int,
    events: AsyncIterator[OutputEvent],
    timeout: float | None,
    busy: contextlib.AbstractContextManager[None] | None = None,
) -> AsyncIterator[OutputEvent | ExecTimedOut]:
    """Yield the process's events; kill it on timeout, and when the consumer goes away early.

    ``busy`` is held for as long as someone follows the process (the sandbox is not idle).
    """
    with busy or contextlib.nullcontext():
        # aclosing: a consumer leaving early must reach _guarded's cleanup (it kills the process).
        async with contextlib.aclosing(_guarded(agent, pid, events, timeout)) as guarded:
            async for ev in guarded:
                yield ev


class _Following:
    """A process's events while a client follows them; ``release`` runs once when they end,
    fail, are closed, or are dropped unread (the sandbox is busy until then)."""

    def __init__(self, events: AsyncIterator[OutputEvent], release: Callable[[], None]) -> None:
        self._events = events
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> _Following:
        return self

    async def __anext__(self) -> OutputEvent:
        try:
            return await anext(self._events)
        except BaseException:
            self._finish()
            raise

    async def aclose(self) -> None:
        self._finish()
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    def _finish(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self._finish()


async def _guarded(
    agent: AgentClient, pid: int, events: AsyncIterator[OutputEvent], timeout: float | None
) -> AsyncGenerator[OutputEvent | ExecTimedOut, None]:
    finished = False
    try:
        if timeout is None:
            async for ev in events:
                yield ev
                if ev.kind == "exit":
                    finished = True
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    ev = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                with contextlib.suppress(CorralError):
                    await agent.signal(pid, signal.SIGKILL)
                finished = True
                yield ExecTimedOut(timeout)
                return
            yield ev
            if ev.kind == "exit":
                finished = True
    finally:
        if not finished:
            with contextlib.suppress(CorralError):
                await agent.signal(pid, signal.SIGKILL)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class ProcessService:
    def __init__(self, sandboxes: SandboxService) -> None:
        self._sandboxes = sandboxes

    def _request(
        self,
        sandbox_id: str,
        cmd: ExecCommand,
        *,
        pty: tuple[int, int] | None = None,
        stdin: bool | None = None,
    ) -> ExecRequest:
        cwd, user = self._sandboxes.exec_defaults(sandbox_id)
        if stdin is None:
            stdin = cmd.background or cmd.stdin is not None or pty is not None
        return ExecRequest(
            argv=cmd.argv(),
            cwd=cmd.cwd if cmd.cwd is not None else cwd,
            env=dict(cmd.env),
            user=cmd.user if cmd.user is not None else user,
            pty=pty,
            stdin=stdin,
            tag=cmd.tag,
        )

    async def start(self, who: Principal, sandbox_id: str, cmd: ExecCommand) -> RunningExec:
        """Start a foreground command; the caller must consume or close ``events``."""
        agent = await self._sandboxes.agent(who, sandbox_id)
        pid, events = await agent.exec_stream(self._request(sandbox_id, cmd))
        if cmd.stdin is not None:
            try:
                await _feed(agent, pid, cmd.stdin.encode(), eof=True)
            except BaseException:
                # Nobody will read this stream: closing it kills the process instead of leaving
                # it running with an attach connection nobody owns.
                await events.aclose()
                raise
        return RunningExec(
            pid, _guard(agent, pid, events, cmd.timeout, self._sandboxes.busy(sandbox_id))
        )

    async def start_background(
        self,
        who: Principal,
        sandbox_id: str,
        cmd: ExecCommand,
        *,
        pty: tuple[int, int] | None = None,
        stdin: bool = True,
    ) -> int:
        """Start a process that runs on whether or not anyone follows it; ``stdin=False``
        gives it a stdin at end-of-file (it cannot be written to)."""
        if pty is not None:
            _check_size(*pty)
        agent = await self._sandboxes.agent(who, sandbox_id)
        pid = await agent.spawn(self._request(sandbox_id, cmd, pty=pty, stdin=stdin))
        if cmd.stdin is not None:
            try:
                await _feed(agent, pid, cmd.stdin.encode(), eof=True)
            except BaseException:
                # The caller gets an error, not a pid: the process must not run on unseen.
                with contextlib.suppress(CorralError):
                    await agent.signal(pid, signal.SIGKILL)
                raise
        if cmd.timeout is not None:
            # A background job's timeout is enforced by the server, not by a client that may be gone.
            self._sandboxes.spawn_task(
                self._kill_after(agent, pid, cmd.timeout), f"bg-timeout-{pid}"
            )
        return pid

    @staticmethod
    async def _kill_after(agent: AgentClient, pid: int, timeout: float) -> None:
        await asyncio.sleep(timeout)
        with contextlib.suppress(CorralError):
            await agent.signal(pid, signal.SIGKILL)

    async def start_pty(
        self, who: Principal, sandbox_id: str, cmd: ExecCommand, rows: int, cols: int
    ) -> tuple[AgentClient, RunningExec]:
        _check_size(rows, cols)
        agent = await self._sandboxes.agent(who, sandbox_id)
        env = {"TERM": "xterm-256color", **cmd.env}
        req = self._request(sandbox_id, cmd.model_copy(update={"env": env}), pty=(rows, cols))
        pid, events = await agent.exec_stream(req)
        return agent, RunningExec(
            pid, _guard(agent, pid, events, cmd.timeout, self._sandboxes.busy(sandbox_id))
        )

    async def list(self, who: Principal, sandbox_id: str) -> list[ProcessInfo]:
        return await (await self._sandboxes.agent(who, sandbox_id)).list_processes()

    async def attach(
        self, who: Principal, sandbox_id: str, pid: int, *, replay: bool = True
    ) -> AsyncIterator[OutputEvent]:
        agent = await self._sandboxes.agent(who, sandbox_id)
        # Busy from now: the first event may be minutes away (a quiet process), and the
        # follower must not find its sandbox paused under it meanwhile.
        hold = contextlib.ExitStack()
        hold.enter_context(self._sandboxes.busy(sandbox_id))
        try:
            # Peeked so that an unknown pid fails as a 404, not as a broken stream.
            events = await peek(agent.attach(pid, replay=replay))
        except BaseException:
            hold.close()
            raise
        return _Following(events, hold.close)

    async def write_stdin(
        self, who: Principal, sandbox_id: str, pid: int, data: bytes, eof: bool
    ) -> None:
        await _feed(await self._sandboxes.agent(who, sandbox_id), pid, data, eof=eof)

    async def signal(self, who: Principal, sandbox_id: str, pid: int, signo: int) -> None:
        await (await self._sandboxes.agent(who, sandbox_id)).signal(pid, signo)

    async def resize(self, who: Principal, sandbox_id: str, pid: int, rows: int, cols: int) -> None:
        _check_size(rows, cols)
        await (await self._sandboxes.agent(who, sandbox_id)).resize(pid, rows, cols)


def _check_size(rows: int, cols: int) -> None:
    if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
        raise InvalidRequestError(f"pty size must be 1..1000 rows and columns, got {rows}x{cols}")


async def _feed(agent: AgentClient, pid: int, data: bytes, *, eof: bool) -> None:
    """Write to a process's stdin, then close it if asked.

    A process may read what it was sent and exit before the close arrives (``head -1``); closing
    the stdin of a process that has exited is then a no-op, not an error. Writing to one is.
    """
    wrote = False
    if data:
        await agent.write_stdin(pid, data)
        wrote = True
    if eof:
        try:
            await agent.close_stdin(pid)
        except ConflictError:
            if not wrote:
                raise
