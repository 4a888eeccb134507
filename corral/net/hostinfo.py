"""Read-only facts about the host's own network (routes), checked before corral adds to it."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from corral.errors import RuntimeFailure

__all__ = ["overlapping_routes"]


def overlapping_routes(subnet: ipaddress.IPv4Network, own_prefix: str) -> list[str]:
    """Routes of the host's main table that overlap ``subnet``, other than corral's own ones
    (``own_prefix`` interfaces). A default route does not count: more specific routes win."""
    found: list[str] = []
    try:
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for route in ipr.get_routes(family=2, table=254):
                dst_len = route["dst_len"]
                if dst_len == 0:
                    continue
                dst = route.get_attr("RTA_DST")
                oif = names.get(route.get_attr("RTA_OIF"), "")
                if dst is None or oif.startswith(own_prefix):
                    continue
                net = ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False)
                if net.overlaps(subnet):
                    found.append(f"{net} dev {oif}")
    except OSError as exc:
        raise RuntimeFailure(f"cannot read the host's routes: {exc}") from exc
    return found
