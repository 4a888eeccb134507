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

from corral.errors import SandboxNotRunningError

__all__ = ["PortMux", "Streams"]

_OPEN, _DATA, _CLOSE, _RESET = 1, 2, 3, 4
_HDR = struct.Struct(">IBI")
_MAX_PAYLOAD = 1 << 20
_CHUNK = 64 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PortMux:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._chans: dict[int, socket.socket] = {}
        self._pumps: dict[int, asyncio.Task[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
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
        writer = await self._connect()
        ch = next(self._ids)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self._chans[ch] = ours
        writer.write(_HDR.pack(ch, _OPEN, 0))
        self._pumps[ch] = asyncio.create_task(self._pump(ch, ours, writer))
        return await asyncio.open_connection(sock=theirs)

    async def _pump(self, ch: int, sock: socket.socket, writer: asyncio.StreamWriter) -> None:
        """Local side → port, as DATA frames; EOF → CLOSE."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(sock, _CHUNK)
                if not data:
                    break
                writer.write(_HDR.pack(ch, _DATA, len(data)) + data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            if self._chans.pop(ch, None) is not None:
                with contextlib.suppress(Exception):
                    writer.write(_HDR.pack(ch, _CLOSE, 0))
                sock.close()
            self._pumps.pop(ch, None)

    async def _read_port(self, reader: asyncio.StreamReader) -> None:
        """Port → local sides."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                header = await reader.readexactly(_HDR.size)
                ch, kind, length = _HDR.unpack(header)
                if length > _MAX_PAYLOAD:
                    break  # not our guest any more: drop everything
                data = await reader.readexactly(length) if length else b""
                sock = self._chans.get(ch)
                if sock is None:
                    continue
                if kind == _DATA:
                    try:
                        await loop.sock_sendall(sock, data)
                    except OSError:
                        self._close(ch)
                elif kind == _CLOSE:
                    self._close(ch)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for ch in list(self._chans):
                self._close(ch)
            if self._writer is not None:
                self._writer.close()

    def _close(self, ch: int) -> None:
        sock = self._chans.pop(ch, None)
        if sock is not None:
            sock.close()
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
