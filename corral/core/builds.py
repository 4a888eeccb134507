"""Template builds from a Dockerfile, and imports of OCI images, as streams of progress events.

A build runs each step that changes files in a sandbox of its own, made from the layers so far
with the same isolation as any sandbox (container tier; network by the build's preset, default
``registries``, and no network at all for COPY). What the step changed is copied out of the
sandbox's upper layer (``Runtime.export_changes``) into the content-addressed layer store, and
the sandbox is destroyed. ENV, WORKDIR, USER, CMD, ENTRYPOINT and HEALTHCHECK only change the
settings the next steps and the template's sandboxes start with.

Cache: each file step has a key, a sha256 over the key before it and everything the step's
result depends on (the command, its environment, working directory and user; for COPY the
sources' contents). ``build-cache/<key>`` names the layer it made; a rebuild whose prefix of
steps is unchanged reuses those layers without running anything. Only stages the last stage
needs (through FROM and COPY --from) are built, as BuildKit does.

Everything a build makes on the way — its work dir under ``builds/``, its sandboxes, layers not
registered in the end — is removed when it fails or is cancelled (a client that goes away
cancels its build); a crash leaves sandboxes that reconciliation removes, and hidden staging
dirs that ``TemplateService.start`` sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import secrets
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from corral.agent import AgentClient, ExecRequest
from corral.agent import archive as agent_archive
from corral.config import ServerConfig
from corral.core.network import NetworkService
from corral.core.templates import TemplateService, Version
from corral.errors import (
    CorralError,
    InvalidRequestError,
    PermissionDeniedError,
    RuntimeFailure,
)
from corral.runtime.base import Runtime, SandboxSpec
from corral.templates import dockerfile as df
from corral.templates import registry as builtins_registry
from corral.templates.catalog import Settings, check_name
from corral.templates.fs import remove_tree

__all__ = ["BuildOptions", "BuildService", "Event", "PreparedBuild", "PreparedImport"]

log = logging.getLogger(__name__)

Event = dict[str, Any]
_CHUNK = 1 << 20
_TAIL = 4096
_BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
# A start command that is only a shell would exit at once in a sandbox (no terminal): images
# such as debian:12 declare CMD ["bash"] for `docker run -it`, not as a service to start.
_SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/bash", "/usr/bin/sh", "ash", "zsh"}
_EMPTY_LAYER = "sha256:" + hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    dockerfile: str = "Dockerfile"
    tags: tuple[str, ...] = ()
    build_args: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    network: str = "registries"
    ready_cmd: str | None = None
    ready_timeout: float | None = None


@dataclass
class _State:
    """A stage as far as it got: its layers (lowest first) and what its processes start with."""

    layers: list[str]
    key: str
    env: dict[str, str]
    workdir: str = ""
    user: str = ""
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    ready: tuple[str, ...] | None = None
    ready_timeout: float = 60.0


@dataclass
class PreparedBuild:
    tenant: str
    name: str
    options: BuildOptions
    stages: tuple[df.Stage, ...]
    needed: list[int]
    workdir: Path
    context: Path
    # Images FROM or COPY --from name that are no template: pulled during the build, as
    # Docker's FROM pulls (reference → its source and resolved manifest).
    images: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


@dataclass
class PreparedImport:
    tenant: str
    name: str
    tags: tuple[str, ...]
    source: Any  # corral.templates.oci.RegistrySource | ArchiveSource
    image: Any  # its ResolvedImage
    label: str  # what the template's ``image`` field shows
    kind: str  # image | archive
    workdir: Path | None
    started: float = field(default_factory=time.monotonic)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _start_cmd(
    entrypoint: tuple[str, ...] | None, cmd: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    argv = (*(entrypoint or ()), *(cmd or ()))
    if not argv or (len(argv) == 1 and argv[0] in _SHELLS):
        return None
    return argv


class BuildService:
    def __init__(
        self,
        config: ServerConfig,
        runtime: Runtime,
        templates: TemplateService,
        network: NetworkService | None,
    ) -> None:
        self._config = config
        self._cfg = config.builds
        self._runtime = runtime
        self._templates = templates
        self._network = network
        self._root = config.data_dir / "builds"
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache = config.data_dir / "build-cache"

    async def stop(self) -> None:
        """Cancel builds in progress and wait for them to clean up."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def start(self) -> None:
        """Remove work dirs of builds a crash interrupted."""
        with contextlib.suppress(FileNotFoundError):
            for p in self._root.iterdir():
                remove_tree(p)

    # ------------------------------------------------------------------------ preparation

    async def _spool(self, body: AsyncIterable[bytes], target: Path) -> None:
        limit = self._cfg.max_context_mb * 1024 * 1024
        size = 0
        with open(target, "wb") as f:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise InvalidRequestError(
                        f"the upload is larger than {self._cfg.max_context_mb} MiB "
                        "(builds.max_context_mb); leave big files out with .dockerignore"
                    )
                await asyncio.to_thread(f.write, chunk)

    def _new_workdir(self) -> Path:
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        wd = self._root / secrets.token_hex(8)
        wd.mkdir(mode=0o700)
        return wd

    async def prepare_build(
        self,
        tenant: str,
        name: str,
        body: AsyncIterable[bytes],
        options: BuildOptions,
        *,
        admin: bool = False,
    ) -> PreparedBuild:
        """Receive the context and check everything that can be checked before a step runs;
        any mistake here is a plain 4xx, with nothing left behind."""
        check_name(name)
        for tag in options.tags:
            check_name(tag, "tag")
        self._templates.check_writable(name, tenant)
        if options.network not in ("none", "registries", "public"):
            raise InvalidRequestError(
                f"unknown network preset {options.network!r}: use none, registries or public"
            )
        wd = self._new_workdir()
        images: dict[str, tuple[Any, Any]] = {}
        try:
            tar_path = wd / "context.tar"
            await self._spool(body, tar_path)
            context = wd / "context"
            await asyncio.to_thread(_extract_context, tar_path, context)
            tar_path.unlink()
            text = _read_dockerfile(context, options.dockerfile)
            if options.dockerfile.startswith(".corral/"):
                # The SDK's way of sending a Dockerfile from outside the context: not part
                # of what COPY . sees.
                remove_tree(context / ".corral")
            stages = df.parse(text, options.build_args)
            needed = _needed_stages(stages)
            bases: dict[str, df.BaseImage] = {}
            for i in needed:
                stage = stages[i]
                if stage.base_stage is None and stage.base != "scratch":
                    bases[stage.base] = await self._check_image(stage.base, tenant, admin, images)
                for step in stage.steps:
                    if isinstance(step, df.Copy) and step.from_stage and step.from_index is None:
                        await self._check_image(step.from_stage, tenant, admin, images)
            # Again, knowing the bases' ENV and WORKDIR: ``ENV PATH=/x:$PATH`` must see
            # the base's PATH, as Docker's does.
            stages = df.parse(text, options.build_args, bases=bases)
            return PreparedBuild(tenant, name, options, stages, needed, wd, context, images)
        except BaseException:
            for source, _ in images.values():
                source.close()
            remove_tree(wd)
            raise

    async def _check_image(
        self, ref: str, tenant: str, admin: bool, images: dict[str, tuple[Any, Any]]
    ) -> df.BaseImage:
        """What a template, or else a registry image, that FROM or COPY --from names gives a
        stage; a registry image's manifest is resolved now (pulled during the build), so that
        an unknown, unreachable or refused image is a plain error before any step runs."""
        try:
            settings = self._templates.resolve(ref, tenant).version.settings
        except InvalidRequestError as not_template:
            from corral.templates import oci

            try:
                oci.parse_reference(ref)
            except InvalidRequestError:
                raise not_template from None
            if ref not in images:
                if not admin:
                    await asyncio.to_thread(self._check_registry_address, ref)
                source = oci.RegistrySource(ref, insecure_registries=self._cfg.insecure_registries)
                try:
                    resolved = await asyncio.to_thread(source.resolve)
                except CorralError as exc:
                    source.close()
                    raise type(exc)(
                        f"FROM {ref}: no corral template of that name, and pulling it as an "
                        f"image failed: {exc.message}"
                    ) from None
                images[ref] = (source, resolved)
            settings = _image_settings(images[ref][1].config)
        return df.BaseImage(
            env=tuple({**_BASE_ENV, **settings.env}.items()), workdir=settings.workdir or "/"
        )

    # ------------------------------------------------------------------------------ running

    def run_build(self, build: PreparedBuild) -> AsyncIterator[Event]:
        """Start the build; its events, the last ``done`` or ``error``. Closing the iterator
        early cancels the build; one never iterated (a client gone before the response began)
        still lets it finish and clean up."""

        def cleanup() -> None:
            for source, _ in build.images.values():
                with contextlib.suppress(Exception):
                    source.close()
            remove_tree(build.workdir)

        return self._pump(self._build(build), cleanup=cleanup)

    def _pump(
        self,
        work: Callable[[Callable[[Event], None]], Awaitable[Event]],
        cleanup: Callable[[], None],
    ) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            # From the loop itself: at once, so the final event can never overtake it; from
            # an import's worker thread: through the loop, in order.
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            if here is loop:
                queue.put_nowait(event)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, event)

        async def runner() -> None:
            try:
                done = await work(emit)
                queue.put_nowait(done)
            except CorralError as exc:
                queue.put_nowait({"type": "error", "code": exc.code, "message": exc.message})
            except Exception as exc:  # a bug must still end the stream with a reason
                log.exception("build failed")
                queue.put_nowait({"type": "error", "code": "internal", "message": str(exc)})
            finally:
                # Here, not in the stream's finally: a client that hangs up cancels the stream
                # at its next await. Shielded: a cancel arriving before the executor picked the
                # job up would otherwise drop it, and the work dir with it (seen in CI).
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(cleanup))
                queue.put_nowait(None)

        # Started now, not when the response first asks for an event: the work and its
        # cleanup run whatever becomes of the response.
        task = asyncio.create_task(runner(), name="corral-build")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        async def events() -> AsyncIterator[Event]:
            try:
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                if not task.done():
                    task.cancel()  # the client went away: the build stops, and cleans up

        return events()

    def _build(self, build: PreparedBuild) -> Callable[[Callable[[Event], None]], Awaitable[Event]]:
        async def work(emit: Callable[[Event], None]) -> Event:
            held: list[str] = []
            try:
                states: dict[int, _State] = {}
                total = sum(len(build.stages[i].steps) + 1 for i in build.needed)
                counter = [0]
                for i in build.needed:
                    states[i] = await self._stage(build, i, states, emit, counter, total, held)
                final = states[build.needed[-1]]
                opts = build.options
                ready = final.ready
                if opts.ready_cmd is not None:
                    ready = (*final.shell, opts.ready_cmd) if opts.ready_cmd else None
                settings = Settings(
                    env=final.env,
                    workdir=final.workdir,
                    user=final.user,
                    start_cmd=_start_cmd(final.entrypoint, final.cmd),
                    ready_cmd=ready,
                    ready_timeout=opts.ready_timeout or final.ready_timeout,
                )
                version = self._templates.register(
                    build.name,
                    build.tenant,
                    source="dockerfile",
                    layers=final.layers,
                    settings=settings,
                    build_seconds=round(time.monotonic() - build.started, 3),
                    tags=opts.tags,
                )
                return self._done(version, build.started)
            finally:
                # Layers of steps that succeeded stay as build cache (a retry after a failing
                # step reuses them, as Docker's does) until the next collection.
                for d in held:
                    self._templates.release(d)

        return work

    def _done(self, version: Version, started: float) -> Event:
        from corral.api.schemas import TemplateOut  # the wire view of a template

        out = TemplateOut.of(version, built=self._templates.is_built(version))
        return {
            "type": "done",
            "template": out.model_dump(mode="json"),
            "seconds": round(time.monotonic() - started, 3),
        }

    async def _stage(
        self,
        build: PreparedBuild,
        index: int,
        states: dict[int, _State],
        emit: Callable[[Event], None],
        counter: list[int],
        total: int,
        held: list[str],
    ) -> _State:
        stage = build.stages[index]

        def announce(step_line: int, text: str, cached: bool | None = None) -> None:
            counter[0] += 1
            event: Event = {
                "type": "step",
                "stage": index,
                "step": counter[0],
                "of": total,
                "line": step_line,
                "instruction": text,
            }
            if cached is not None:
                event["cached"] = cached
            emit(event)

        state = await self._base(build, stage, states, held, emit)
        announce(stage.from_step.line, stage.from_step.text)
        for step in stage.steps:
            if isinstance(step, df.Run | df.Copy):
                key = _hash(state.key, await self._step_key(build, step, state, states))
                cached = None if build.options.no_cache else self._cached(key)
                announce(step.line, step.text, cached is not None)
                if cached is not None:
                    layer = cached or None
                else:
                    if isinstance(step, df.Run):
                        layer = await self._run(build, step, state, emit)
                    else:
                        layer = await self._copy(build, step, state, states)
                    self._remember(key, layer)
                if layer is not None:
                    self._templates.hold(layer)
                    held.append(layer)
                    state.layers.append(layer)
                state.key = key
                continue
            announce(step.line, step.text)
            _apply_setting(state, step)
        return state

    async def _pull(
        self, build: PreparedBuild, ref: str, emit: Callable[[Event], None]
    ) -> tuple[list[str], Settings]:
        """The layers of a registry image FROM or COPY --from names (fetching those not
        stored yet, with progress events) and what it starts with."""
        from corral.templates import oci

        source, image = build.images[ref]
        diff_ids = list(image.diff_ids)

        def progress(p: oci.Progress) -> None:
            emit({"type": "progress", "layer": p.layer, "bytes": p.bytes, "total": p.total})

        for d in diff_ids:
            self._templates.hold(d)  # from before they exist until the build ends
        try:
            await asyncio.to_thread(source.fetch, image, self._templates.layers, progress)
        finally:
            for d in diff_ids:
                self._templates.release(d)
        return diff_ids, _image_settings(image.config)

    async def _base(
        self,
        build: PreparedBuild,
        stage: df.Stage,
        states: dict[int, _State],
        held: list[str],
        emit: Callable[[Event], None],
    ) -> _State:
        if stage.base_stage is not None:
            prev = states[stage.base_stage]
            return replace(prev, layers=list(prev.layers), env=dict(prev.env))
        if stage.base == "scratch":
            layers: list[str] = []
            settings = Settings()
        elif stage.base in build.images:
            layers, settings = await self._pull(build, stage.base, emit)
        else:
            resolved = self._templates.resolve(stage.base, build.tenant)
            settings = resolved.version.settings
            layers = await self._layers_of(resolved.version)
        for d in layers:
            self._templates.hold(d)
            held.append(d)
        return _State(
            layers=layers,
            key=_hash("FROM", layers),
            env=dict(settings.env),
            workdir=settings.workdir,
            user=settings.user,
            entrypoint=None,
            cmd=settings.start_cmd,
            ready=settings.ready_cmd,
            ready_timeout=settings.ready_timeout,
        )

    async def _layers_of(self, version: Version) -> list[str]:
        if version.source != "builtin":
            return [layer.digest for layer in version.layers]
        return [await asyncio.to_thread(self._adopt_builtin, version.name)]

    def _adopt_builtin(self, name: str) -> str:
        """A built-in template as a layer of the store: hard links to its files where it can
        (a forced rebuild of the built-in makes new files, so what was built on it stays
        whole), a copy across filesystems."""
        store = self._templates.layers
        rootfs = builtins_registry.rootfs_path(self._config.data_dir, name)
        stamp = store.root / f".builtin-{name}.json"
        built_at = builtins_registry.template_info(self._config.data_dir, name).built_at
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads(stamp.read_text())
            if known["built_at"] == built_at and store.has(known["digest"]):
                return str(known["digest"])
        staged = store.staging()
        try:
            for flags in ("-al", "-a"):
                done = subprocess.run(
                    ["cp", flags, f"{rootfs}/.", f"{staged}/"], capture_output=True, text=True
                )
                if done.returncode == 0:
                    break
                remove_tree(staged)
                staged.mkdir(mode=0o755)
            else:
                raise RuntimeFailure(
                    f"cannot use built-in template {name} as a layer: {done.stderr.strip()}"
                )
        except BaseException:
            store.discard(staged)
            raise
        digest, _ = store.commit(staged)
        tmp = stamp.with_name(f".{stamp.name}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps({"built_at": built_at, "digest": digest}))
        os.replace(tmp, stamp)
        return digest

    # ------------------------------------------------------------------------------- cache

    def _cached(self, key: str) -> str | None:
        """The layer a step with this key made ("" for none), if it is still stored."""
        try:
            digest = (self._cache / key).read_text().strip()
        except OSError:
            return None
        if digest and not self._templates.layers.has(digest):
            return None
        return digest

    def _remember(self, key: str, layer: str | None) -> None:
        self._cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._cache / f".{key}.{secrets.token_hex(4)}"
        tmp.write_text(layer or "")
        os.replace(tmp, self._cache / key)

    async def _step_key(
        self, build: PreparedBuild, step: df.Run | df.Copy, state: _State, states: dict[int, _State]
    ) -> list[Any]:
        if isinstance(step, df.Run):
            return [
                "RUN",
                step.command,
                sorted(step.env),
                sorted(state.env.items()),
                state.workdir,
                state.user,
                build.options.network,
            ]
        sources: list[Any] = []
        if step.from_stage is None:
            for rel in _matches(build.context, step):
                sources.append([rel, _content_hash(build.context / rel)])
        else:
            sources = [step.sources, await self._from_layers(build, step, states)]
        return ["COPY", step.add, step.dest, step.chown, step.chmod, state.workdir, sources]

    async def _from_layers(
        self, build: PreparedBuild, step: df.Copy, states: dict[int, _State]
    ) -> list[str]:
        """The layers COPY --from reads (a registry image's by digest, fetched only when the
        step runs; a built-in adopted as a layer, so a rebuild of it changes the key)."""
        assert step.from_stage is not None
        if step.from_index is not None:
            return list(states[step.from_index].layers)
        if step.from_stage in build.images:
            return list(build.images[step.from_stage][1].diff_ids)
        version = self._templates.resolve(step.from_stage, build.tenant).version
        return await self._layers_of(version)

    # ------------------------------------------------------------------------- sandboxes

    def _layer_path(self, digest: str) -> Path:
        return self._templates.layers.path(digest)

    def _empty_layer(self) -> str:
        if not self._templates.layers.has(_EMPTY_LAYER):
            staged = self._templates.layers.staging()
            self._templates.layers.commit(staged, _EMPTY_LAYER)
        return _EMPTY_LAYER

    @contextlib.asynccontextmanager
    async def _sandbox(
        self, tenant: str, layers: list[str], *, preset: str | None
    ) -> AsyncIterator[tuple[str, AgentClient]]:
        """A build sandbox of these layers; ``preset``: its network policy (None: loopback
        only)."""
        sid = f"build-{secrets.token_hex(6)}"
        paths = tuple(self._layer_path(d) for d in layers) or (
            self._layer_path(await asyncio.to_thread(self._empty_layer)),
        )
        spec = SandboxSpec(
            sandbox_id=sid,
            layers=paths,
            cpu=self._cfg.cpu,
            memory_mb=self._cfg.memory_mb,
            disk_mb=self._cfg.disk_mb,
            pids_max=self._config.limits.pids_per_sandbox,
            hostname="build",
            env=dict(_BASE_ENV),
            isolation="container",
        )
        network = self._network
        address: list[str] = []
        if network is not None and preset is not None and preset != "none":
            policy = network.parse({"preset": preset})

            async def plumb(netns: Path) -> Path:
                attachment = await network.attach(sid, tenant, policy, join=netns)
                address.append(attachment.address)
                return attachment.netns

            spec = replace(spec, network=plumb, nameservers=(network.service_ip,))
        try:
            await self._runtime.create(spec)
            yield sid, AgentClient(lambda: self._runtime.open_agent(sid))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._runtime.destroy(sid))
            if network is not None and spec.network is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(network.detach(sid, address[0] if address else None))

    async def _capture(self, sid: str) -> str | None:
        layers = self._templates.layers
        staged = layers.staging()
        try:
            await self._runtime.export_changes(sid, staged)
            if not any(staged.iterdir()):
                layers.discard(staged)
                return None
            digest, _ = await asyncio.to_thread(layers.commit, staged)
            return digest
        except BaseException:
            layers.discard(staged)
            raise

    # ------------------------------------------------------------------------------- steps

    async def _run(
        self, build: PreparedBuild, step: df.Run, state: _State, emit: Callable[[Event], None]
    ) -> str | None:
        env = {**_BASE_ENV, **dict(step.env), **state.env}
        async with self._sandbox(build.tenant, state.layers, preset=build.options.network) as (
            sid,
            agent,
        ):
            if state.workdir:
                # Missing directories of WORKDIR belong to USER, as BuildKit makes them.
                await agent.mkdir(state.workdir, parents=True, user=state.user or None)
            _, events = await agent.exec_stream(
                ExecRequest(
                    argv=list(step.command),
                    cwd=state.workdir or "/",
                    env=env,
                    user=state.user or None,
                    stdin=False,
                )
            )
            tail = bytearray()
            code: int | None = None

            async def consume() -> None:
                nonlocal code
                async for ev in events:
                    if ev.kind == "exit":
                        code = ev.exit_code
                    elif ev.data:
                        tail.extend(ev.data)
                        del tail[:-_TAIL]
                        emit({"type": "output", "stream": ev.kind, "data": _text(ev.data)})

            try:
                await asyncio.wait_for(consume(), self._cfg.step_timeout_s)
            except TimeoutError:
                raise InvalidRequestError(
                    f"Dockerfile line {step.line}: {step.text} still ran after "
                    f"{self._cfg.step_timeout_s:g} s (builds.step_timeout_s)"
                ) from None
            if code != 0:
                raise InvalidRequestError(
                    f"Dockerfile line {step.line}: {step.text} failed with exit code {code}; "
                    f"its last output:\n{_text(bytes(tail)).rstrip()}"
                )
            return await self._capture(sid)

    async def _copy(
        self, build: PreparedBuild, step: df.Copy, state: _State, states: dict[int, _State]
    ) -> str | None:
        dest = step.dest  # absolute: the parser resolved it against WORKDIR
        user = step.chown.split(":", 1)[0] if step.chown else None
        mode = int(step.chmod, 8) if step.chmod else None
        async with self._sandbox(build.tenant, state.layers, preset=None) as (sid, agent):
            if step.from_stage is None:
                matches = _matches(build.context, step)
                into_dir = step.dest.endswith("/") or len(matches) > 1
                for rel in matches:
                    src = build.context / rel
                    st = src.lstat()
                    if stat.S_ISDIR(st.st_mode):
                        body = _tar_stream(_tar_tree(src, mode))
                        await agent_archive.upload_tar(agent, dest, body, user=user)
                    elif step.add and _is_archive(src):
                        await agent_archive.upload_tar(agent, dest, _file_stream(src), user=user)
                    else:
                        target = (
                            posixpath.join(dest, posixpath.basename(rel))
                            if into_dir or (await _is_dir(agent, dest))
                            else dest
                        )
                        parent, base = posixpath.split(target)
                        body = _tar_stream(_tar_file(src, base, mode))
                        await agent_archive.upload_tar(agent, parent or "/", body, user=user)
            else:
                if step.from_stage in build.images:
                    layers, _ = await self._pull(build, step.from_stage, lambda _e: None)
                else:
                    layers = await self._from_layers(build, step, states)
                async with self._sandbox(build.tenant, layers, preset=None) as (_, src_agent):
                    into_dir = step.dest.endswith("/") or len(step.sources) > 1
                    for source in step.sources:
                        await self._copy_between(
                            step, src_agent, agent, source, dest, into_dir, user
                        )
            return await self._capture(sid)

    async def _copy_between(
        self,
        step: df.Copy,
        src: AgentClient,
        dst: AgentClient,
        source: str,
        dest: str,
        into_dir: bool,
        user: str | None,
    ) -> None:
        path = source if source.startswith("/") else "/" + source
        try:
            info = await src.stat(path)
        except CorralError:
            raise InvalidRequestError(
                f"Dockerfile line {step.line}: {path} not found in {step.from_stage}"
            ) from None
        if info.type == "dir":
            await agent_archive.upload_tar(
                dst, dest, agent_archive.download_tar(src, path), user=user
            )
            return
        target = (
            posixpath.join(dest, posixpath.basename(path))
            if into_dir or await _is_dir(dst, dest)
            else dest
        )
        parent, base = posixpath.split(target)

        async def body() -> AsyncIterator[bytes]:
            header = tarfile.TarInfo(base)
            header.size = info.size
            header.mode = info.mode & 0o7777
            yield header.tobuf(format=tarfile.PAX_FORMAT)
            sent = 0
            async for chunk in src.read_file(path):
                sent += len(chunk)
                yield chunk
            yield b"\0" * (-sent % 512) + b"\0" * 1024

        await agent_archive.upload_tar(dst, parent or "/", body(), user=user)

    # ------------------------------------------------------------------------------ imports

    async def prepare_import(
        self,
        tenant: str,
        name: str,
        *,
        tags: tuple[str, ...] = (),
        image: str | None = None,
        username: str | None = None,
        password: str | None = None,
        archive: AsyncIterable[bytes] | None = None,
        admin: bool = False,
    ) -> PreparedImport:
        from corral.templates import oci

        check_name(name)
        for tag in tags:
            check_name(tag, "tag")
        self._templates.check_writable(name, tenant)
        if (image is None) == (archive is None):
            raise InvalidRequestError("give either an image reference or an image tarball")
        if image is not None:
            if not admin:
                await asyncio.to_thread(self._check_registry_address, image)
            source: Any = oci.RegistrySource(
                image,
                username=username,
                password=password,
                insecure_registries=self._cfg.insecure_registries,
            )
            try:
                resolved = await asyncio.to_thread(source.resolve)
            except BaseException:
                source.close()
                raise
            return PreparedImport(
                tenant, name, tags, source, resolved, resolved.reference, "image", None
            )
        assert archive is not None
        wd = self._new_workdir()
        try:
            path = wd / "image.tar"
            await self._spool(archive, path)
            source = oci.ArchiveSource(path)
            try:
                resolved = await asyncio.to_thread(source.resolve)
            except BaseException:
                source.close()
                raise
            return PreparedImport(tenant, name, tags, source, resolved, "archive", "archive", wd)
        except BaseException:
            remove_tree(wd)
            raise

    def _check_registry_address(self, image: str) -> None:
        """A tenant's import may reach only public registries, or ones the server lists: the
        import runs on the host, outside every sandbox's network policy."""
        from corral.templates import oci

        registry, _, _ = oci.parse_reference(image)
        allowed = {*self._cfg.private_registries, *self._cfg.insecure_registries}
        if registry in allowed:
            return
        host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return  # unresolvable: the import fails as unreachable, reaching nothing
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                raise PermissionDeniedError(
                    f"registry {registry} is on a non-public address ({address}); an admin "
                    "can list it in builds.private_registries"
                )

    def run_import(self, imp: PreparedImport) -> AsyncIterator[Event]:
        def cleanup() -> None:
            with contextlib.suppress(Exception):
                imp.source.close()
            if imp.workdir is not None:
                remove_tree(imp.workdir)

        return self._pump(self._import(imp), cleanup=cleanup)

    def _import(self, imp: PreparedImport) -> Callable[[Callable[[Event], None]], Awaitable[Event]]:
        from corral.templates import oci

        async def work(emit: Callable[[Event], None]) -> Event:
            diff_ids = list(imp.image.diff_ids)

            def progress(p: oci.Progress) -> None:
                emit({"type": "progress", "layer": p.layer, "bytes": p.bytes, "total": p.total})

            with self._templates.holding(diff_ids):
                await asyncio.to_thread(
                    imp.source.fetch, imp.image, self._templates.layers, progress
                )
                settings = _image_settings(imp.image.config)
                version = self._templates.register(
                    imp.name,
                    imp.tenant,
                    source=imp.kind,
                    layers=diff_ids,
                    settings=settings,
                    image=imp.label,
                    build_seconds=round(time.monotonic() - imp.started, 3),
                    tags=imp.tags,
                )
            return self._done(version, imp.started)

        return work


# ------------------------------------------------------------------------------- helpers


def _image_settings(config: Any) -> Settings:
    """An OCI image config (``oci.ImageConfig``) as template settings."""
    return Settings(
        env=_env_pairs(config.env),
        workdir=config.workdir or "",
        user=config.user or "",
        start_cmd=_start_cmd(config.entrypoint, config.cmd),
        ready_cmd=_healthcheck(config.healthcheck),
    )


def _env_pairs(entries: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        k, sep, v = entry.partition("=")
        if sep and k:
            out[k] = v
    return out


def _healthcheck(test: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if not test or test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL" and len(test) > 1:
        return ("/bin/sh", "-c", test[1])
    if test[0] == "CMD":
        return tuple(test[1:]) or None
    return None


def _apply_setting(state: _State, step: df.Step) -> None:
    if isinstance(step, df.Env):
        state.env.update(dict(step.pairs))
    elif isinstance(step, df.Workdir):
        state.workdir = step.path
    elif isinstance(step, df.User):
        state.user = step.user
    elif isinstance(step, df.Shell):
        state.shell = tuple(step.shell)
    elif isinstance(step, df.Entrypoint):
        state.entrypoint = tuple(step.command)
        state.cmd = None  # Docker: a new ENTRYPOINT resets the CMD it inherited
    elif isinstance(step, df.Cmd):
        state.cmd = tuple(step.command)
    elif isinstance(step, df.Healthcheck):
        state.ready = tuple(step.command) if step.command else None
        if step.command:
            # Long enough for the probe's own schedule to see it healthy, as Docker would.
            state.ready_timeout = max(
                60.0, step.start_period + step.retries * (step.interval + step.timeout)
            )


def _needed_stages(stages: tuple[df.Stage, ...]) -> list[int]:
    need = {len(stages) - 1}
    for s in reversed(stages):
        if s.index not in need:
            continue
        if s.base_stage is not None:
            need.add(s.base_stage)
        for step in s.steps:
            if isinstance(step, df.Copy) and step.from_index is not None:
                need.add(step.from_index)
    return sorted(need)


def _extract_context(tar_path: Path, dest: Path) -> None:
    from corral.sdk._tar import extract_tar

    try:
        with open(tar_path, "rb") as f:
            extract_tar(f, dest)
    except CorralError as exc:
        raise InvalidRequestError(f"bad build context: {exc.message}") from None


def _read_dockerfile(context: Path, name: str) -> str:
    rel = posixpath.normpath(name.lstrip("/"))
    if rel.startswith(".."):
        raise InvalidRequestError(f"dockerfile {name!r} is outside the build context")
    path = context / rel
    if path.is_symlink() or not path.is_file():
        raise InvalidRequestError(f"no Dockerfile {name!r} in the build context")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name} is not UTF-8 text") from None


def _matches(context: Path, step: df.Copy) -> list[str]:
    """The context paths (relative, posix) a COPY's sources name, in order, globs expanded."""
    out: list[str] = []
    for pattern in step.sources:
        rel = posixpath.normpath(pattern.lstrip("/"))
        if rel == ".." or rel.startswith("../"):
            raise InvalidRequestError(
                f"Dockerfile line {step.line}: {pattern} is outside the build context"
            )
        if glob.has_magic(rel):
            found = sorted(glob.glob(rel, root_dir=context, include_hidden=True))
        else:
            found = [rel] if os.path.lexists(context / rel) else []
        if not found:
            raise InvalidRequestError(
                f"Dockerfile line {step.line}: {pattern} not found in the build context"
            )
        out.extend("." if f == "." else f for f in found)
    return out


def _content_hash(path: Path) -> str:
    from corral.templates.layers import tree_digest

    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        return tree_digest(path)
    h = hashlib.sha256(repr((stat.S_IMODE(st.st_mode), st.st_size)).encode())
    if stat.S_ISLNK(st.st_mode):
        h.update(os.fsencode(os.readlink(path)))
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _is_archive(path: Path) -> bool:
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


async def _is_dir(agent: AgentClient, path: str) -> bool:
    try:
        return (await agent.stat(path)).type == "dir"
    except CorralError:
        return False


def _tar_file(src: Path, name: str, mode: int | None) -> Iterator[bytes]:
    st = src.lstat()
    info = tarfile.TarInfo(name)
    info.mode = mode if mode is not None else stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(src)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
    else:
        info.size = st.st_size
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from _file_chunks(src, st.st_size)
    yield b"\0" * 1024


def _file_chunks(src: Path, size: int) -> Iterator[bytes]:
    sent = 0
    with open(src, "rb") as f:
        while sent < size and (chunk := f.read(min(_CHUNK, size - sent))):
            sent += len(chunk)
            yield chunk
    if sent < size:  # shrank while we read: pad, the header promised ``size``
        yield b"\0" * (size - sent)
    yield b"\0" * (-size % 512)


def _tar_tree(root: Path, mode: int | None) -> Iterator[bytes]:
    """A tar of ``root``'s contents (names relative to it); ``mode`` overrides every entry's."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime = int(st.st_mtime)
            info.mode = mode if mode is not None else stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                yield info.tobuf(format=tarfile.PAX_FORMAT)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                yield info.tobuf(format=tarfile.PAX_FORMAT)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                yield info.tobuf(format=tarfile.PAX_FORMAT)
                yield from _file_chunks(path, st.st_size)
    yield b"\0" * 1024


async def _tar_stream(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking generator (it reads files) as an async stream, batched to ~1 MiB."""
    end = object()
    while True:
        batch = await asyncio.to_thread(_batch, chunks, end)
        if batch is end:
            return
        assert isinstance(batch, bytes)
        yield batch


def _batch(chunks: Iterator[bytes], end: object) -> bytes | object:
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) >= _CHUNK:
            return bytes(out)
    return bytes(out) if out else end


async def _file_stream(path: Path) -> AsyncIterator[bytes]:
    f: BinaryIO = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            yield chunk
    finally:
        f.close()
