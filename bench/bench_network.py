"""What sandbox networking costs: proxied connection latency, proxy throughput, setup in create.

Builds a fake internet (a network namespace of its own with TEST-NET hosts, as the tests do),
starts two ``corral server``s on temporary data dirs — one with networking, one without — and
measures:

- added latency per proxied connection: connect + HTTP request + response, from inside a
  sandbox through the egress proxy, against the same from the host straight to the fake host
  (the veth hop is part of the difference);
- throughput of a 1 GiB download through the proxy (splice) against the host's direct download
  of the same bytes from the same sendfile source;
- create → first exec p50 with and without networking (the cost of the netns, veth, nft rules).

Usage: ``python -m bench.bench_network [--templates-from /var/lib/corral] [--runs 200]``.
Everything it creates is removed at the end (sandboxes, servers, namespaces, nft tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import Row, percentile, publish, table
from bench.bench_sandbox import _prepare_data_dir, _server, _Tracker
from corral.agent.build import agent_binary_path
from corral.config import ServerConfig
from corral.core.network import purge_network
from corral.runtime.container import ContainerRuntime
from corral.templates.fs import remove_tree

__all__ = ["main"]

_FAKE_HOST = "198.51.100.10"  # allowed.test in the fake internet
_GIB = 1 << 30

# Runs inside the sandbox (and, for the baseline, on the host): one HTTP/1.1 request per fresh
# connection, timed from connect() to the end of the response.
_LATENCY_CLIENT = r"""
import socket, sys, time
host, port, name, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
req = f"GET /lat HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
out = []
for i in range(runs + 10):
    t = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(req)
    while s.recv(65536):
        pass
    s.close()
    if i >= 10:
        out.append((time.perf_counter() - t) * 1000)
print(" ".join(f"{x:.4f}" for x in out))
"""

_DOWNLOAD_CLIENT = r"""
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
buf = bytearray(1 << 20)
t = time.perf_counter()
s.sendall(b"%d\n" % size)
n = 0
while k := s.recv_into(buf):
    n += k
print(n, time.perf_counter() - t)
"""


def _network_config(dns: str) -> dict[str, Any]:
    tag = os.urandom(2).hex()[:3]
    return {
        "subnet": "10.251.0.0/24",
        "prefix": f"b{tag}",
        "nft_table": f"corral_b{tag}",
        "dns_upstreams": [dns],
        "default_egress_mbit": 0,
    }


@contextlib.contextmanager
def _fake_internet(tmp: Path) -> Iterator[Any]:
    # The fake internet lives with the tests; the benchmark runs from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.integration.fake_internet import fake_internet

    with fake_internet(tmp / "fake-internet") as net:
        yield net


def _run_here(script: str, *args: str) -> str:
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
    ).stdout


def _run_in(sbx: Any, script: str, *args: str, timeout: float = 300) -> str:
    sbx.files.write("/tmp/bench.py", script)
    result = sbx.exec(["python3", "/tmp/bench.py", *args], timeout=timeout)
    if result.exit_code != 0:
        raise RuntimeError(f"in-sandbox client failed: {result.stderr[-500:]}")
    return str(result.stdout)


def _latency(tracker: _Tracker, runs: int) -> list[Row]:
    metric = "proxied connection (connect + HTTP request)"
    try:
        direct = [
            float(x)
            for x in _run_here(_LATENCY_CLIENT, _FAKE_HOST, "80", "allowed.test", str(runs)).split()
        ]
        sbx = tracker.create(
            "base",
            network={
                "allow": [{"domain": "allowed.test"}, {"cidr": f"{_FAKE_HOST}/32", "ports": [80]}]
            },
            timeout=600,
        )
        # By name (Host header checked, name resolved by the proxy) and by CIDR rule (no sniff).
        by_name = [
            float(x)
            for x in _run_in(
                sbx, _LATENCY_CLIENT, "allowed.test", "80", "allowed.test", str(runs)
            ).split()
        ]
        other = tracker.create(
            "base", network={"allow": [{"cidr": f"{_FAKE_HOST}/32", "ports": [80]}]}, timeout=600
        )
        by_cidr = [
            float(x)
            for x in _run_in(
                other, _LATENCY_CLIENT, _FAKE_HOST, "80", "x.invalid", str(runs)
            ).split()
        ]
    except Exception as exc:
        return [Row.failed(metric, "corral", "base", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    base = percentile(direct, 50)
    rows = [Row.latency(metric, "host → fake host, direct", "-", direct, "baseline")]
    for label, samples in (("domain rule (Host sniffed)", by_name), ("CIDR rule", by_cidr)):
        added = percentile(samples, 50) - base
        rows.append(
            Row.latency(
                metric,
                f"sandbox → proxy → fake host, {label}",
                "base",
                samples,
                f"added p50 {added:.2f} ms; target ≤ 2 ms",
            )
        )
    return rows


def _throughput(tracker: _Tracker) -> list[Row]:
    metric = "1 GiB download"
    try:
        n, secs = _run_here(_DOWNLOAD_CLIENT, _FAKE_HOST, "9001", str(_GIB)).split()
        direct = int(n) / float(secs) / 1e6
        sbx = tracker.create(
            "base",
            network={"allow": [{"cidr": f"{_FAKE_HOST}/32", "ports": [9001]}]},
            timeout=600,
        )
        n2, secs2 = _run_in(sbx, _DOWNLOAD_CLIENT, _FAKE_HOST, "9001", str(_GIB)).split()
        if int(n2) != _GIB:
            raise RuntimeError(f"received {n2} bytes instead of {_GIB}")
        proxied = int(n2) / float(secs2) / 1e6
    except Exception as exc:
        return [Row.failed(metric, "corral", "base", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    return [
        Row(metric, "host → fake host, direct", "-", f"{direct:.0f} MB/s", "1", "baseline"),
        Row(
            metric,
            "sandbox → proxy → fake host",
            "base",
            f"{proxied:.0f} MB/s",
            "1",
            f"{proxied / direct * 100:.0f} % of direct; target ≥ 50 %",
        ),
    ]


def _create_cost(tracker: _Tracker, runs: int, settle: float) -> list[float]:
    """create → first exec, each after the previous sandbox was killed ``settle`` s before.

    The kernel frees a network namespace asynchronously after its last user is gone (RCU
    grace periods, a workqueue); a create right behind a kill shares the CPU with that work.
    """
    ms: list[float] = []
    for _ in range(runs):
        time.sleep(settle)
        t = time.perf_counter()
        sbx = tracker.create("minimal", timeout=60)
        sbx.exec(["/bin/true"])
        ms.append((time.perf_counter() - t) * 1000)
        tracker.kill_all()
    return ms


@contextlib.contextmanager
def _env(url: str, key: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in ("CORRAL_URL", "CORRAL_API_KEY")}
    os.environ["CORRAL_URL"], os.environ["CORRAL_API_KEY"] = url, key
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_network")
    p.add_argument("--templates-from", default="/var/lib/corral", help="data dir with templates")
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=200, help="connections per latency figure")
    p.add_argument("--creates", type=int, default=40, help="creates per create-cost figure")
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-net-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = _prepare_data_dir(args, tmp, ["minimal", "base"])
        plain_dir = tmp / "plain"
        (plain_dir / "templates").mkdir(parents=True)
        for t in ("minimal", "base"):
            os.symlink((data_dir / "templates" / t).resolve(), plain_dir / "templates" / t)
        tracker = _Tracker()
        with _fake_internet(tmp) as net:
            config = {"network": _network_config(net.dns)}
            (tmp / "net.json").write_text(json.dumps(config))
            (tmp / "plain.json").write_text(json.dumps({"network": {"enabled": False}}))
            try:
                with (
                    _server(data_dir, tmp / "server.log", tmp / "net.json") as (url, key, _),
                    _env(url, key),
                ):
                    rows += _latency(tracker, args.runs)
                    print(table(rows), file=sys.stderr)
                    rows += _throughput(tracker)
                    print(table(rows), file=sys.stderr)
                    with_net = {p: _create_cost(tracker, args.creates, p) for p in (0.0, 1.0)}
                with (
                    _server(plain_dir, tmp / "plain.log", tmp / "plain.json") as (url, key, _),
                    _env(url, key),
                ):
                    without = {p: _create_cost(tracker, args.creates, p) for p in (0.0, 1.0)}
                for pause, label in ((0.0, "right after a kill"), (1.0, "1 s after a kill")):
                    delta = percentile(with_net[pause], 50) - percentile(without[pause], 50)
                    metric = f"create → first exec, {label}"
                    rows.append(
                        Row.latency(metric, "corral, no network", "minimal", without[pause])
                    )
                    rows.append(
                        Row.latency(
                            metric,
                            "corral, deny-all network",
                            "minimal",
                            with_net[pause],
                            f"network adds p50 {delta:.1f} ms",
                        )
                    )
            except RuntimeError as exc:
                rows.append(Row.failed("server start", "corral", "-", str(exc)))
            finally:
                tracker.kill_all()
                for d in (data_dir, plain_dir):
                    asyncio.run(ContainerRuntime(d, agent_binary_path()).purge())
                asyncio.run(purge_network(ServerConfig.model_validate(config).network))
                remove_tree(data_dir)
                remove_tree(plain_dir)
    publish(
        "network",
        "corral networking",
        "python -m bench.bench_network",
        rows,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
