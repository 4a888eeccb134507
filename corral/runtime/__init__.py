"""Isolation tiers behind one contract (``Runtime``); see ``corral.runtime.base``."""

from __future__ import annotations

from corral.runtime.base import Runtime, SandboxSpec, Usage
from corral.runtime.container import ContainerRuntime
from corral.runtime.microvm import MicroVMRuntime
from corral.runtime.tiers import TieredRuntime

__all__ = [
    "ContainerRuntime",
    "MicroVMRuntime",
    "Runtime",
    "SandboxSpec",
    "TieredRuntime",
    "Usage",
]
