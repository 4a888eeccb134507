"""envd on corral's own port: the process and filesystem RPCs and the ``/files`` endpoint that
E2B's SDKs talk to inside a sandbox, routed by the ``E2b-Sandbox-Id`` header.

Requests carry the sandbox's access token (``X-Access-Token``), or a signature made with it
for file URLs; they act as the sandbox's tenant. A sandbox that is paused (without auto-resume)
or gone answers 502 "... was not found", as E2B's edge does, which the SDKs turn into
``SandboxNotRunningException``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import posixpath
import re
import signal
import stat as stat_mod
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from corral.agent import AgentClient, FileInfo, OutputEvent, WatchEvent
from corral.api.deps import services_of
from corral.api.e2b import connect
from corral.api.e2b.connect import ConnectError
from corral.api.e2b.errors import E2BRoute, e2b_error
from corral.core.commands import ExecCommand
from corral.core.envd import EnvdService, StartedProcess, User
from corral.core.services import Services
from corral.core.tenants import Principal
from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    SandboxNotRunningError,
)

__all__ = ["ENVD_VERSION", "router"]

# The envd release whose features all work here (see docs/e2b.md): file metadata as
# user.e2b.* xattrs (0.6.2), watch events carrying the entry (0.6.3), watches that may cross
# network mounts (0.6.4: a sandbox has none).
ENVD_VERSION = "0.6.4"
_METADATA_HEADER = "x-metadata-"
# What corral's agent keeps as a key (after envd's lowercasing): E2B's SDKs allow any HTTP
# token character, corral the common ones.
_METADATA_KEY = re.compile(r"[a-z0-9._-]{1,200}")

_SIGNALS = {"SIGNAL_SIGKILL": signal.SIGKILL, "SIGNAL_SIGTERM": signal.SIGTERM}
_FILE_TYPES = {
    "file": "FILE_TYPE_FILE",
    "dir": "FILE_TYPE_DIRECTORY",
    "symlink": "FILE_TYPE_SYMLINK",
}
_EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
_MAX_KEEPALIVE = 3600.0
# A client cuts its call at its deadline, maybe a little before the server sees it pass.
_DEADLINE_SLACK = 0.5


class _EnvdRoute(E2BRoute):
    """A stopped or sleeping sandbox is a 502 saying it "was not found", as E2B's edge says."""

    def corral_error(self, request: Request, exc: CorralError) -> Response:
        if isinstance(exc, SandboxNotRunningError):
            return e2b_error(502, _not_found(request, exc))
        return super().corral_error(request, exc)


def _not_found(request: Request, e: CorralError) -> str:
    sid = request.headers.get("e2b-sandbox-id", "")
    return f"The sandbox {sid} was not found ({e.message})"


router = APIRouter(tags=["e2b-envd"], route_class=_EnvdRoute, include_in_schema=False)


@dataclass
class _Call:
    """One envd request: which sandbox, acting for whom, as which sandbox user."""

    svc: Services
    sandbox_id: str
    who: Principal
    username: str | None

    @property
    def envd(self) -> EnvdService:
        return self.svc.envd

    async def agent(self) -> AgentClient:
        return await self.svc.sandboxes.agent(self.who, self.sandbox_id)

    async def user(self, agent: AgentClient, name: str | None = None) -> User:
        return await self.envd.user(agent, self.sandbox_id, name or self.username)


def _basic_user(request: Request) -> str | None:
    """envd's SDKs name the user as HTTP basic auth with an empty password."""
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("basic "):
        return None
    try:
        name = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidRequestError("Authorization must be Basic base64('user:')") from None
    return name or None


def _call(request: Request) -> _Call:
    sid = request.headers.get("e2b-sandbox-id")
    if not sid:
        raise InvalidRequestError("the E2b-Sandbox-Id header must name the sandbox")
    svc = services_of(request)
    who = svc.envd.owner(sid, request.headers.get("x-access-token"))
    return _Call(svc, sid, who, _basic_user(request))


def _deadline(request: Request) -> float | None:
    raw = request.headers.get("connect-timeout-ms")
    if raw is None:
        return None
    try:
        ms = int(raw)
    except ValueError:
        raise ConnectError("invalid_argument", "Connect-Timeout-Ms must be an integer") from None
    return asyncio.get_running_loop().time() + ms / 1000


def _keepalive(request: Request) -> float | None:
    raw = request.headers.get("keepalive-ping-interval")
    try:
        return min(max(float(raw), 1.0), _MAX_KEEPALIVE) if raw else None
    except ValueError:
        return None


async def _ticking(
    source: AsyncIterator[dict[str, Any]],
    *,
    keepalive: dict[str, Any],
    every: float | None,
    deadline: float | None,
    on_deadline: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """``source``'s messages, with ``keepalive`` when it is quiet for ``every`` seconds (so
    proxies and read timeouts do not cut a silent command), ended at the caller's deadline."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            waits = [w for w in (every, None if deadline is None else deadline - loop.time()) if w]
            wait = min(waits) if waits else None
            if wait is not None and wait <= 0:
                wait = 0.0
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                if deadline is not None and loop.time() >= deadline:
                    if on_deadline is not None:
                        await on_deadline()
                    raise ConnectError("deadline_exceeded", "the call's deadline passed")
                yield keepalive
                continue
            try:
                message = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield message
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


# ----------------------------------------------------------------------------- processes


def _selector(message: dict[str, Any]) -> tuple[int | None, str | None]:
    sel = message.get("process")
    if not isinstance(sel, dict):
        raise ConnectError("invalid_argument", "process selector is required")
    pid, tag = sel.get("pid"), sel.get("tag")
    if isinstance(pid, int) and not isinstance(pid, bool):
        return pid, None
    if isinstance(tag, str):
        return None, tag
    raise ConnectError("invalid_argument", "process selector needs a pid or a tag")


async def _pid(call: _Call, message: dict[str, Any]) -> int:
    pid, tag = _selector(message)
    if pid is not None:
        return pid
    for p in await call.svc.processes.list(call.who, call.sandbox_id):
        if p.running and p.tag == tag:
            return p.pid
    raise ConnectError("not_found", f"no process with tag {tag!r}")


def _event(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"event": {kind: body}}


def _process_events(
    call: _Call, pid: int, *, pty: bool, replay: bool
) -> AsyncIterator[dict[str, Any]]:
    async def gen() -> AsyncIterator[dict[str, Any]]:
        events = await call.svc.processes.attach(call.who, call.sandbox_id, pid, replay=replay)
        try:
            async for ev in events:
                yield _output(ev, pty)
                if ev.kind == "exit":
                    return
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    return gen()


def _output(ev: OutputEvent, pty: bool) -> dict[str, Any]:
    if ev.kind == "exit":
        code = ev.exit_code if ev.exit_code is not None else -1
        return _event("end", {"exitCode": code, "exited": True, "status": f"exit status {code}"})
    field = "pty" if pty else ev.kind
    return _event("data", {field: base64.b64encode(ev.data).decode()})


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConnectError("invalid_argument", f"{what} must be a list of strings")
    return value


def _string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConnectError("invalid_argument", f"{what} must map strings to strings")
    return value


def _pty_size(message: dict[str, Any]) -> tuple[int, int] | None:
    pty = message.get("pty")
    if pty is None:
        return None
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        raise ConnectError("invalid_argument", "pty.size is required")
    rows, cols = size.get("rows", 0), size.get("cols", 0)
    if not isinstance(rows, int) or not isinstance(cols, int):
        raise ConnectError("invalid_argument", "pty.size rows and cols must be integers")
    return rows, cols


@router.post("/process.Process/Start")
async def process_start(request: Request) -> Response:
    call = _call(request)
    try:
        message = await connect.first_message(request)
        config = message.get("process")
        if not isinstance(config, dict) or not isinstance(config.get("cmd"), str):
            raise ConnectError("invalid_argument", "process.cmd is required")
        cmd: str = config["cmd"]
        args = _strings(config.get("args"), "process.args")
        envs = _string_map(config.get("envs"), "process.envs")
        tag = message.get("tag") if isinstance(message.get("tag"), str) else None
        pty = _pty_size(message)
        agent = await call.agent()
        user = await call.user(agent)
        cwd = config.get("cwd")
        cwd = EnvdService.resolve(cwd, user) if isinstance(cwd, str) and cwd else None
        exec_cmd = ExecCommand(
            cmd=[cmd, *args],
            cwd=cwd or call.envd.workdir(call.sandbox_id, user),
            env={"TERM": "xterm-256color", **envs} if pty is not None else envs,
            user=user.name,
            background=True,
            tag=tag,
        )
        pid = await call.svc.processes.start_background(
            call.who,
            call.sandbox_id,
            exec_cmd,
            pty=pty,
            # A PTY's input is its terminal; otherwise stdin stays open only when asked for.
            stdin=pty is not None or message.get("stdin") is True,
        )
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    except (ConnectError, CorralError) as e:
        if isinstance(e, SandboxNotRunningError):
            raise
        return connect.stream_response(_failing(e))
    call.envd.remember(call.sandbox_id, pid, StartedProcess(cmd, tuple(args), envs, cwd, tag))

    async def kill() -> None:
        with contextlib.suppress(CorralError):
            await call.svc.processes.signal(call.who, call.sandbox_id, pid, signal.SIGKILL)

    deadline = _deadline(request)

    async def messages() -> AsyncIterator[dict[str, Any]]:
        try:
            yield _event("start", {"pid": pid})
            async for m in _ticking(
                _process_events(call, pid, pty=pty is not None, replay=True),
                keepalive=_event("keepalive", {}),
                every=_keepalive(request),
                deadline=deadline,
                # A command's timeout ends the command, not only the caller's wait for it.
                on_deadline=kill,
            ):
                yield m
        finally:
            # The client gives up at its deadline too, and may hang up first: the command
            # still ends then. (A hang-up before the deadline leaves it running, as envd does.)
            loop = asyncio.get_running_loop()
            if deadline is not None and loop.time() >= deadline - _DEADLINE_SLACK:
                await asyncio.shield(kill())

    return connect.stream_response(messages())


async def _failing(e: BaseException) -> AsyncIterator[dict[str, Any]]:
    raise e
    yield {}  # pragma: no cover - makes this an async generator


@router.post("/process.Process/Connect")
async def process_connect(request: Request) -> Response:
    call = _call(request)
    try:
        message = await connect.first_message(request)
        pid = await _pid(call, message)
        info = next(
            (p for p in await call.svc.processes.list(call.who, call.sandbox_id) if p.pid == pid),
            None,
        )
        if info is None or not info.running:
            raise ConnectError("not_found", f"no running process {pid}")
    except (ConnectError, CorralError) as e:
        if isinstance(e, SandboxNotRunningError):
            raise
        return connect.stream_response(_failing(e))

    async def messages() -> AsyncIterator[dict[str, Any]]:
        yield _event("start", {"pid": pid})
        async for m in _ticking(
            _process_events(call, pid, pty=info.pty, replay=False),
            keepalive=_event("keepalive", {}),
            every=_keepalive(request),
            deadline=_deadline(request),
        ):
            yield m

    return connect.stream_response(messages())


@router.post("/process.Process/List")
async def process_list(request: Request) -> Response:
    call = _call(request)

    async def handle(_: dict[str, Any]) -> dict[str, Any]:
        procs = [p for p in await call.svc.processes.list(call.who, call.sandbox_id) if p.running]
        call.envd.forget_exited(call.sandbox_id, {p.pid for p in procs})
        out = []
        for p in procs:
            known = call.envd.started(call.sandbox_id, p.pid)
            if known is not None:
                config: dict[str, Any] = {
                    "cmd": known.cmd,
                    "args": list(known.args),
                    "envs": dict(known.envs),
                }
                if known.cwd:
                    config["cwd"] = known.cwd
            else:
                config = {"cmd": p.argv[0] if p.argv else "", "args": p.argv[1:], "cwd": p.cwd}
            item: dict[str, Any] = {"config": config, "pid": p.pid}
            if p.tag is not None:
                item["tag"] = p.tag
            out.append(item)
        return {"processes": out}

    return await connect.unary(request, handle)


def _input(message: dict[str, Any]) -> bytes:
    inp = message.get("input")
    if not isinstance(inp, dict):
        raise ConnectError("invalid_argument", "input is required")
    data = inp.get("stdin", inp.get("pty"))
    if not isinstance(data, str):
        raise ConnectError("invalid_argument", "input needs stdin or pty bytes")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ConnectError("invalid_argument", "input bytes must be base64") from None


@router.post("/process.Process/SendInput")
async def process_send_input(request: Request) -> Response:
    call = _call(request)

    async def handle(message: dict[str, Any]) -> dict[str, Any]:
        pid = await _pid(call, message)
        await call.svc.processes.write_stdin(call.who, call.sandbox_id, pid, _input(message), False)
        return {}

    return await connect.unary(request, handle)


@router.post("/process.Process/StreamInput")
async def process_stream_input(request: Request) -> Response:
    call = _call(request)

    async def messages() -> AsyncIterator[dict[str, Any]]:
        pid: int | None = None
        async for message in connect.read_envelopes(request):
            event = message.get("start") or message.get("data") or message.get("keepalive")
            if "start" in message and isinstance(event, dict):
                pid = await _pid(call, event)
            elif "data" in message and isinstance(event, dict):
                if pid is None:
                    raise ConnectError("failed_precondition", "data before start")
                data = _input(event)
                await call.svc.processes.write_stdin(call.who, call.sandbox_id, pid, data, False)
        yield {}

    return connect.stream_response(messages())


@router.post("/process.Process/SendSignal")
async def process_send_signal(request: Request) -> Response:
    call = _call(request)

    async def handle(message: dict[str, Any]) -> dict[str, Any]:
        pid = await _pid(call, message)
        raw = message.get("signal")
        signo = _SIGNALS.get(raw) if isinstance(raw, str) else raw
        if signo not in (signal.SIGKILL, signal.SIGTERM, 9, 15):
            raise ConnectError("invalid_argument", f"unsupported signal {raw!r}")
        try:
            await call.svc.processes.signal(call.who, call.sandbox_id, pid, int(signo))
        except ConflictError:
            raise ConnectError("not_found", f"process {pid} is not running") from None
        return {}

    return await connect.unary(request, handle)


@router.post("/process.Process/CloseStdin")
async def process_close_stdin(request: Request) -> Response:
    call = _call(request)

    async def handle(message: dict[str, Any]) -> dict[str, Any]:
        pid = await _pid(call, message)
        await call.svc.processes.write_stdin(call.who, call.sandbox_id, pid, b"", True)
        return {}

    return await connect.unary(request, handle)


@router.post("/process.Process/Update")
async def process_update(request: Request) -> Response:
    call = _call(request)

    async def handle(message: dict[str, Any]) -> dict[str, Any]:
        pid = await _pid(call, message)
        size = _pty_size(message)
        if size is not None:
            await call.svc.processes.resize(call.who, call.sandbox_id, pid, *size)
        return {}

    return await connect.unary(request, handle)


# ----------------------------------------------------------------------------- filesystem


def _permissions(info: FileInfo) -> str:
    """The mode as Go's ``fs.FileMode.String`` prints it, which envd reports."""
    kind = {"dir": "d", "symlink": "L"}.get(info.type, "-")
    return kind + stat_mod.filemode(info.mode & 0o777)[1:]


async def _entry(call: _Call, agent: AgentClient, info: FileInfo) -> dict[str, Any]:
    owner, group = await call.envd.names(agent, call.sandbox_id, info)
    entry: dict[str, Any] = {
        "name": info.name,
        "type": _FILE_TYPES.get(info.type, "FILE_TYPE_UNSPECIFIED"),
        "path": info.path,
        "size": str(info.size),
        "mode": info.mode & 0o7777,
        "permissions": _permissions(info),
        "owner": owner,
        "group": group,
        "modifiedTime": datetime.fromtimestamp(info.mtime, UTC).isoformat().replace("+00:00", "Z"),
    }
    if info.metadata:
        entry["metadata"] = dict(info.metadata)
    if info.type == "symlink":
        entry["isSymlink"] = True
        if info.link_target is not None:
            entry["symlinkTarget"] = info.link_target
    return entry


def _path_field(message: dict[str, Any], name: str = "path") -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise ConnectError("invalid_argument", f"{name} is required")
    return value


def _fs(
    handler: Callable[[_Call, AgentClient, User, dict[str, Any]], Awaitable[dict[str, Any]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def route(request: Request) -> Response:
        call = _call(request)

        async def handle(message: dict[str, Any]) -> dict[str, Any]:
            agent = await call.agent()
            return await handler(call, agent, await call.user(agent), message)

        return await connect.unary(request, handle)

    return route


async def _stat(call: _Call, agent: AgentClient, user: User, m: dict[str, Any]) -> dict[str, Any]:
    info = await agent.stat(EnvdService.resolve(_path_field(m), user))
    return {"entry": await _entry(call, agent, info)}


async def _make_dir(
    call: _Call, agent: AgentClient, user: User, m: dict[str, Any]
) -> dict[str, Any]:
    path = EnvdService.resolve(_path_field(m), user)
    with contextlib.suppress(NotFoundError):
        info = await agent.stat(path)
        what = "directory" if info.type == "dir" else "file"
        raise ConnectError("already_exists", f"{path}: a {what} exists there")
    info = await agent.mkdir(path, parents=True, user=user.name)
    return {"entry": await _entry(call, agent, info)}


async def _move(call: _Call, agent: AgentClient, user: User, m: dict[str, Any]) -> dict[str, Any]:
    src = EnvdService.resolve(_path_field(m, "source"), user)
    dst = EnvdService.resolve(_path_field(m, "destination"), user)
    info = await agent.rename(src, dst)
    return {"entry": await _entry(call, agent, info)}


async def _list_dir(
    call: _Call, agent: AgentClient, user: User, m: dict[str, Any]
) -> dict[str, Any]:
    depth = m.get("depth") or 1
    if not isinstance(depth, int) or not 1 <= depth <= 32:
        raise ConnectError("invalid_argument", "depth must be between 1 and 32")
    path = EnvdService.resolve(_path_field(m), user)
    info = await agent.stat(path)
    if info.type != "dir":
        raise ConnectError("invalid_argument", f"{path} is not a directory")
    entries = await call.svc.files.list(call.who, call.sandbox_id, path, depth)
    return {"entries": [await _entry(call, agent, e) for e in entries]}


async def _remove(call: _Call, agent: AgentClient, user: User, m: dict[str, Any]) -> dict[str, Any]:
    path = EnvdService.resolve(_path_field(m), user)
    await call.svc.files.remove(call.who, call.sandbox_id, path, recursive=True)
    return {}


async def _armed_watch(
    call: _Call, agent: AgentClient, user: User, m: dict[str, Any]
) -> tuple[str, AsyncGenerator[WatchEvent, None]]:
    """The watched directory and its armed watch. ``allow_network_mounts`` (envd 0.6.4) needs
    nothing here: a sandbox's filesystems are its own disk and memory, never a network mount."""
    path = EnvdService.resolve(_path_field(m), user)
    info = await agent.stat(path)
    if info.type != "dir":
        raise ConnectError("invalid_argument", f"{path} is not a directory")
    return path, await agent.watch(path, recursive=m.get("recursive") is True)


async def _fs_event(
    call: _Call, agent: AgentClient, root: str, ev: WatchEvent, include_entry: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": ev.name, "type": _EVENT_TYPES[ev.kind]}
    if include_entry and ev.kind not in ("remove", "rename"):
        # What is there now (envd 0.6.3): gone again by the time it is looked at, no entry.
        with contextlib.suppress(NotFoundError):
            path = root if ev.name == "." else posixpath.join(root, ev.name)
            out["entry"] = await _entry(call, agent, await agent.stat(path))
    return out


async def _create_watcher(
    call: _Call, agent: AgentClient, user: User, m: dict[str, Any]
) -> dict[str, Any]:
    root, watch = await _armed_watch(call, agent, user, m)
    watcher = call.envd.add_watcher(
        call.sandbox_id, watch, root=root, include_entry=m.get("includeEntry") is True
    )
    return {"watcherId": watcher.id}


def _watcher_id(m: dict[str, Any]) -> str:
    wid = m.get("watcherId")
    if not isinstance(wid, str):
        raise ConnectError("invalid_argument", "watcherId is required")
    return wid


async def _get_watcher_events(
    call: _Call, agent: AgentClient, _user: User, m: dict[str, Any]
) -> dict[str, Any]:
    w = call.envd.watcher(call.sandbox_id, _watcher_id(m))
    events = call.envd.poll(call.sandbox_id, w.id)
    return {"events": [await _fs_event(call, agent, w.root, e, w.include_entry) for e in events]}


async def _remove_watcher(
    call: _Call, _agent: AgentClient, _user: User, m: dict[str, Any]
) -> dict[str, Any]:
    await call.envd.remove_watcher(call.sandbox_id, _watcher_id(m))
    return {}


for _name, _handler in (
    ("Stat", _stat),
    ("MakeDir", _make_dir),
    ("Move", _move),
    ("ListDir", _list_dir),
    ("Remove", _remove),
    ("CreateWatcher", _create_watcher),
    ("GetWatcherEvents", _get_watcher_events),
    ("RemoveWatcher", _remove_watcher),
):
    router.add_api_route(f"/filesystem.Filesystem/{_name}", _fs(_handler), methods=["POST"])


@router.post("/filesystem.Filesystem/WatchDir")
async def filesystem_watch_dir(request: Request) -> Response:
    call = _call(request)
    try:
        message = await connect.first_message(request)
        agent = await call.agent()
        user = await call.user(agent)
    except (ConnectError, CorralError) as e:
        if isinstance(e, SandboxNotRunningError):
            raise
        return connect.stream_response(_failing(e))

    async def messages() -> AsyncIterator[dict[str, Any]]:
        # Armed here, not before the response: a client gone before the body is read must not
        # leave an agent connection (and its helper) open with nobody to close it.
        root, watch = await _armed_watch(call, agent, user, message)
        include_entry = message.get("includeEntry") is True

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                async for ev in watch:
                    yield {"filesystem": await _fs_event(call, agent, root, ev, include_entry)}
            finally:
                await watch.aclose()

        yield {"start": {}}
        async for m in _ticking(
            events(),
            keepalive={"keepalive": {}},
            every=_keepalive(request),
            deadline=_deadline(request),
        ):
            yield m

    return connect.stream_response(messages())


# ----------------------------------------------------------------------------- REST


@router.get("/health", status_code=204)
async def health(request: Request) -> Response:
    call = _call(request)
    await call.agent()
    return Response(status_code=204)


def _file_call(request: Request, operation: str) -> tuple[_Call, str, str | None]:
    """The call, the path as given and the user of a ``/files`` request: authorised by the
    access token, or by the URL's signature."""
    path = request.query_params.get("path")
    username = request.query_params.get("username") or None
    signature = request.query_params.get("signature")
    if signature is None:
        call = _call(request)
        return call, path or "", username
    raw_exp = request.query_params.get("signature_expiration")
    try:
        expiration = int(raw_exp) if raw_exp else None
    except ValueError:
        raise InvalidRequestError("signature_expiration must be a unix time") from None
    sid, who = services_of(request).envd.signed_owner(
        request.headers.get("e2b-sandbox-id"),
        path or "",
        operation,
        username or "",
        signature,
        expiration,
    )
    return _Call(services_of(request), sid, who, username), path or "", username


@router.get("/files")
async def download(request: Request) -> Response:
    call, path, username = _file_call(request, "read")
    if not path:
        raise InvalidRequestError("the path query parameter is required")
    agent = await call.agent()
    full = EnvdService.resolve(path, await call.user(agent, username))
    chunks = await call.svc.files.read(call.who, call.sandbox_id, full)
    headers = {"Content-Disposition": f'attachment; filename="{posixpath.basename(full)}"'}
    if _asks_for_gzip(request.headers.get("accept-encoding", "")):
        headers["Content-Encoding"] = "gzip"
        return StreamingResponse(
            _gzipped(chunks), media_type="application/octet-stream", headers=headers
        )
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


def _asks_for_gzip(accept: str) -> bool:
    """Whether the client asked for gzip itself (``files.read(gzip=True)`` sends exactly
    ``gzip``), not merely allows it as every HTTP library does by default: compressing a file
    nobody asked to have compressed made a 1 MiB read 4x slower here."""
    codings = {c.split(";")[0].strip().lower() for c in accept.split(",")} - {"", "identity"}
    return codings == {"gzip"}


async def _gzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Level 1: a download is usually bound by the network on one side and the disk on the
    # other; level 6 would make the CPU the bottleneck.
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    async for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


async def _gunzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            out = z.decompress(chunk)
            if out:
                yield out
        yield z.flush()
    except zlib.error as e:
        raise InvalidRequestError(f"the body is not valid gzip: {e}") from None


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _upload_metadata(request: Request) -> dict[str, str] | None:
    """``X-Metadata-<key>: value`` headers, keys lowercased as envd does."""
    found: dict[str, str] = {}
    for name, value in request.headers.items():
        if not name.startswith(_METADATA_HEADER):
            continue
        key = name[len(_METADATA_HEADER) :]
        if not _METADATA_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"metadata key {key!r}: corral keeps keys of 1 to 200 letters, digits, "
                "'.', '_' and '-'"
            )
        found[key] = value
    return found or None


async def _write(
    call: _Call,
    agent: AgentClient,
    user: User,
    path: str,
    body: AsyncIterator[bytes],
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    full = EnvdService.resolve(path, user)
    parent = posixpath.dirname(full) or "/"
    try:
        await agent.stat(parent)
    except NotFoundError:
        await agent.mkdir(parent, parents=True, user=user.name)
    info = await call.svc.files.write(
        call.who, call.sandbox_id, full, body, mode=0o644, user=user.name, metadata=metadata
    )
    out: dict[str, Any] = {"name": info.name, "type": "file", "path": info.path}
    if info.metadata:
        out["metadata"] = dict(info.metadata)
    return out


@router.post("/files")
async def upload(request: Request) -> Response:
    call, path, username = _file_call(request, "write")
    agent = await call.agent()
    user = await call.user(agent, username)
    metadata = _upload_metadata(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    written: list[dict[str, Any]] = []
    if content_type == "multipart/form-data":
        form = await request.form(max_files=10_000)
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise InvalidRequestError("the multipart body carries no file")
            for f in files:
                target = path if path and len(files) == 1 else (f.filename or "")
                if not target:
                    raise InvalidRequestError("each file part needs its path as filename")
                chunks = _upload_chunks(f)
                written.append(await _write(call, agent, user, target, chunks, metadata))
        finally:
            await form.close()
    else:
        if not path:
            raise InvalidRequestError("the path query parameter is required")
        body: AsyncIterator[bytes] = request.stream()
        if request.headers.get("content-encoding", "").strip().lower() == "gzip":
            body = _gunzipped(body)
        written.append(await _write(call, agent, user, path, body, metadata))
    return JSONResponse(written)
