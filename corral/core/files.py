"""File operations inside a sandbox, always through its agent so paths resolve in its root."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping

from corral.agent import FileInfo, archive
from corral.core.commands import validate_sandbox_path
from corral.core.sandboxes import SandboxService
from corral.core.streams import peek
from corral.core.tenants import Principal
from corral.errors import InvalidRequestError

__all__ = ["FileService"]


def _path(p: str) -> str:
    try:
        return validate_sandbox_path(p)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


class FileService:
    def __init__(self, sandboxes: SandboxService) -> None:
        self._sandboxes = sandboxes

    async def read(self, who: Principal, sid: str, path: str) -> AsyncIterator[bytes]:
        agent = await self._sandboxes.agent(who, sid)
        # Peeked so that "no such file" is a 404, not a cut stream.
        return await peek(agent.read_file(_path(path)))

    async def write(
        self,
        who: Principal,
        sid: str,
        path: str,
        body: AsyncIterable[bytes],
        *,
        mode: int,
        user: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> FileInfo:
        """Write (replace) a file; ``metadata`` becomes its ``user.e2b.*`` extended attributes."""
        if not 0 <= mode <= 0o7777:
            raise InvalidRequestError(f"mode must be between 0 and 0o7777, got {mode}")
        agent = await self._sandboxes.agent(who, sid)
        return await agent.write_file(_path(path), body, mode=mode, user=user, metadata=metadata)

    async def list(self, who: Principal, sid: str, path: str, depth: int) -> list[FileInfo]:
        if not 1 <= depth <= 32:
            raise InvalidRequestError(f"depth must be between 1 and 32, got {depth}")
        return await (await self._sandboxes.agent(who, sid)).list_dir(_path(path), depth=depth)

    async def stat(self, who: Principal, sid: str, path: str) -> FileInfo:
        return await (await self._sandboxes.agent(who, sid)).stat(_path(path))

    async def mkdir(
        self, who: Principal, sid: str, path: str, *, parents: bool, user: str | None
    ) -> FileInfo:
        return await (await self._sandboxes.agent(who, sid)).mkdir(
            _path(path), parents=parents, user=user
        )

    async def remove(self, who: Principal, sid: str, path: str, *, recursive: bool) -> None:
        if _path(path).rstrip("/") == "":
            raise InvalidRequestError("refusing to remove the sandbox's root directory")
        await (await self._sandboxes.agent(who, sid)).remove(path, recursive=recursive)

    async def rename(self, who: Principal, sid: str, src: str, dst: str) -> FileInfo:
        return await (await self._sandboxes.agent(who, sid)).rename(_path(src), _path(dst))

    async def upload_tar(
        self, who: Principal, sid: str, path: str, body: AsyncIterable[bytes], *, user: str | None
    ) -> int:
        agent = await self._sandboxes.agent(who, sid)
        return await archive.upload_tar(agent, _path(path), body, user=user)

    async def download_tar(self, who: Principal, sid: str, path: str) -> AsyncIterator[bytes]:
        agent = await self._sandboxes.agent(who, sid)
        info = await agent.stat(_path(path))
        if info.type != "dir":
            raise InvalidRequestError(f"{path} is not a directory")
        return archive.download_tar(agent, path)
