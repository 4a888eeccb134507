"""E2B's control-plane API (``api.e2b.app``), mapped onto corral's services.

Each route parses E2B's JSON into corral's own commands; the answers are E2B's shapes, and
errors are ``{"code": <status>, "message": ...}``. What corral cannot do as E2B does is refused
with a 400 that says so, never accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import math
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.api.deps import Caller, Svc
from corral.api.e2b.envd import ENVD_VERSION
from corral.api.e2b.errors import E2BRoute, e2b_error
from corral.core import SandboxState
from corral.core.commands import CreateSandbox, ForkSnapshot
from corral.core.sandboxes import Sandbox
from corral.core.services import Services
from corral.core.snapshots import Snapshot
from corral.core.tenants import Principal
from corral.errors import CorralError, InvalidRequestError, NotFoundError

__all__ = ["router"]

CLIENT_ID = "corral"
_ASLEEP = (SandboxState.PAUSED, SandboxState.HIBERNATED)
_MAX_PAGE = 1000

router = APIRouter(tags=["e2b"], route_class=E2BRoute)


class _Wire(BaseModel):
    # Every field e2b 2.63 sends is named, so an unknown one is a client we do not speak.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _AutoResume(_Wire):
    enabled: bool


class _Network(_Wire):
    allow_public_traffic: bool | None = Field(default=None, alias="allowPublicTraffic")
    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")
    dns_servers: list[str] | None = Field(default=None, alias="dnsServers")
    egress_proxy: Any = Field(default=None, alias="egressProxy")
    mask_request_host: str | None = Field(default=None, alias="maskRequestHost")
    https_ports: list[int] | None = Field(default=None, alias="httpsPorts")
    rules: Any = None
    allow_internet_access: bool | None = None  # only in updates


class NewSandbox(_Wire):
    template_id: str = Field(alias="templateID", min_length=1, max_length=256)
    # Seconds; unset, the route's default (15 for /sandboxes, 300 for /v2/sandboxes).
    timeout: int | None = Field(default=None, gt=0)
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_pause_memory: bool = Field(default=True, alias="autoPauseMemory")
    auto_resume: _AutoResume | None = Field(default=None, alias="autoResume")
    secure: bool | None = None
    allow_internet_access: bool | None = None
    network: _Network | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    mcp: Any = None
    iam: Any = None
    volume_mounts: list[Any] | None = Field(default=None, alias="volumeMounts")


class _Connect(_Wire):
    timeout: int | None = Field(default=None, gt=0)
    memory: bool | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")


class _Timeout(_Wire):
    timeout: int = Field(gt=0)


class _Refresh(_Wire):
    duration: int | None = Field(default=None, ge=0)


class _Pause(_Wire):
    memory: bool = True
    require_healthy_guest: bool = Field(default=False, alias="requireHealthyGuest")


class _SnapshotRequest(_Wire):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    memory: bool | None = None


class _Fork(_Wire):
    timeout: int = Field(default=15, gt=0)
    count: int = Field(default=1, ge=1)


# ----------------------------------------------------------------------------- shapes


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _template_id(sb: Sandbox) -> str:
    return sb.template.partition("@")[0]


def _state(sb: Sandbox) -> str:
    return "paused" if sb.state in _ASLEEP else "running"


def _end_at(sb: Sandbox) -> datetime:
    if sb.expires_at is not None:
        return sb.expires_at
    return sb.created_at + timedelta(seconds=sb.timeout)


def _sandbox(svc: Services, sb: Sandbox) -> dict[str, Any]:
    return {
        "templateID": _template_id(sb),
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": svc.envd.token(sb.id),
        "domain": None,
    }


def _listed(sb: Sandbox) -> dict[str, Any]:
    return {
        "templateID": _template_id(sb),
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "startedAt": _iso(sb.created_at),
        "endAt": _iso(_end_at(sb)),
        "cpuCount": max(1, math.ceil(sb.cpu)),
        "memoryMB": sb.memory_mb,
        "diskSizeMB": sb.disk_mb,
        "state": _state(sb),
        "envdVersion": ENVD_VERSION,
        "metadata": dict(sb.metadata),
    }


def _detail(svc: Services, sb: Sandbox) -> dict[str, Any]:
    network = sb.network or {}
    return {
        **_listed(sb),
        "envdAccessToken": svc.envd.token(sb.id),
        "domain": None,
        "allowInternetAccess": network.get("preset") == "public",
        "lifecycle": {
            "autoResume": sb.auto_resume,
            "onTimeout": "pause" if sb.on_timeout in ("pause", "hibernate") else "kill",
        },
    }


def _snapshot_info(snap: Snapshot) -> dict[str, Any]:
    names = [snap.name] if snap.name and snap.name != snap.id else []
    return {"snapshotID": snap.id, "names": names}


# ----------------------------------------------------------------------------- network


def _target(entry: str) -> dict[str, Any]:
    """An ``allowOut``/``denyOut`` entry as a corral rule: an address or network, else a name."""
    with contextlib.suppress(ValueError):
        return {"cidr": str(ipaddress.ip_network(entry, strict=False))}
    return {"domain": entry}


def _covers(pattern: str, name: str) -> bool:
    """Whether the wildcard ``*.suffix`` takes in ``name`` (itself a name or a wildcard)."""
    return pattern.startswith("*.") and name.endswith(pattern[1:])


def _overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if "cidr" in a and "cidr" in b:
        x, y = ipaddress.ip_network(a["cidr"]), ipaddress.ip_network(b["cidr"])
        return x.version == y.version and x.overlaps(y)
    if "domain" in a and "domain" in b:
        m, n = str(a["domain"]).lower(), str(b["domain"]).lower()
        return m == n or _covers(m, n) or _covers(n, m)
    return False


def network_policy(allow_internet: bool | None, net: _Network | None) -> dict[str, Any]:
    """E2B's egress settings as a corral policy.

    E2B: internet on unless ``allow_internet_access`` is false; ``denyOut`` closes addresses,
    ``allowOut`` reopens them and wins over ``denyOut``; ``0.0.0.0/0`` in ``denyOut`` denies all.
    corral: deny-all unless a preset or rule opens something, and ``deny`` wins over ``allow``.
    An ``allowOut`` entry inside a ``denyOut`` one (other than "all") has no corral equivalent.
    """
    net = net or _Network()
    for field, value in (
        ("dnsServers", net.dns_servers),
        ("egressProxy", net.egress_proxy),
        ("maskRequestHost", net.mask_request_host),
        ("httpsPorts", net.https_ports),
        ("rules", net.rules),
    ):
        if value:
            raise InvalidRequestError(f"network.{field} is not supported by corral")
    allow = [_target(e) for e in net.allow_out or []]
    deny: list[dict[str, Any]] = []
    everything = allow_internet is not False
    for entry in net.deny_out or []:
        rule = _target(entry)
        if rule.get("cidr") in ("0.0.0.0/0", "::/0"):
            everything = False
        else:
            deny.append(rule)
    for a in allow:
        for d in deny:
            if _overlaps(a, d):
                raise InvalidRequestError(
                    f"allowOut {a.get('cidr') or a.get('domain')!r} lies inside denyOut "
                    f"{d.get('cidr') or d.get('domain')!r}: in corral a deny rule always wins, "
                    "so name the denied ranges without the allowed ones"
                )
    policy: dict[str, Any] = {}
    if everything:
        policy["preset"] = "public"
    if allow:
        policy["allow"] = allow
    if deny:
        policy["deny"] = deny
    return policy


# ----------------------------------------------------------------------------- sandboxes


def _unsupported(body: NewSandbox) -> None:
    for field, value in (
        ("mcp", body.mcp),
        ("iam", body.iam),
        ("volumeMounts", body.volume_mounts),
    ):
        if value:
            raise InvalidRequestError(f"{field} is not supported by corral")


async def _create(svc: Services, who: Principal, body: NewSandbox, timeout: int) -> Response:
    _unsupported(body)
    network = body.network
    policy: dict[str, Any] | None = network_policy(body.allow_internet_access, network)
    if not svc.config.network.enabled and network is None and body.allow_internet_access is None:
        # A server without networking: asked for nothing, the sandbox gets what there is (none).
        policy = None
    cmd = CreateSandbox(
        template=body.template_id,
        isolation=svc.config.e2b.isolation,
        timeout=body.timeout or timeout,
        env=body.env_vars or {},
        metadata=body.metadata or {},
        network=policy,
        public_ports=bool(network and network.allow_public_traffic),
        # E2B's auto-pause on timeout keeps memory unless told otherwise.
        on_timeout=(
            ("pause" if body.auto_pause_memory else "hibernate") if body.auto_pause else "kill"
        ),
        auto_resume=bool(body.auto_resume and body.auto_resume.enabled),
    )
    # A snapshot's id stands where a template's would (``Sandbox.create(snapshot_id)``).
    snap: Snapshot | None = None
    with contextlib.suppress(NotFoundError):
        snap = await svc.snapshots.get(who, body.template_id)
    if snap is not None:
        fields = cmd.model_dump(exclude={"template"}, exclude_unset=True)
        sb = await svc.snapshots.create_from(who, CreateSandbox(**{**fields, "snapshot": snap.id}))
    else:
        sb = await svc.pools.create(who, cmd)
    return JSONResponse(_sandbox(svc, sb), status_code=201)


@router.post("/sandboxes", status_code=201)
async def create_v1(body: NewSandbox, who: Caller, svc: Svc) -> Response:
    return await _create(svc, who, body, 15)


@router.post("/v2/sandboxes", status_code=201)
async def create_v2(body: NewSandbox, who: Caller, svc: Svc) -> Response:
    return await _create(svc, who, body, 300)


def _states(state: list[str] | None) -> set[SandboxState]:
    wanted: set[SandboxState] = set()
    for item in state or ["running,paused"]:
        for s in item.split(","):
            if s == "running":
                wanted.add(SandboxState.RUNNING)
            elif s == "paused":
                wanted.update(_ASLEEP)
            elif s:
                raise InvalidRequestError(f"unknown state {s!r}; known: running, paused")
    return wanted


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """E2B sends the filter as a query string inside one query parameter."""
    if not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidRequestError(
            f"metadata must be an encoded query string, got {raw!r}"
        ) from None
    return dict(pairs)


class _Listed(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...


_L = TypeVar("_L", bound=_Listed)


def _page(items: list[_L], limit: int, next_token: str | None) -> tuple[list[_L], dict[str, str]]:
    """Newest first, as E2B lists, one page after ``next_token``; the token of the next page
    (in the ``x-next-token`` header) is the last listed item's place in that order."""

    def place(item: _L) -> tuple[str, str]:
        return _iso(item.created_at), item.id

    ordered = sorted(items, key=place, reverse=True)
    if next_token:
        try:
            created, iid = json.loads(base64.urlsafe_b64decode(next_token.encode()))
        except (ValueError, TypeError, binascii.Error):
            raise InvalidRequestError("nextToken is not one this server gave") from None
        ordered = [i for i in ordered if place(i) < (str(created), str(iid))]
    page = ordered[:limit]
    if len(ordered) <= limit:
        return page, {}
    token = base64.urlsafe_b64encode(json.dumps(list(place(page[-1]))).encode()).decode()
    return page, {"x-next-token": token}


@router.get("/v2/sandboxes")
async def list_v2(
    who: Caller,
    svc: Svc,
    metadata: str | None = None,
    state: Annotated[list[str] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> Response:
    found = await svc.sandboxes.list(
        who, states=_states(state), metadata=_metadata_filter(metadata)
    )
    page, headers = _page(found, limit, next_token)
    return JSONResponse([_listed(sb) for sb in page], headers=headers)


@router.get("/sandboxes")
async def list_v1(who: Caller, svc: Svc, metadata: str | None = None) -> Response:
    found = await svc.sandboxes.list(
        who, states=[SandboxState.RUNNING], metadata=_metadata_filter(metadata)
    )
    return JSONResponse([_listed(sb) for sb in found])


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state in (SandboxState.STOPPED, SandboxState.STOPPING, SandboxState.ERROR):
        raise NotFoundError(f"sandbox {sandbox_id} is {sb.state.value}")
    return JSONResponse(_detail(svc, sb))


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state is SandboxState.STOPPED:
        raise NotFoundError(f"sandbox {sandbox_id} is stopped")
    await svc.sandboxes.kill(who, sandbox_id)
    svc.envd.forget(sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, body: _Timeout, who: Caller, svc: Svc) -> Response:
    await svc.sandboxes.set_timeout(who, sandbox_id, body.timeout)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
async def refresh(sandbox_id: str, who: Caller, svc: Svc, body: _Refresh | None = None) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    seconds = body.duration if body is not None and body.duration else sb.timeout
    await svc.sandboxes.set_timeout(who, sandbox_id, max(1, seconds))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(sandbox_id: str, who: Caller, svc: Svc, body: _Pause | None = None) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state in _ASLEEP:
        return e2b_error(409, f"sandbox {sandbox_id} is already paused")
    if body is not None and not body.memory:
        await svc.sandboxes.hibernate(who, sandbox_id)
    else:
        await svc.sandboxes.pause(who, sandbox_id)
    return Response(status_code=204)


async def _connect(svc: Services, who: Principal, sandbox_id: str, body: _Connect) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state not in (SandboxState.RUNNING, *_ASLEEP):
        raise NotFoundError(f"sandbox {sandbox_id} is {sb.state.value}")
    resumed = sb.state in _ASLEEP
    if resumed:
        sb = await svc.sandboxes.resume(who, sandbox_id)
    if body.timeout is not None:
        sb = await svc.sandboxes.set_timeout(who, sandbox_id, body.timeout)
    return JSONResponse(_sandbox(svc, sb), status_code=201 if resumed else 200)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect_v2(
    sandbox_id: str, who: Caller, svc: Svc, body: _Connect | None = None
) -> Response:
    return await _connect(svc, who, sandbox_id, body or _Connect())


@router.post("/sandboxes/{sandbox_id}/connect")
async def connect_v1(
    sandbox_id: str, who: Caller, svc: Svc, body: _Connect | None = None
) -> Response:
    return await _connect(svc, who, sandbox_id, body or _Connect())


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
async def resume(sandbox_id: str, who: Caller, svc: Svc, body: _Connect | None = None) -> Response:
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state not in _ASLEEP:
        return e2b_error(409, f"sandbox {sandbox_id} is not paused")
    response = await _connect(svc, who, sandbox_id, body or _Connect())
    response.status_code = 201
    return response


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(sandbox_id: str, body: _Network, who: Caller, svc: Svc) -> Response:
    if body.allow_public_traffic is not None:
        raise InvalidRequestError("allowPublicTraffic is set at create only")
    policy = network_policy(body.allow_internet_access, body)
    await svc.sandboxes.update_network(who, sandbox_id, policy)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/metrics")
async def metrics(
    sandbox_id: str,
    who: Caller,
    svc: Svc,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """CPU, memory and disk samples, every 5 s from the first time they are asked for."""
    sb = await svc.sandboxes.get(who, sandbox_id)
    if sb.state in (SandboxState.STOPPED, SandboxState.STOPPING, SandboxState.ERROR):
        raise NotFoundError(f"sandbox {sandbox_id} is {sb.state.value}")
    samples = await svc.metrics.series(sb, start, end)
    return JSONResponse(
        [
            {
                "timestamp": _iso(datetime.fromtimestamp(m.at, UTC)),
                "timestampUnix": int(m.at),
                "cpuCount": m.cpu_count,
                "cpuUsedPct": m.cpu_used_pct,
                "memUsed": m.memory_used,
                "memTotal": m.memory_total,
                "memCache": m.memory_cache,
                "diskUsed": m.disk_used,
                "diskTotal": m.disk_total,
            }
            for m in samples
        ]
    )


# ----------------------------------------------------------------------------- snapshots


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def take_snapshot(
    sandbox_id: str, who: Caller, svc: Svc, body: _SnapshotRequest | None = None
) -> Response:
    # corral's snapshots hold the filesystem, never memory: ``memory`` changes nothing here.
    snap = await svc.snapshots.take(who, sandbox_id, body.name if body is not None else None)
    return JSONResponse(_snapshot_info(snap), status_code=201)


@router.get("/snapshots")
async def list_snapshots(
    who: Caller,
    svc: Svc,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> Response:
    snaps = await svc.snapshots.list(who, sandbox_id)
    if name is not None:
        snaps = [s for s in snaps if s.name == name]
    page, headers = _page(snaps, limit, next_token)
    return JSONResponse([_snapshot_info(s) for s in page], headers=headers)


@router.delete("/templates/{template_id}", status_code=204)
async def delete_template(template_id: str, who: Caller, svc: Svc) -> Response:
    """E2B deletes snapshots through the templates route (a snapshot is a template there)."""
    try:
        await svc.snapshots.delete(who, template_id)
    except NotFoundError:
        await svc.templates.delete(template_id, who.tenant_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
async def fork(sandbox_id: str, who: Caller, svc: Svc, body: _Fork | None = None) -> Response:
    """N copies of a running sandbox's filesystem, each a sandbox of its own."""
    body = body or _Fork()
    snap = await svc.snapshots.take(who, sandbox_id, None)
    try:
        made = await svc.snapshots.fork(
            who, snap.id, ForkSnapshot(count=body.count, timeout=body.timeout)
        )
    finally:
        # The forks hold the layers they need; the snapshot itself was only the means.
        with contextlib.suppress(CorralError):
            await svc.snapshots.delete(who, snap.id)
    return JSONResponse([{"sandbox": _sandbox(svc, sb)} for sb in made], status_code=201)
