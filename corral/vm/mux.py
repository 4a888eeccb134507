"""The host end of a microvm's agent channel: many byte streams over one virtio-serial port.

QEMU exposes the guest's agent port as a unix socket (one client at a time). ``PortMux`` holds
that connection and hands out independent streams, one per agent operation, each an ordinary
asyncio (reader, writer) pair backed by a local socketpair — so ``AgentClient`` works unchanged.
The frame format is the one ``vmux.c`` (the guest end) documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from pathlib import Path

from corral.errors import RuntimeFailure, SandboxNotRunningError
from corral.vm.qemu import pinned_socket

__all__ = ["PortMux", "Streams"]

_OPEN, _DATA, _CLOSE, _RESET, _CLONE = 1, 2, 3, 4, 5
_HDR = struct.Struct(">IBI")
_MAX_PAYLOAD = 1 << 20
_CHUNK = 64 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PortMux:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        # Our end of each channel's socketpair, as streams: a transport removes its reader from
        # the loop before it closes the descriptor, where a raw ``sock_recv`` cancelled around a
        # close lets a recycled descriptor lose its reader (seen: a hung channel).
        self._chans: dict[int, asyncio.StreamWriter] = {}
        self._pumps: dict[int, asyncio.Task[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._replies: dict[int, asyncio.Future[bytes]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                with pinned_socket(self.path) as pinned:
                    reader, writer = await asyncio.open_unix_connection(pinned)
            except OSError as exc:
                raise SandboxNotRunningError(
                    f"the VM's agent port is not reachable: {exc.strerror or exc}"
                ) from exc
            # Whatever the guest still holds from an earlier host connection is stale.
            writer.write(_HDR.pack(0, _RESET, 0))
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_port(reader))
            return writer

    async def open(self) -> Streams:
        """A fresh stream to the guest agent."""
        port = await self._connect()
        ch = next(self._ids)
        ours, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        self._chans[ch] = writer
        port.write(_HDR.pack(ch, _OPEN, 0))
        self._pumps[ch] = asyncio.create_task(self._pump(ch, reader, port))
        return await asyncio.open_connection(sock=theirs)

    async def clone(self, fields: list[str], timeout: float = 30.0) -> None:
        """Tell the guest's vmux its identity as a clone (``CLONE``: name, clock, entropy,
        network; see vmux.c), applied in vmux itself without starting a process."""
        port = await self._connect()
        ch = next(self._ids)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[ch] = answer
        payload = b"\0".join(f.encode() for f in fields)
        try:
            port.write(_HDR.pack(ch, _CLONE, len(payload)) + payload)
            await port.drain()
            outcome = await asyncio.wait_for(answer, timeout)
        except TimeoutError as exc:
            raise RuntimeFailure(
                f"the guest did not answer its clone setup in {timeout} s"
            ) from exc
        finally:
            self._replies.pop(ch, None)
        if outcome != b"0":
            raise RuntimeFailure(
                f"the guest's clone setup failed: {outcome[2:].decode(errors='replace')}"
            )

    async def _pump(self, ch: int, local: asyncio.StreamReader, port: asyncio.StreamWriter) -> None:
        """Local side → port, as DATA frames; EOF → CLOSE."""
        try:
            while data := await local.read(_CHUNK):
                port.write(_HDR.pack(ch, _DATA, len(data)) + data)
                await port.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._pumps.pop(ch, None)
            writer = self._chans.pop(ch, None)
            if writer is not None:
                with contextlib.suppress(Exception):
                    port.write(_HDR.pack(ch, _CLOSE, 0))
                writer.close()

    async def _read_port(self, reader: asyncio.StreamReader) -> None:
        """Port → local sides."""
        try:
            while True:
                header = await reader.readexactly(_HDR.size)
                ch, kind, length = _HDR.unpack(header)
                if length > _MAX_PAYLOAD:
                    break  # not our guest any more: drop everything
                data = await reader.readexactly(length) if length else b""
                if kind == _CLONE:
                    reply = self._replies.get(ch)
                    if reply is not None and not reply.done():
                        reply.set_result(data)
                    continue
                writer = self._chans.get(ch)
                if writer is None:
                    continue
                if kind == _DATA:
                    try:
                        writer.write(data)
                        await writer.drain()
                    except (OSError, ConnectionError):
                        self._close(ch)
                elif kind == _CLOSE:
                    self._close(ch)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for ch in list(self._chans):
                self._close(ch)
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_exception(SandboxNotRunningError("the VM's agent port closed"))
            if self._writer is not None:
                self._writer.close()

    def _close(self, ch: int) -> None:
        writer = self._chans.pop(ch, None)
        if writer is not None:
            writer.close()
        pump = self._pumps.pop(ch, None)
        if pump is not None:
            pump.cancel()

    async def close(self) -> None:
        for ch in list(self._chans):
            self._close(ch)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._writer = None
