"""What injecting a secret costs: the egress proxy terminating TLS toward a bound host.

Builds the fake internet (as the tests do), starts a ``corral server`` trusting its CA as an
upstream, binds a secret to ``api.allowed.test`` in one sandbox, and measures from inside it,
against the same fake HTTPS server:

- a new HTTPS connection + one request (TLS handshake included), to a bound host (intercepted:
  two handshakes, one of them with a leaf from the sandbox's CA) and to an unbound one (spliced);
- a request on a kept-alive connection (the steady state of an SDK's client);
- a 256 MiB download over one connection.

Usage: ``python -m bench.bench_secrets [--templates-from /var/lib/corral] [--runs 200]``.
Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import Row, percentile, publish, table
from bench.bench_network import _env, _fake_internet, _network_config, _run_in
from bench.bench_sandbox import _prepare_data_dir, _server, _Tracker
from corral.agent.build import agent_binary_path
from corral.config import ServerConfig
from corral.core.network import purge_network
from corral.runtime.container import ContainerRuntime
from corral.templates.fs import remove_tree

__all__ = ["main"]

_MIB = 1 << 20
_DOWNLOAD = 256 * _MIB

# Inside the sandbox. It trusts the system store (where the sandbox's CA was put) and the fake
# internet's CA (for the unbound host, which shows its own certificate).
_CLIENT = r"""
import http.client, os, ssl, sys, time
host, mode, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context()
ctx.load_verify_locations("/tmp/fake-ca.pem")
hdr = {"Authorization": "Bearer " + os.environ["API_KEY"]}
out = []
if mode == "fresh":
    for i in range(runs + 10):
        t = time.perf_counter()
        c = http.client.HTTPSConnection(host, context=ctx, timeout=30)
        c.request("GET", "/lat", headers=hdr)
        c.getresponse().read()
        c.close()
        if i >= 10:
            out.append((time.perf_counter() - t) * 1000)
elif mode == "keepalive":
    c = http.client.HTTPSConnection(host, context=ctx, timeout=30)
    for i in range(runs + 10):
        t = time.perf_counter()
        c.request("GET", "/lat", headers=hdr)
        c.getresponse().read()
        if i >= 10:
            out.append((time.perf_counter() - t) * 1000)
else:
    c = http.client.HTTPSConnection(host, context=ctx, timeout=60)
    t = time.perf_counter()
    c.request("GET", "/bytes/" + mode, headers=hdr)
    r = c.getresponse()
    n = 0
    while chunk := r.read(1 << 20):
        n += len(chunk)
    out = [n, time.perf_counter() - t]
print(" ".join(str(x) for x in out))
"""

_BOUND = "api.allowed.test"
_UNBOUND = "www.allowed.test"


def _measure(tracker: _Tracker, ca_pem: str, runs: int) -> list[Row]:
    from corral import secrets

    secrets.set("bench-key", "sk-bench-" + "x" * 40)
    sbx = tracker.create(
        "base",
        network={"allow": [{"domain": "*.allowed.test"}]},
        secrets=[{"name": "bench-key", "hosts": [_BOUND], "env": "API_KEY"}],
        timeout=900,
    )
    sbx.files.write("/tmp/fake-ca.pem", ca_pem)
    rows: list[Row] = []
    for mode, metric in (
        ("fresh", "new HTTPS connection + request"),
        ("keepalive", "request on a kept-alive HTTPS connection"),
    ):
        spliced = [float(x) for x in _run_in(sbx, _CLIENT, _UNBOUND, mode, str(runs)).split()]
        injected = [float(x) for x in _run_in(sbx, _CLIENT, _BOUND, mode, str(runs)).split()]
        added = percentile(injected, 50) - percentile(spliced, 50)
        rows.append(Row.latency(metric, "unbound host (spliced)", "base", spliced, "baseline"))
        rows.append(
            Row.latency(
                metric,
                "bound host (TLS terminated, secret injected)",
                "base",
                injected,
                f"adds p50 {added:.2f} ms",
            )
        )
    metric = f"{_DOWNLOAD // _MIB} MiB HTTPS download"
    rates: dict[str, float] = {}
    for host in (_UNBOUND, _BOUND):
        n, secs = _run_in(sbx, _CLIENT, host, str(_DOWNLOAD), "1").split()
        if int(n) != _DOWNLOAD:
            raise RuntimeError(f"{host}: received {n} bytes instead of {_DOWNLOAD}")
        rates[host] = int(n) / float(secs) / 1e6
    rows.append(
        Row(
            metric, "unbound host (spliced)", "base", f"{rates[_UNBOUND]:.0f} MB/s", "1", "baseline"
        )
    )
    rows.append(
        Row(
            metric,
            "bound host (TLS terminated, secret injected)",
            "base",
            f"{rates[_BOUND]:.0f} MB/s",
            "1",
            f"{rates[_BOUND] / rates[_UNBOUND] * 100:.0f} % of spliced",
        )
    )
    secrets.delete("bench-key")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_secrets")
    p.add_argument("--templates-from", default="/var/lib/corral", help="data dir with templates")
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=200, help="requests per latency figure")
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-secrets-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = _prepare_data_dir(args, tmp, ["base"])
        tracker = _Tracker()
        config: dict[str, Any] = {}
        with _fake_internet(tmp) as net:
            (tmp / "upstream-ca.pem").write_text(net.ca_pem)
            config = {
                "network": {
                    **_network_config(net.dns),
                    "upstream_ca_file": str(tmp / "upstream-ca.pem"),
                }
            }
            (tmp / "net.json").write_text(json.dumps(config))
            try:
                with (
                    _server(data_dir, tmp / "server.log", tmp / "net.json") as (url, key, _),
                    _env(url, key),
                ):
                    rows += _measure(tracker, net.ca_pem, args.runs)
                    print(table(rows), file=sys.stderr)
            except Exception as exc:
                rows.append(Row.failed("secret injection", "corral", "base", f"{exc}"))
            finally:
                tracker.kill_all()
                asyncio.run(ContainerRuntime(data_dir, agent_binary_path()).purge())
                asyncio.run(purge_network(ServerConfig.model_validate(config).network))
                remove_tree(data_dir)
    publish(
        "secrets",
        "secret injection in the egress proxy",
        "python -m bench.bench_secrets",
        rows,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
