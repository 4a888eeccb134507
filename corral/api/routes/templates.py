"""Template routes: list and inspect, Dockerfile builds and OCI imports (streamed as ndjson
progress events), versions and tags, delete, and garbage collection (docs/API.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from corral.api.deps import Admin, Caller, Svc
from corral.api.schemas import CollectOut, ImportIn, TagIn, TemplateOut
from corral.core import Principal
from corral.core.builds import BuildOptions, Event
from corral.errors import InvalidRequestError

router = APIRouter(prefix="/v1/templates", tags=["templates"])

NDJSON = "application/x-ndjson"
_TAR_TYPES = ("application/x-tar", "application/octet-stream", "application/gzip")


def _scope(who: Principal) -> str | None:
    """Whose templates a caller sees: its tenant's; an admin sees every tenant's."""
    return None if who.admin else who.tenant_id


def _stream(events: AsyncIterator[Event]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@router.get("")
async def list_templates(who: Caller, svc: Svc) -> list[TemplateOut]:
    return [
        TemplateOut.of(v, built=svc.templates.is_built(v)) for v in svc.templates.list(_scope(who))
    ]


@router.post("/gc")
async def collect(_who: Admin, svc: Svc) -> CollectOut:
    """Remove every layer no template version, sandbox, snapshot or build needs."""
    removed, freed = await svc.templates.collect()
    return CollectOut(layers_removed=removed, bytes_freed=freed)


@router.get("/{ref}")
async def get_template(ref: str, who: Caller, svc: Svc) -> TemplateOut:
    v = svc.templates.get(ref, _scope(who))
    return TemplateOut.of(v, built=svc.templates.is_built(v))


@router.get("/{name}/versions")
async def list_versions(name: str, who: Caller, svc: Svc) -> list[TemplateOut]:
    return [
        TemplateOut.of(v, built=svc.templates.is_built(v))
        for v in svc.templates.versions(name, _scope(who))
    ]


@router.post("/{name}/build")
async def build_builtin(name: str, _who: Admin, svc: Svc, force: bool = False) -> TemplateOut:
    """(Re)build a built-in template (minimal, base)."""
    v = await svc.templates.build(name, force=force)
    return TemplateOut.of(v, built=svc.templates.is_built(v))


@router.post("/{name}/builds")
async def build(
    name: str,
    request: Request,
    who: Caller,
    svc: Svc,
    dockerfile: str = "Dockerfile",
    tag: Annotated[list[str] | None, Query()] = None,
    build_arg: Annotated[list[str] | None, Query()] = None,
    no_cache: bool = False,
    network: str = "registries",
    ready_cmd: str | None = None,
    ready_timeout: Annotated[float | None, Query(gt=0, le=3600)] = None,
) -> StreamingResponse:
    """Build template ``name`` from the Dockerfile in the uploaded context (a tar)."""
    args: dict[str, str] = {}
    for item in build_arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"build_arg {item!r} is not KEY=VALUE")
        args[key] = value
    options = BuildOptions(
        dockerfile=dockerfile,
        tags=tuple(tag or ()),
        build_args=args,
        no_cache=no_cache,
        network=network,
        ready_cmd=ready_cmd,
        ready_timeout=ready_timeout,
    )
    prepared = await svc.builds.prepare_build(
        who.tenant_id, name, request.stream(), options, admin=who.admin
    )
    return _stream(svc.builds.run_build(prepared))


@router.post("/{name}/imports")
async def import_image(
    name: str,
    request: Request,
    who: Caller,
    svc: Svc,
    tag: Annotated[list[str] | None, Query()] = None,
) -> StreamingResponse:
    """Import an OCI image from a registry (JSON body) or from a tarball (tar body)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    tags = tuple(tag or ())
    if ctype in _TAR_TYPES:
        prepared = await svc.builds.prepare_import(
            who.tenant_id, name, tags=tags, archive=request.stream()
        )
    elif ctype == "application/json":
        try:
            body = ImportIn.model_validate_json(await request.body())
        except ValueError as exc:
            raise InvalidRequestError(f"bad import request: {exc}") from None
        prepared = await svc.builds.prepare_import(
            who.tenant_id,
            name,
            tags=tags,
            image=body.image,
            username=body.username,
            password=body.password,
            admin=who.admin,
        )
    else:
        raise InvalidRequestError(
            "send JSON {'image': ...} or an image tarball as application/x-tar"
        )
    return _stream(svc.builds.run_import(prepared))


@router.put("/{name}/tags/{tag}")
async def set_tag(name: str, tag: str, body: TagIn, who: Caller, svc: Svc) -> TemplateOut:
    v = svc.templates.tag(name, tag, body.version, _scope(who))
    return TemplateOut.of(v, built=svc.templates.is_built(v))


@router.delete("/{name}/tags/{tag}", status_code=204)
async def remove_tag(name: str, tag: str, who: Caller, svc: Svc) -> Response:
    svc.templates.untag(name, tag, _scope(who))
    return Response(status_code=204)


@router.delete("/{ref}", status_code=204)
async def delete_template(ref: str, who: Caller, svc: Svc) -> Response:
    """Delete a template (``NAME``) or one version (``NAME@N``, ``NAME:TAG``). Sandboxes and
    snapshots made from it keep working; its layers go once nothing uses them."""
    await svc.templates.delete(ref, _scope(who))
    return Response(status_code=204)
