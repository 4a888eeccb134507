"""The asyncio client: ``AsyncSandbox``, the same surface as ``Sandbox`` with ``await``.

Callbacks may be plain functions or coroutine functions. Requests and answers go through the
same ``_wire`` helpers as the blocking client.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

import websockets.asyncio.client
import websockets.exceptions

from corral.errors import CorralError, InvalidRequestError, NotFoundError, TimeoutError
from corral.sdk._config import resolve_config
from corral.sdk._context import build_context, check_file, file_chunks
from corral.sdk._http import AsyncHttp, AsyncWriteData, async_body, iterate_in_thread
from corral.sdk._tar import ChunkReader, extract_tar, iter_tar
from corral.sdk._wire import (
    CONNECT_TIMEOUT,
    USER_AGENT,
    WS_MAX_SIZE,
    BuildEventCallback,
    BuildWatcher,
    Call,
    ExecCollector,
    Names,
    OnIdle,
    OnTimeout,
    PolicyLike,
    PtyState,
    SecretBindingLike,
    SnapshotRef,
    calls,
    error_from_ws_open,
    ingress_token,
    ingress_url,
    network_document,
    parse_exists,
    parse_file_count,
    parse_introspection,
    parse_list,
    parse_pid,
    parse_secret_list,
    pty_params,
    pty_path,
    resize_message,
    ws_headers,
    ws_url,
)
from corral.sdk.models import (
    EgressEvent,
    ExecEvent,
    ExecResult,
    FileInfo,
    IdentityToken,
    NetworkInfo,
    PoolInfo,
    ProcessInfo,
    SandboxInfo,
    SecretInfo,
    Snapshot,
    TemplateGcResult,
    TemplateInfo,
)

__all__ = [
    "AsyncClient",
    "AsyncFiles",
    "AsyncNetwork",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncPty",
    "AsyncSandbox",
]

# A callback may return an awaitable (an ``async def``), which is awaited before going on.
AsyncTextCallback = Callable[[str], object]
AsyncDataCallback = Callable[[bytes], object]


async def _call(callback: Callable[[Any], object] | None, value: Any) -> None:
    if callback is not None:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


async def _collect(
    events: AsyncGenerator[ExecEvent, None],
    on_stdout: AsyncTextCallback | None,
    on_stderr: AsyncTextCallback | None,
    pid: int | None = None,
) -> ExecResult:
    collector = ExecCollector(pid)
    try:
        async for event in events:
            if (out := collector.add(event)) is not None:
                await _call(on_stdout if out[0] == "stdout" else on_stderr, out[1])
    finally:
        # Leaving early (a callback raised) must drop the connection, which kills the command.
        await events.aclose()
    for stream, text in collector.flush():
        await _call(on_stdout if stream == "stdout" else on_stderr, text)
    return collector.result()


class AsyncProcess:
    """A background process; see ``corral.sdk.sandbox.Process``."""

    def __init__(self, http: AsyncHttp, sandbox_id: str, pid: int) -> None:
        self._http = http
        self._sandbox_id = sandbox_id
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncProcess(sandbox={self._sandbox_id!r}, pid={self.pid})"

    async def wait(
        self,
        *,
        on_stdout: AsyncTextCallback | None = None,
        on_stderr: AsyncTextCallback | None = None,
        replay: bool = True,
    ) -> ExecResult:
        events = self._http.events(calls.process_output(self._sandbox_id, self.pid, replay))
        return await _collect(events, on_stdout, on_stderr, self.pid)

    async def send_stdin(self, data: str | bytes) -> None:
        await self._http.send(calls.process_stdin(self._sandbox_id, self.pid, data, eof=False))

    async def close_stdin(self) -> None:
        await self._http.send(calls.process_stdin(self._sandbox_id, self.pid, b"", eof=True))

    async def signal(self, signum: int) -> None:
        await self._http.send(calls.process_signal(self._sandbox_id, self.pid, signum))

    async def kill(self) -> None:
        await self._http.send(calls.kill_process(self._sandbox_id, self.pid))

    async def info(self) -> ProcessInfo:
        return await AsyncProcesses(self._http, self._sandbox_id).get(self.pid)


class AsyncProcesses:
    def __init__(self, http: AsyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    async def list(self) -> builtins.list[ProcessInfo]:
        obj = await self._http.json(calls.list_processes(self._sandbox_id))
        return [ProcessInfo.from_json(p) for p in parse_list(obj, "process")]

    async def get(self, pid: int) -> ProcessInfo:
        for proc in await self.list():
            if proc.pid == pid:
                return proc
        raise NotFoundError(f"no process {pid} in sandbox {self._sandbox_id}")

    async def connect(self, pid: int) -> AsyncProcess:
        await self.get(pid)
        return AsyncProcess(self._http, self._sandbox_id, pid)


def _blocking_chunks(
    chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop
) -> Iterator[bytes]:
    """Pull an async byte stream from a worker thread (tarfile only reads blocking files)."""

    async def next_chunk() -> bytes:
        return await chunks.__anext__()

    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
        except StopAsyncIteration:
            return


class AsyncFiles:
    """Files inside the sandbox; see ``corral.sdk.sandbox.Files``."""

    def __init__(self, http: AsyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    async def read(self, path: str) -> str:
        return (await self.read_bytes(path)).decode("utf-8", errors="replace")

    async def read_bytes(self, path: str) -> bytes:
        return (await self._http.send(calls.read_file(self._sandbox_id, path))).content

    async def read_stream(self, path: str, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        """``async for chunk in sbx.files.read_stream(path)``; the request starts on iteration."""
        async with self._http.stream(calls.read_file(self._sandbox_id, path)) as resp:
            async for chunk in self._http.iter_bytes(resp, chunk_size):
                yield chunk

    async def write(
        self,
        path: str,
        data: AsyncWriteData,
        *,
        mode: int | None = None,
        user: str | None = None,
    ) -> FileInfo:
        call = calls.write_file(self._sandbox_id, path, mode, user)
        return FileInfo.from_json(await self._http.json(call, async_body(data)))

    async def list(self, path: str = "/", depth: int = 1) -> builtins.list[FileInfo]:
        obj = await self._http.json(calls.list_files(self._sandbox_id, path, depth))
        return [FileInfo.from_json(f) for f in parse_list(obj, "file")]

    async def stat(self, path: str) -> FileInfo:
        return FileInfo.from_json(await self._http.json(calls.stat(self._sandbox_id, path)))

    async def exists(self, path: str) -> bool:
        return parse_exists(await self._http.json(calls.exists(self._sandbox_id, path)))

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._http.send(calls.remove(self._sandbox_id, path, recursive))

    async def rename(self, src: str, dst: str) -> FileInfo:
        return FileInfo.from_json(await self._http.json(calls.rename(self._sandbox_id, src, dst)))

    async def mkdir(self, path: str, *, parents: bool = True, user: str | None = None) -> FileInfo:
        call = calls.mkdir(self._sandbox_id, path, parents, user)
        return FileInfo.from_json(await self._http.json(call))

    async def upload_dir(
        self, local_dir: str | os.PathLike[str], remote_dir: str, *, user: str | None = None
    ) -> int:
        if not Path(local_dir).is_dir():
            raise InvalidRequestError(f"{local_dir} is not a local directory")
        call = calls.put_tar(self._sandbox_id, remote_dir, user)
        body = iterate_in_thread(iter_tar(local_dir))
        return parse_file_count(await self._http.json(call, body))

    async def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> int:
        loop = asyncio.get_running_loop()
        async with self._http.stream(calls.get_tar(self._sandbox_id, remote_dir)) as resp:
            chunks = self._http.iter_bytes(resp)
            try:
                reader = ChunkReader(_blocking_chunks(chunks, loop))
                return await asyncio.to_thread(extract_tar, reader, local_dir)
            finally:
                await chunks.aclose()


class AsyncNetwork:
    """The sandbox's network policy and egress log; see ``corral.sdk.sandbox.Network``."""

    def __init__(self, http: AsyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    async def info(self) -> NetworkInfo:
        return NetworkInfo.from_json(await self._http.json(calls.get_network(self._sandbox_id)))

    async def update(
        self,
        policy: PolicyLike | None = None,
        *,
        preset: str | None = None,
        allow_domains: Names | None = None,
        allow_cidrs: Names | None = None,
        deny_domains: Names | None = None,
        deny_cidrs: Names | None = None,
        ports: int | str | Sequence[int | str] | None = None,
        egress_mbit: float | None = None,
    ) -> NetworkInfo:
        """Replace the whole policy (nothing given: deny all); see ``Network.update``."""
        doc = network_document(
            policy, preset=preset, allow_domains=allow_domains, allow_cidrs=allow_cidrs,
            deny_domains=deny_domains, deny_cidrs=deny_cidrs, ports=ports,
            egress_mbit=egress_mbit,
        )  # fmt: skip
        call = calls.update_network(self._sandbox_id, doc or {})
        return NetworkInfo.from_json(await self._http.json(call))

    async def log(self, after: int = 0, limit: int = 1000) -> builtins.list[EgressEvent]:
        obj = await self._http.json(calls.network_log(self._sandbox_id, after, limit))
        return [EgressEvent.from_json(e) for e in parse_list(obj, "egress event")]


class AsyncPty:
    """An interactive terminal; output goes to ``on_data`` from a reader task."""

    def __init__(
        self,
        http: AsyncHttp,
        sandbox_id: str,
        ws: websockets.asyncio.client.ClientConnection,
        on_data: AsyncDataCallback | None,
    ) -> None:
        self._http = http
        self._sandbox_id = sandbox_id
        self._ws = ws
        self._on_data = on_data
        self._state = PtyState()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def _open(
        cls,
        http: AsyncHttp,
        sandbox_id: str,
        *,
        cmd: str | None,
        rows: int,
        cols: int,
        user: str | None,
        cwd: str | None,
        on_data: AsyncDataCallback | None,
    ) -> AsyncPty:
        params = pty_params(cmd, rows, cols, user, cwd)
        url = ws_url(http.config.base_url, pty_path(sandbox_id), params)
        try:
            ws = await websockets.asyncio.client.connect(
                url,
                additional_headers=ws_headers(http.config.api_key),
                user_agent_header=USER_AGENT,
                open_timeout=CONNECT_TIMEOUT,
                max_size=WS_MAX_SIZE,
                compression=None,
            )
        except (OSError, builtins.TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise error_from_ws_open(exc, url) from exc
        pty = cls(http, sandbox_id, ws, on_data)
        try:
            await pty._await_start()
        except BaseException:
            await ws.close()
            raise
        pty._reader = asyncio.create_task(pty._read_loop(), name="corral-pty")
        return pty

    @property
    def pid(self) -> int | None:
        return self._state.pid

    @property
    def exit_code(self) -> int | None:
        return self._state.exit_code

    @property
    def running(self) -> bool:
        """Whether the connection is still open (the process has not been seen to exit)."""
        return self._reader is not None and not self._reader.done()

    async def _await_start(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                while not self._state.started:
                    await self._handle(await self._ws.recv())
        except (builtins.TimeoutError, websockets.exceptions.ConnectionClosed) as exc:
            raise CorralError(
                f"the terminal in sandbox {self._sandbox_id} did not start: {exc}"
            ) from exc
        if self._state.error is not None:
            raise self._state.error

    async def _handle(self, msg: str | bytes) -> None:
        if isinstance(msg, str):
            self._state.on_text(msg)
        else:
            await _call(self._on_data, msg)

    async def _read_loop(self) -> None:
        try:
            async for msg in self._ws:
                await self._handle(msg)
        except websockets.exceptions.ConnectionClosed:
            pass
        except BaseException:
            await self._ws.close()
            raise

    async def send(self, data: str | bytes) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            await self._ws.send(raw)
        except websockets.exceptions.ConnectionClosed as exc:
            raise CorralError("the terminal is closed") from exc

    async def resize(self, rows: int, cols: int) -> None:
        try:
            await self._ws.send(resize_message(rows, cols))
        except websockets.exceptions.ConnectionClosed as exc:
            raise CorralError("the terminal is closed") from exc

    async def wait(self, timeout: float | None = None) -> int:
        """Until the terminal's process exits; answer its exit code."""
        if self._reader is not None:
            try:
                # shield(): a timed-out wait must not cancel the reader itself.
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except builtins.TimeoutError as exc:
                raise TimeoutError(f"the terminal was still running after {timeout} s") from exc
        return self._state.result()

    async def kill(self) -> None:
        if self._state.pid is None:
            await self.close()
            return
        with suppress(NotFoundError):
            await self._http.send(calls.kill_process(self._sandbox_id, self._state.pid))

    async def close(self) -> None:
        await self._ws.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            with suppress(Exception):
                await self._reader

    async def __aenter__(self) -> AsyncPty:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSandbox:
    """One sandbox, asyncio flavour: ``sbx = await AsyncSandbox.create()``.

    ``async with`` kills the sandbox on exit.
    """

    def __init__(self, sandbox_id: str, http: AsyncHttp, info: SandboxInfo | None = None) -> None:
        self._id = sandbox_id
        self._http = http
        self._info = info
        self.files = AsyncFiles(http, sandbox_id)
        self.processes = AsyncProcesses(http, sandbox_id)
        self.network = AsyncNetwork(http, sandbox_id)

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        *,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        timeout: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        network: PolicyLike | None = None,
        allow_domains: Names | None = None,
        allow_cidrs: Names | None = None,
        preset: str | None = None,
        public_ports: bool = False,
        on_timeout: OnTimeout | None = None,
        idle_timeout: int | None = None,
        on_idle: OnIdle | None = None,
        auto_resume: bool = True,
        snapshot: SnapshotRef | None = None,
        isolation: str | None = None,
        vcpus: int | None = None,
        scopes: Sequence[str] | None = None,
        secrets: Sequence[SecretBindingLike] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> AsyncSandbox:
        """See ``Sandbox.create``."""
        doc = network_document(
            network, preset=preset, allow_domains=allow_domains, allow_cidrs=allow_cidrs
        )
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            call = calls.create_sandbox(
                template, cpu, memory_mb, disk_mb, timeout, env, metadata,
                network=doc, public_ports=public_ports, on_timeout=on_timeout,
                idle_timeout=idle_timeout, on_idle=on_idle, auto_resume=auto_resume,
                snapshot=snapshot,
                isolation=isolation,
                vcpus=vcpus,
                scopes=scopes,
                secrets=secrets,
            )  # fmt: skip
            info = SandboxInfo.from_json(await http.json(call))
        except BaseException:
            await http.close()
            raise
        return cls(info.id, http, info)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> AsyncSandbox:
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            info = SandboxInfo.from_json(await http.json(calls.get_sandbox(sandbox_id)))
        except BaseException:
            await http.close()
            raise
        return cls(info.id, http, info)

    @classmethod
    async def list(
        cls,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            obj = await http.json(calls.list_sandboxes(state, metadata))
        finally:
            await http.close()
        return [SandboxInfo.from_json(s) for s in parse_list(obj, "sandbox")]

    @classmethod
    async def fork(
        cls,
        snapshot: SnapshotRef,
        count: int = 1,
        *,
        timeout: int | None = None,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[AsyncSandbox]:
        """See ``Sandbox.fork``."""
        config = resolve_config(api_key, base_url)
        http = AsyncHttp(config)
        try:
            obj = await http.json(calls.fork_snapshot(snapshot, count, timeout, metadata, env))
        finally:
            await http.close()
        infos = [SandboxInfo.from_json(s) for s in parse_list(obj, "sandbox")]
        return [cls(info.id, AsyncHttp(config), info) for info in infos]

    @classmethod
    async def list_snapshots(
        cls,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[Snapshot]:
        """See ``Sandbox.list_snapshots``."""
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            obj = await http.json(calls.list_snapshots(sandbox_id))
        finally:
            await http.close()
        return [Snapshot.from_json(s) for s in parse_list(obj, "snapshot")]

    @classmethod
    async def get_snapshot(
        cls, snapshot_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> Snapshot:
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            return Snapshot.from_json(await http.json(calls.get_snapshot(snapshot_id)))
        finally:
            await http.close()

    @classmethod
    async def delete_snapshot(
        cls, snapshot: SnapshotRef, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        """See ``Sandbox.delete_snapshot``."""
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            await http.send(calls.delete_snapshot(snapshot))
        finally:
            await http.close()

    @classmethod
    async def introspect_token(
        cls,
        token: str,
        *,
        audience: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> dict[str, Any]:
        """See ``Sandbox.introspect_token``."""
        http = AsyncHttp(resolve_config(api_key, base_url))
        try:
            return parse_introspection(await http.json(calls.introspect_token(token, audience)))
        finally:
            await http.close()

    @property
    def id(self) -> str:
        return self._id

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self._id!r})"

    async def info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.json(calls.get_sandbox(self._id)))
        return self._info

    def _known(self) -> SandboxInfo:
        # Set by create/connect; the token and ingress domain never change afterwards.
        if self._info is None:
            raise CorralError(f"nothing known about sandbox {self._id} yet; await info() first")
        return self._info

    @property
    def pool(self) -> str | None:
        """The warm pool this sandbox was taken from (None: started on demand), as create
        answered: no request."""
        return self._info.pool if self._info is not None else None

    @property
    def access_token(self) -> str | None:
        """See ``Sandbox.access_token``."""
        return ingress_token(self._known())

    def get_url(self, port: int, path: str = "/", *, with_token: bool = False) -> str:
        """See ``Sandbox.get_url``; not awaited, it only needs what create/connect answered."""
        info = self._known()
        return ingress_url(
            self._http.config.base_url, self._id, port, path,
            ingress_domain=info.ingress_domain,
            token=ingress_token(info) if with_token else None,
        )  # fmt: skip

    async def identity_token(self, audience: str, *, ttl: int | None = None) -> IdentityToken:
        """See ``Sandbox.identity_token``."""
        call = calls.mint_token(self._id, audience, ttl)
        return IdentityToken.from_json(await self._http.json(call))

    @overload
    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: AsyncTextCallback | None = None,
        on_stderr: AsyncTextCallback | None = None,
        background: Literal[False] = False,
        tag: str | None = None,
    ) -> ExecResult: ...

    @overload
    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        background: Literal[True],
        tag: str | None = None,
    ) -> AsyncProcess: ...

    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: AsyncTextCallback | None = None,
        on_stderr: AsyncTextCallback | None = None,
        background: bool = False,
        tag: str | None = None,
    ) -> ExecResult | AsyncProcess:
        """See ``Sandbox.exec``; callbacks may be coroutine functions."""
        if background:
            if on_stdout is not None or on_stderr is not None:
                raise InvalidRequestError(
                    "on_stdout/on_stderr belong to AsyncProcess.wait() for a background command"
                )
            call = calls.exec(
                self._id, cmd, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin,
                background=True, tag=tag,
            )  # fmt: skip
            return AsyncProcess(self._http, self._id, parse_pid(await self._http.json(call)))
        events = self.exec_stream(
            cmd, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin, tag=tag
        )
        return await _collect(events, on_stdout, on_stderr)

    def exec_stream(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        tag: str | None = None,
    ) -> AsyncGenerator[ExecEvent, None]:
        """``async for event in sbx.exec_stream(cmd)``; see ``Sandbox.exec_stream``."""
        call = calls.exec(
            self._id, cmd, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin,
            background=False, tag=tag,
        )  # fmt: skip
        return self._http.events(call)

    async def pty(
        self,
        cmd: str | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        on_data: AsyncDataCallback | None = None,
        user: str | None = None,
        cwd: str | None = None,
    ) -> AsyncPty:
        return await AsyncPty._open(
            self._http, self._id, cmd=cmd, rows=rows, cols=cols, user=user, cwd=cwd,
            on_data=on_data,
        )  # fmt: skip

    async def set_timeout(self, seconds: int) -> SandboxInfo:
        obj = await self._http.json(calls.set_timeout(self._id, seconds))
        self._info = SandboxInfo.from_json(obj)
        return self._info

    async def hibernate(self) -> SandboxInfo:
        """See ``Sandbox.hibernate``."""
        call = calls.hibernate_sandbox(self._id)
        self._info = SandboxInfo.from_json(await self._http.json(call))
        return self._info

    async def pause(self) -> SandboxInfo:
        """See ``Sandbox.pause``."""
        self._info = SandboxInfo.from_json(await self._http.json(calls.pause_sandbox(self._id)))
        return self._info

    async def resume(self) -> SandboxInfo:
        """See ``Sandbox.resume``."""
        obj = await self._http.json(calls.resume_sandbox(self._id))
        self._info = SandboxInfo.from_json(obj)
        return self._info

    async def snapshot(self, name: str | None = None) -> Snapshot:
        """See ``Sandbox.snapshot``."""
        return Snapshot.from_json(await self._http.json(calls.create_snapshot(self._id, name)))

    async def snapshots(self) -> builtins.list[Snapshot]:
        """See ``Sandbox.snapshots``."""
        obj = await self._http.json(calls.sandbox_snapshots(self._id))
        return [Snapshot.from_json(s) for s in parse_list(obj, "snapshot")]

    async def restore(self, snapshot: SnapshotRef) -> None:
        """See ``Sandbox.restore``."""
        call = calls.restore_sandbox(self._id, snapshot)
        self._info = SandboxInfo.from_json(await self._http.json(call))

    async def kill(self) -> None:
        await self._http.send(calls.delete_sandbox(self._id))

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.kill()
        except NotFoundError:
            pass
        except CorralError:
            if exc is None:
                raise
        finally:
            await self.close()


class AsyncClient:
    """Calls that are not about one sandbox; see ``corral.sdk.sandbox.Client``."""

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None) -> None:
        self._http = AsyncHttp(resolve_config(api_key, base_url))

    @property
    def base_url(self) -> str:
        return self._http.config.base_url

    async def health(self) -> dict[str, Any]:
        obj = await self._http.json(calls.health())
        return dict(obj) if isinstance(obj, dict) else {}

    async def me(self) -> dict[str, Any]:
        obj = await self._http.json(calls.me())
        return dict(obj) if isinstance(obj, dict) else {}

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        obj = await self._http.json(calls.list_templates())
        return [TemplateInfo.from_json(t) for t in parse_list(obj, "template")]

    async def build_template(self, name: str, *, force: bool = False) -> TemplateInfo:
        return TemplateInfo.from_json(await self._http.json(calls.build_template(name, force)))

    async def get_template(self, ref: str) -> TemplateInfo:
        """See ``corral.sdk.sandbox.Client.get_template``."""
        return TemplateInfo.from_json(await self._http.json(calls.get_template(ref)))

    async def list_template_versions(self, name: str) -> builtins.list[TemplateInfo]:
        """Every version of template ``name``, oldest first."""
        obj = await self._http.json(calls.template_versions(name))
        return [TemplateInfo.from_json(t) for t in parse_list(obj, "template")]

    async def build_template_from_dockerfile(
        self,
        name: str,
        context: str | os.PathLike[str] = ".",
        *,
        dockerfile: str | os.PathLike[str] = "Dockerfile",
        dockerfile_text: str | None = None,
        tag: str | None = None,
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        network: str | None = None,
        ready_cmd: str | None = None,
        ready_timeout: float | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """See ``Template.build``; the context is read in a worker thread."""
        ctx = build_context(context, dockerfile, dockerfile_text)
        call = calls.build_template_dockerfile(
            name,
            ctx.dockerfile,
            tag=tag,
            build_args=build_args,
            no_cache=no_cache,
            network=network,
            ready_cmd=ready_cmd,
            ready_timeout=ready_timeout,
        )
        return await self._follow(call, iterate_in_thread(ctx.chunks()), on_event, "build")

    async def import_template_image(
        self,
        name: str,
        image: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """See ``Template.import_image``."""
        call = calls.import_template_image(name, image, username, password, tag)
        return await self._follow(call, None, on_event, "import")

    async def import_template_archive(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """See ``Template.import_archive``; the file is read in a worker thread."""
        archive = check_file(path, "image archive")
        call = calls.import_template_archive(name, tag)
        body = iterate_in_thread(file_chunks(archive))
        return await self._follow(call, body, on_event, "import")

    async def _follow(
        self,
        call: Call,
        content: AsyncIterator[bytes] | None,
        on_event: BuildEventCallback | None,
        what: str,
    ) -> TemplateInfo:
        watcher = BuildWatcher(what)
        lines = self._http.ndjson(call, content)
        try:
            async for obj in lines:
                event = watcher.add(obj)
                await _call(on_event, event)
                watcher.check(event)
                if watcher.finished:
                    break
        finally:
            # Leaving early (a callback raised, a cancel) drops the connection: the server
            # stops the build.
            await lines.aclose()
        return watcher.result()

    async def tag_template(self, name: str, tag: str, version: int) -> TemplateInfo:
        """Point ``name:tag`` at version ``version`` (moving the tag if it exists)."""
        call = calls.tag_template(name, tag, version)
        return TemplateInfo.from_json(await self._http.json(call))

    async def untag_template(self, name: str, tag: str) -> None:
        await self._http.send(calls.untag_template(name, tag))

    async def delete_template(self, ref: str) -> None:
        """See ``corral.sdk.sandbox.Client.delete_template``."""
        await self._http.send(calls.delete_template(ref))

    async def gc_templates(self) -> TemplateGcResult:
        """Free the layers nothing uses any more (admin key only)."""
        return TemplateGcResult.from_json(await self._http.json(calls.gc_templates()))

    async def set_pool(
        self,
        name: str,
        template: str,
        size: int,
        *,
        isolation: str | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        vcpus: int | None = None,
    ) -> PoolInfo:
        """Keep ``size`` sandboxes of ``template`` and this shape ready so matching creates
        are instant; see ``corral.sdk.sandbox.Client.set_pool``."""
        call = calls.set_pool(name, template, size, isolation, cpu, memory_mb, disk_mb, vcpus)
        return PoolInfo.from_json(await self._http.json(call))

    async def list_pools(self) -> builtins.list[PoolInfo]:
        """This key's tenant's pools, with how many sandboxes each has ready now."""
        obj = await self._http.json(calls.list_pools())
        return [PoolInfo.from_json(p) for p in parse_list(obj, "pool")]

    async def get_pool(self, name: str) -> PoolInfo:
        """One pool (``NotFoundError`` if there is none by that name)."""
        return PoolInfo.from_json(await self._http.json(calls.get_pool(name)))

    async def delete_pool(self, name: str) -> None:
        """Delete a pool and kill what waits in it; sandboxes already taken go on."""
        await self._http.send(calls.delete_pool(name))

    async def set_secret(self, name: str, value: str) -> SecretInfo:
        """See ``corral.sdk.sandbox.Client.set_secret``."""
        return SecretInfo.from_json(await self._http.json(calls.put_secret(name, value)))

    async def list_secrets(self) -> builtins.list[SecretInfo]:
        obj = await self._http.json(calls.list_secrets())
        return [SecretInfo.from_json(s) for s in parse_secret_list(obj)]

    async def get_secret(self, name: str) -> SecretInfo:
        return SecretInfo.from_json(await self._http.json(calls.get_secret(name)))

    async def delete_secret(self, name: str) -> None:
        await self._http.send(calls.delete_secret(name))

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
