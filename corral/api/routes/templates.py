"""Template routes."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.deps import Admin, Caller, Svc
from corral.api.schemas import TemplateOut

router = APIRouter(prefix="/v1/templates", tags=["templates"])


@router.get("")
async def list_templates(_who: Caller, svc: Svc) -> list[TemplateOut]:
    return [TemplateOut.of(t) for t in svc.templates.list()]


@router.get("/{name}")
async def get_template(name: str, _who: Caller, svc: Svc) -> TemplateOut:
    return TemplateOut.of(svc.templates.get(name))


@router.post("/{name}/build")
async def build_template(name: str, _who: Admin, svc: Svc, force: bool = False) -> TemplateOut:
    return TemplateOut.of(await svc.templates.build(name, force=force))
