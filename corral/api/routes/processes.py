"""Exec, background processes and PTY sessions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import shlex
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse

from corral.agent import AgentClient, OutputEvent
from corral.api.deps import Caller, Svc, api_key_of, services_of
from corral.api.schemas import PidOut, ProcessOut
from corral.core.commands import ExecCommand, SignalCommand, StdinCommand
from corral.core.processes import ExecTimedOut
from corral.errors import CorralError, InvalidRequestError

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["processes"])

NDJSON = "application/x-ndjson"


def event_json(ev: OutputEvent | ExecTimedOut) -> dict[str, Any]:
    if isinstance(ev, ExecTimedOut):
        return {
            "type": "error",
            "code": "timeout",
            "message": f"command ran longer than its timeout of {ev.timeout:g} s and was killed",
        }
    if ev.kind == "exit":
        return {"type": "exit", "exit_code": ev.exit_code}
    return {"type": ev.kind, "data": base64.b64encode(ev.data).decode()}


async def _ndjson(
    events: AsyncIterator[OutputEvent] | AsyncIterator[OutputEvent | ExecTimedOut],
    first: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield (json.dumps(first) + "\n").encode()
        async for ev in events:
            yield (json.dumps(event_json(ev)) + "\n").encode()
    except CorralError as e:
        # The status line is long gone: the error becomes the stream's last event.
        yield (json.dumps({"type": "error", "code": e.code, "message": e.message}) + "\n").encode()
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


@router.post("/exec", response_model=None)
async def exec_command(sandbox_id: str, cmd: ExecCommand, who: Caller, svc: Svc) -> Response:
    if cmd.background:
        pid = await svc.processes.start_background(who, sandbox_id, cmd)
        return JSONResponse(PidOut(pid=pid).model_dump(), status_code=201)
    run = await svc.processes.start(who, sandbox_id, cmd)
    return StreamingResponse(
        _ndjson(run.events, {"type": "start", "pid": run.pid}), media_type=NDJSON
    )


@router.get("/processes")
async def list_processes(sandbox_id: str, who: Caller, svc: Svc) -> list[ProcessOut]:
    return [ProcessOut.of(p) for p in await svc.processes.list(who, sandbox_id)]


@router.get("/processes/{pid}/output", response_model=None)
async def process_output(
    sandbox_id: str, pid: int, who: Caller, svc: Svc, replay: bool = True
) -> StreamingResponse:
    events = await svc.processes.attach(who, sandbox_id, pid, replay=replay)
    return StreamingResponse(_ndjson(events), media_type=NDJSON)


@router.post("/processes/{pid}/stdin", status_code=204)
async def process_stdin(
    sandbox_id: str, pid: int, cmd: StdinCommand, who: Caller, svc: Svc
) -> Response:
    try:
        data = base64.b64decode(cmd.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("stdin data must be base64") from None
    await svc.processes.write_stdin(who, sandbox_id, pid, data, cmd.eof)
    return Response(status_code=204)


@router.post("/processes/{pid}/signal", status_code=204)
async def process_signal(
    sandbox_id: str, pid: int, cmd: SignalCommand, who: Caller, svc: Svc
) -> Response:
    await svc.processes.signal(who, sandbox_id, pid, cmd.signal)
    return Response(status_code=204)


@router.delete("/processes/{pid}", status_code=204)
async def process_kill(sandbox_id: str, pid: int, who: Caller, svc: Svc) -> Response:
    await svc.processes.signal(who, sandbox_id, pid, signal.SIGKILL)
    return Response(status_code=204)


@router.websocket("/pty")
async def pty_session(
    ws: WebSocket,
    sandbox_id: str,
    cmd: str | None = None,
    rows: Annotated[int, Query()] = 24,
    cols: Annotated[int, Query()] = 80,
    user: str | None = None,
    cwd: str | None = None,
) -> None:
    svc = services_of(ws)
    try:
        who = await svc.tenants.authenticate(api_key_of(ws) or ws.query_params.get("api_key"))
        exec_cmd = ExecCommand(
            cmd=shlex.split(cmd) if cmd else ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l'],
            user=user,
            cwd=cwd,
        )
        agent, run = await svc.processes.start_pty(who, sandbox_id, exec_cmd, rows, cols)
    except (CorralError, ValueError) as e:
        # A refused session is explained before closing: the client sees why in the close frame.
        await ws.accept()
        code, msg = (
            (e.code, e.message) if isinstance(e, CorralError) else ("invalid_request", str(e))
        )
        await ws.send_text(json.dumps({"type": "error", "code": code, "message": msg}))
        await ws.close(
            code=4000 + (e.status if isinstance(e, CorralError) else 400), reason=msg[:120]
        )
        return
    await ws.accept()
    await ws.send_text(json.dumps({"type": "start", "pid": run.pid}))
    reader = asyncio.create_task(_pty_input(ws, agent, run.pid))
    try:
        async for ev in run.events:
            if isinstance(ev, ExecTimedOut):
                await ws.send_text(json.dumps(event_json(ev)))
                break
            if ev.kind == "exit":
                await ws.send_text(json.dumps({"type": "exit", "exit_code": ev.exit_code}))
                break
            await ws.send_bytes(ev.data)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        # Closing the event stream kills the PTY's process if it is still running.
        await run.events.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await ws.close()


async def _pty_input(ws: WebSocket, agent: AgentClient, pid: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, CorralError):
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                await agent.signal(pid, signal.SIGKILL)
                return
            if msg.get("bytes"):
                await agent.write_stdin(pid, msg["bytes"])
            elif msg.get("text"):
                try:
                    ctl = json.loads(msg["text"])
                except ValueError:
                    continue
                if ctl.get("type") == "resize":
                    rows, cols = int(ctl.get("rows", 0)), int(ctl.get("cols", 0))
                    if 1 <= rows <= 1000 and 1 <= cols <= 1000:
                        await agent.resize(pid, rows, cols)
                elif ctl.get("type") == "input" and isinstance(ctl.get("data"), str):
                    await agent.write_stdin(pid, ctl["data"].encode())
