"""The microvm tier's host side: guest kernel and initramfs, QEMU, and the agent port."""

from __future__ import annotations

__all__: list[str] = []
