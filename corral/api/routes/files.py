"""File routes. Bodies stream both ways: a 1 GiB file never sits in server memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from corral.api.deps import Caller, Svc
from corral.api.schemas import CountOut, ExistsOut, FileInfoOut
from corral.core.commands import MkdirCommand, RenameCommand
from corral.errors import NotFoundError

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])


@router.get("", response_model=None)
async def read_file(sandbox_id: str, path: str, who: Caller, svc: Svc) -> StreamingResponse:
    chunks = await svc.files.read(who, sandbox_id, path)
    return StreamingResponse(chunks, media_type="application/octet-stream")


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


@router.put("")
async def write_file(
    sandbox_id: str,
    path: str,
    request: Request,
    who: Caller,
    svc: Svc,
    mode: int = 0o644,
    user: str | None = None,
) -> FileInfoOut:
    return FileInfoOut.of(
        await svc.files.write(who, sandbox_id, path, _body(request), mode=mode, user=user)
    )


@router.delete("", status_code=204)
async def remove(
    sandbox_id: str, path: str, who: Caller, svc: Svc, recursive: bool = False
) -> Response:
    await svc.files.remove(who, sandbox_id, path, recursive=recursive)
    return Response(status_code=204)


@router.get("/list")
async def list_dir(
    sandbox_id: str, who: Caller, svc: Svc, path: str = "/", depth: int = 1
) -> list[FileInfoOut]:
    return [FileInfoOut.of(f) for f in await svc.files.list(who, sandbox_id, path, depth)]


@router.get("/stat")
async def stat(sandbox_id: str, path: str, who: Caller, svc: Svc) -> FileInfoOut:
    return FileInfoOut.of(await svc.files.stat(who, sandbox_id, path))


@router.get("/exists")
async def exists(sandbox_id: str, path: str, who: Caller, svc: Svc) -> ExistsOut:
    try:
        await svc.files.stat(who, sandbox_id, path)
    except NotFoundError:
        # Only the file's absence means "no": an unknown sandbox still answers 404.
        await svc.sandboxes.get(who, sandbox_id)
        return ExistsOut(exists=False)
    return ExistsOut(exists=True)


@router.post("/mkdir")
async def mkdir(sandbox_id: str, cmd: MkdirCommand, who: Caller, svc: Svc) -> FileInfoOut:
    return FileInfoOut.of(
        await svc.files.mkdir(who, sandbox_id, cmd.path, parents=cmd.parents, user=cmd.user)
    )


@router.post("/rename")
async def rename(sandbox_id: str, cmd: RenameCommand, who: Caller, svc: Svc) -> FileInfoOut:
    return FileInfoOut.of(await svc.files.rename(who, sandbox_id, cmd.src, cmd.dst))


@router.put("/tar")
async def upload_tar(
    sandbox_id: str, path: str, request: Request, who: Caller, svc: Svc, user: str | None = None
) -> CountOut:
    return CountOut(
        files=await svc.files.upload_tar(who, sandbox_id, path, _body(request), user=user)
    )


@router.get("/tar", response_model=None)
async def download_tar(sandbox_id: str, path: str, who: Caller, svc: Svc) -> StreamingResponse:
    stream = await svc.files.download_tar(who, sandbox_id, path)
    return StreamingResponse(stream, media_type="application/x-tar")
