"""``Template`` and ``AsyncTemplate``: templates by name, without holding a client.

Each call opens a connection for itself (like ``Sandbox.create``) and goes through the
``Client``/``AsyncClient`` method of the same job, so the two surfaces cannot drift apart.
Templates are referred to as ``NAME`` (its ``latest`` tag), ``NAME:TAG`` or ``NAME@N``.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping

from corral.sdk._wire import BuildEventCallback
from corral.sdk.async_sandbox import AsyncClient
from corral.sdk.models import TemplateGcResult, TemplateInfo
from corral.sdk.sandbox import Client

__all__ = ["AsyncTemplate", "Template"]


class Template:
    """Build, import, list, tag and delete templates (blocking)."""

    @staticmethod
    def build(
        name: str,
        context: str | os.PathLike[str] = ".",
        *,
        dockerfile: str | os.PathLike[str] = "Dockerfile",
        dockerfile_text: str | None = None,
        tag: str | None = None,
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        network: str | None = None,
        ready_cmd: str | None = None,
        ready_timeout: float | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Build a new version of template ``name`` from a Dockerfile; answer it once built.

        ``context`` (a local directory) is sent as a tar, leaving out what its
        ``.dockerignore`` lists. ``dockerfile`` is relative to ``context`` (or absolute, and
        then may lie outside it); ``dockerfile_text`` gives the Dockerfile's text instead.
        ``tag`` adds a tag besides ``latest``; ``build_args`` set the Dockerfile's ``ARG``s;
        ``no_cache`` runs every step afresh. RUN steps reach the network of ``network``
        (``"none"``, ``"registries"``, the server's default, or ``"public"``). ``ready_cmd``
        (a shell command) overrides the Dockerfile's HEALTHCHECK as the ready check a create
        waits for, for up to ``ready_timeout`` seconds.

        ``on_event`` is called with every ``BuildEvent`` as the server sends it (steps, their
        output, the end). A failed build raises the ``corral.errors`` class the server named,
        a failing RUN's output and exit code in its message.
        """
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.build_template_from_dockerfile(
                name,
                context,
                dockerfile=dockerfile,
                dockerfile_text=dockerfile_text,
                tag=tag,
                build_args=build_args,
                no_cache=no_cache,
                network=network,
                ready_cmd=ready_cmd,
                ready_timeout=ready_timeout,
                on_event=on_event,
            )

    @staticmethod
    def import_image(
        name: str,
        image: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Add a version of template ``name`` from an OCI/Docker image in a registry
        (``host:port/repo:tag`` or ``@sha256:…``; ``username``/``password`` when it wants
        them). The server pulls it (linux/amd64); ``on_event`` sees ``progress`` events per
        layer. An unreachable or refusing registry raises ``UpstreamError``."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.import_template_image(
                name, image, username=username, password=password, tag=tag, on_event=on_event
            )

    @staticmethod
    def import_archive(
        name: str,
        path: str | os.PathLike[str],
        *,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Add a version of template ``name`` from a local ``docker save`` or OCI-layout
        tarball, which is streamed to the server."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.import_template_archive(name, path, tag=tag, on_event=on_event)

    @staticmethod
    def get(ref: str, *, api_key: str | None = None, base_url: str | None = None) -> TemplateInfo:
        """One template version: its layers, start command, ready check, env, workdir, user."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.get_template(ref)

    @staticmethod
    def list(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[TemplateInfo]:
        """The built-ins and every template at its ``latest`` version."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.list_templates()

    @staticmethod
    def versions(
        name: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[TemplateInfo]:
        """Every version of template ``name``, oldest first."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.list_template_versions(name)

    @staticmethod
    def delete(ref: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        """Delete every version of ``NAME``, or just the version ``NAME@N``/``NAME:TAG``.
        Sandboxes made from it go on; layers nothing uses any more are freed."""
        with Client(api_key=api_key, base_url=base_url) as client:
            client.delete_template(ref)

    @staticmethod
    def tag(
        name: str,
        tag: str,
        version: int,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Point ``name:tag`` at version ``version``; answer that version."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.tag_template(name, tag, version)

    @staticmethod
    def untag(
        name: str, tag: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        """Remove ``name:tag``; the version it named stays."""
        with Client(api_key=api_key, base_url=base_url) as client:
            client.untag_template(name, tag)

    @staticmethod
    def gc(*, api_key: str | None = None, base_url: str | None = None) -> TemplateGcResult:
        """Free the layers no template version, snapshot or sandbox uses (admin key only)."""
        with Client(api_key=api_key, base_url=base_url) as client:
            return client.gc_templates()


class AsyncTemplate:
    """``Template`` for asyncio; ``on_event`` may be a coroutine function."""

    @staticmethod
    async def build(
        name: str,
        context: str | os.PathLike[str] = ".",
        *,
        dockerfile: str | os.PathLike[str] = "Dockerfile",
        dockerfile_text: str | None = None,
        tag: str | None = None,
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        network: str | None = None,
        ready_cmd: str | None = None,
        ready_timeout: float | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """See ``Template.build``."""
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.build_template_from_dockerfile(
                name,
                context,
                dockerfile=dockerfile,
                dockerfile_text=dockerfile_text,
                tag=tag,
                build_args=build_args,
                no_cache=no_cache,
                network=network,
                ready_cmd=ready_cmd,
                ready_timeout=ready_timeout,
                on_event=on_event,
            )

    @staticmethod
    async def import_image(
        name: str,
        image: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """See ``Template.import_image``."""
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.import_template_image(
                name, image, username=username, password=password, tag=tag, on_event=on_event
            )

    @staticmethod
    async def import_archive(
        name: str,
        path: str | os.PathLike[str],
        *,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """See ``Template.import_archive``."""
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.import_template_archive(name, path, tag=tag, on_event=on_event)

    @staticmethod
    async def get(
        ref: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> TemplateInfo:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.get_template(ref)

    @staticmethod
    async def list(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[TemplateInfo]:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.list_templates()

    @staticmethod
    async def versions(
        name: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[TemplateInfo]:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.list_template_versions(name)

    @staticmethod
    async def delete(ref: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            await client.delete_template(ref)

    @staticmethod
    async def tag(
        name: str,
        tag: str,
        version: int,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.tag_template(name, tag, version)

    @staticmethod
    async def untag(
        name: str, tag: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            await client.untag_template(name, tag)

    @staticmethod
    async def gc(*, api_key: str | None = None, base_url: str | None = None) -> TemplateGcResult:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.gc_templates()
