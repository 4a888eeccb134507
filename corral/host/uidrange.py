"""Persistent allocation of host uid/gid ranges (and their index) to sandboxes.

Slot ``n`` owns host ids ``first_id + n*size .. + size - 1``; sandbox root maps to the first.
A claim is a file ``<dir>/<n>`` holding the owner's id, created atomically with ``link(2)`` so two
servers sharing a data dir can never hand out one range twice, and so it survives restarts.
The slot index doubles as the sandbox's XFS project id (``n + 1``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from corral.errors import QuotaExceededError

__all__ = ["SlotAllocator"]


class SlotAllocator:
    def __init__(self, directory: Path, *, first_id: int, size: int, slots: int) -> None:
        if first_id <= 0 or size <= 0 or slots <= 0 or first_id + size * slots > 2**32 - 2:
            raise ValueError("uid ranges must fit between 1 and 2**32-2")
        self.directory = directory
        self.first_id = first_id
        self.size = size
        self.slots = slots

    def host_id(self, slot: int) -> int:
        return self.first_id + slot * self.size

    def owners(self) -> dict[int, str]:
        """Every claimed slot and its owner."""
        found: dict[int, str] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        for name in names:
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError):
                found[int(name)] = (self.directory / name).read_text()
        return found

    def find(self, owner: str) -> int | None:
        for slot, who in self.owners().items():
            if who == owner:
                return slot
        return None

    def claim(self, owner: str) -> int:
        """The slot of ``owner``, claiming the lowest free one if it has none yet."""
        existing = self.find(owner)
        if existing is not None:
            return existing
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".claim-{owner}"
        tmp.write_text(owner)
        try:
            taken = set(self.owners())
            for slot in range(self.slots):
                if slot in taken:
                    continue
                try:
                    os.link(tmp, self.directory / str(slot))
                except FileExistsError:
                    continue
                return slot
        finally:
            tmp.unlink(missing_ok=True)
        raise QuotaExceededError(f"all {self.slots} uid ranges of this host are in use")

    def release(self, owner: str) -> None:
        """Give back every slot ``owner`` holds; a no-op when it holds none."""
        for slot, who in self.owners().items():
            if who == owner:
                (self.directory / str(slot)).unlink(missing_ok=True)
        (self.directory / f".claim-{owner}").unlink(missing_ok=True)
