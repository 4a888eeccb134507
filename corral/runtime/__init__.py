"""Isolation tiers behind one contract (``Runtime``); see ``corral.runtime.base``."""

from __future__ import annotations

from corral.runtime.base import Runtime, SandboxSpec
from corral.runtime.container import ContainerRuntime

__all__ = ["ContainerRuntime", "Runtime", "SandboxSpec"]
