"""The CLI's networking pieces: a policy from flags or a file, and how policies and logs print."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from corral.cli._input import load_json
from corral.errors import InvalidRequestError, NotFoundError
from corral.sdk._wire import network_document
from corral.sdk.models import EgressEvent, NetworkInfo, SandboxInfo

if TYPE_CHECKING:
    from corral.sdk.sandbox import Sandbox

__all__ = [
    "egress_table",
    "follow_log",
    "load_policy_file",
    "network_rows",
    "network_table",
    "policy_from_flags",
    "policy_summary",
]


def _clean(value: object) -> str:
    # Names in the log come from inside the sandbox: no escape sequences reach the terminal.
    text = "-" if value is None or value == "" else str(value)
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def load_policy_file(path: Path) -> dict[str, Any]:
    """A policy document from a JSON file, ``-`` meaning stdin."""
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{path}: a network policy must be a JSON object")
    return doc


def _ports(values: Sequence[str] | None) -> list[int | str] | None:
    if not values:
        return None
    return [int(v) if v.strip().isdigit() else v.strip() for v in values]


def policy_from_flags(
    *,
    file: Path | None,
    preset: str | None,
    allow_domains: Sequence[str] | None,
    allow_cidrs: Sequence[str] | None,
    deny_domains: Sequence[str] | None,
    deny_cidrs: Sequence[str] | None,
    ports: Sequence[str] | None,
    egress_mbit: float | None,
) -> dict[str, Any] | None:
    """The document the flags describe; None when no flag was given."""
    flags = (preset, allow_domains, allow_cidrs, deny_domains, deny_cidrs, ports, egress_mbit)
    if file is not None and any(f is not None and f != [] for f in flags):
        # Said before reading the file, which may be stdin.
        raise InvalidRequestError("give either --file or the policy flags, not both")
    return network_document(
        None if file is None else load_policy_file(file),
        preset=preset,
        allow_domains=list(allow_domains) if allow_domains else None,
        allow_cidrs=list(allow_cidrs) if allow_cidrs else None,
        deny_domains=list(deny_domains) if deny_domains else None,
        deny_cidrs=list(deny_cidrs) if deny_cidrs else None,
        ports=_ports(ports),
        egress_mbit=egress_mbit,
    )


def _rule(rule: object) -> str:
    if not isinstance(rule, Mapping):
        return _clean(rule)
    target = rule.get("domain") or rule.get("cidr") or "?"
    text = str(target)
    protocol = rule.get("protocol")
    if protocol and protocol != "any":
        text += f" {protocol}"
    ports = rule.get("ports")
    if ports:
        text += " ports " + ",".join(str(p) for p in ports)
    return _clean(text)


def _rules(policy: Mapping[str, Any], kind: str) -> list[str]:
    rules = policy.get(kind)
    return [_rule(r) for r in rules] if isinstance(rules, list) else []


def _egress(policy: Mapping[str, Any]) -> str:
    mbit = policy.get("egress_mbit")
    if mbit is None:
        return "server default"
    return "unlimited" if mbit == 0 else f"{mbit:g} Mbit/s"


def policy_summary(policy: Mapping[str, Any] | None) -> str:
    """One line: preset, allow and deny rules, egress rate."""
    if policy is None:
        return "disabled on this server"
    allow = ", ".join(_rules(policy, "allow")) or "-"
    deny = ", ".join(_rules(policy, "deny")) or "-"
    preset = _clean(policy.get("preset") or "none")
    return f"preset {preset}; allow {allow}; deny {deny}; egress {_egress(policy)}"


def network_rows(info: SandboxInfo) -> list[tuple[str, str]]:
    """Rows ``corral info`` adds about the network."""
    if info.network is None:
        return [("network", policy_summary(None))]
    if info.public_ports:
        ports = "public (no token needed)"
    else:
        ports = "access token required (corral url ID PORT)"
    return [
        ("address", info.address or "-"),
        ("network", policy_summary(info.network)),
        ("ports", ports),
    ]


def _key_value_table(rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, Text(value))
    return table


def network_table(net: NetworkInfo) -> Table:
    rows: list[tuple[str, str]] = [
        ("address", net.address or "-"),
        ("proxy", net.proxy or "-"),
        ("preset", _clean(net.policy.get("preset") or "none")),
    ]
    for kind in ("allow", "deny"):
        rules = _rules(net.policy, kind) or ["-"]
        rows += [(kind if i == 0 else "", r) for i, r in enumerate(rules)]
    rows.append(("egress", _egress(net.policy)))
    return _key_value_table(rows)


def _time(e: EgressEvent) -> str:
    return e.time.astimezone().strftime("%Y-%m-%d %H:%M:%S") if e.time else "-"


def egress_table(events: Sequence[EgressEvent], *, header: bool = True) -> Table:
    table = Table(
        box=None, pad_edge=False, show_edge=False, header_style="bold", show_header=header
    )
    for h in ("TIME", "KIND", "DECISION", "NAME", "IP", "PORT", "BYTES OUT/IN", "REASON"):
        table.add_column(h, no_wrap=h != "REASON")
    for e in events:
        moved = f"{e.bytes_out}/{e.bytes_in}" if e.kind != "dns" else "-"
        table.add_row(
            _time(e),
            _clean(e.kind),
            Text(_clean(e.decision), style="green" if e.allowed else "red"),
            Text(_clean(e.name)),
            Text(_clean(e.ip)),
            _clean(e.port),
            moved,
            Text(_clean(e.reason)),
        )
    return table


def follow_log(
    sbx: Sandbox,
    events: list[EgressEvent],
    *,
    after: int,
    limit: int,
    interval: float,
    emit: Callable[[list[EgressEvent]], None],
) -> None:
    """Hand ``events`` and every later batch to ``emit`` until the sandbox has ended."""
    ended = False
    while True:
        if events:
            emit(events)
            after = events[-1].id
        if len(events) < limit:  # caught up
            if ended:
                return
            try:
                # Once the sandbox has ended, one more look collects its last events.
                ended = sbx.info().state in ("stopped", "error")
            except NotFoundError:  # already forgotten by the server
                return
            if not ended:
                time.sleep(interval)
        try:
            events = sbx.network.log(after=after, limit=limit)
        except NotFoundError:
            return
