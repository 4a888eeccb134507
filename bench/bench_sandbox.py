"""corral measured through its own SDK, the way an agent uses it.

Starts ``corral server`` on a free loopback port with its own data dir (a temporary one whose
templates link to ``--templates-from``, or ``--data-dir``), then measures:

- create -> first exec latency (``Sandbox.create`` + ``exec(["/bin/true"])``), per template
- exec round trip on a running sandbox
- N concurrent creates
- host memory per idle sandbox beyond its own processes

Every sandbox it creates is killed, then the server is stopped and a temporary data dir removed.
Usage: ``python -m bench.bench_sandbox [--templates-from /var/lib/corral] [--runs 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import (
    RESULTS,
    Row,
    host_kernel_bytes,
    host_used_bytes,
    percentile,
    publish,
    table,
)
from corral.agent.build import agent_binary_path
from corral.config import NetworkConfig
from corral.core.network import purge_network
from corral.runtime.container import ContainerRuntime
from corral.templates import build_in_data_dir, is_built, rootfs_path
from corral.templates.fs import remove_tree

__all__ = ["main"]

_TRUE = ["/bin/true"]
_SLEEP_FOREVER = ["/bin/sleep", "3600"]
# Small enough that 100 of them fit on the benchmark host without a capacity refusal.
_SMALL = {"memory_mb": 64, "cpu": 0.1, "disk_mb": 64}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _corral_cmd() -> list[str]:
    beside = Path(sys.executable).parent / "corral"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("corral")
    return [found] if found else [sys.executable, "-m", "corral.cli.main"]


@contextlib.contextmanager
def _server(
    data_dir: Path, log: Path, config: Path | None = None
) -> Iterator[tuple[str, str, int]]:
    """``corral server`` on a free port: (url, admin key, server pid)."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [*_corral_cmd(), "server", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    if config is not None:
        argv += ["--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"corral server exited ({proc.returncode}): {_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"corral server did not answer /healthz: {_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        key = (data_dir / "admin.key").read_text(encoding="utf-8").strip()
        yield url, key, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Tracker:
    """Remembers every sandbox created so that all are killed whatever happens."""

    def __init__(self) -> None:
        self.live: dict[str, Any] = {}

    def create(self, template: str, **kw: Any) -> Any:
        from corral import Sandbox

        sbx = Sandbox.create(template=template, **kw)
        self.live[sbx.id] = sbx
        return sbx

    def from_snapshot(self, snapshot: Any) -> Any:
        from corral import Sandbox

        sbx = Sandbox.create(snapshot=snapshot)
        self.live[sbx.id] = sbx
        return sbx

    def fork(self, snapshot: Any, count: int) -> list[Any]:
        from corral import Sandbox

        forks = Sandbox.fork(snapshot, count=count)
        self.live.update((f.id, f) for f in forks)
        return forks

    def kill(self, sbx: Any) -> None:
        try:
            sbx.kill()
        finally:
            sbx.close()
            self.live.pop(sbx.id, None)

    def kill_all(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda s: _quietly(self.kill, s), list(self.live.values())))


def _quietly(fn: Callable[[Any], None], arg: Any) -> None:
    with contextlib.suppress(Exception):
        fn(arg)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _create_then_exec(tracker: _Tracker, template: str, runs: int) -> list[Row]:
    metric = "create → first exec"
    system = "corral (SDK)"
    total: list[float] = []
    create: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            sbx = tracker.create(template)
            t1 = time.perf_counter()
            result = sbx.exec(_TRUE)
            t2 = time.perf_counter()
        except Exception as exc:
            return [Row.failed(metric, system, template, _error(exc))]
        finally:
            tracker.kill_all()
        if result.exit_code != 0:
            return [Row.failed(metric, system, template, f"/bin/true exited {result.exit_code}")]
        total.append((t2 - t0) * 1000)
        create.append((t1 - t0) * 1000)
    note = f"create alone: p50 {percentile(create, 50):.1f} ms, p95 {percentile(create, 95):.1f} ms"
    return [Row.latency(metric, system, template, total, note)]


def _exec_round_trip(tracker: _Tracker, template: str, runs: int) -> list[Row]:
    metric = "exec round trip"
    system = "corral (SDK)"
    try:
        sbx = tracker.create(template)
        try:
            sbx.exec(_TRUE)  # the first exec may warm caches; measure steady state
            samples: list[float] = []
            for _ in range(runs):
                t0 = time.perf_counter()
                result = sbx.exec(_TRUE)
                samples.append((time.perf_counter() - t0) * 1000)
                if result.exit_code != 0:
                    raise RuntimeError(f"/bin/true exited {result.exit_code}")
        finally:
            tracker.kill(sbx)
    except Exception as exc:
        return [Row.failed(metric, system, template, _error(exc))]
    return [Row.latency(metric, system, template, samples, 'exec(["/bin/true"]), sequential')]


def _concurrent_creates(tracker: _Tracker, template: str, n: int) -> list[Row]:
    metric = f"{n} concurrent creates"
    system = "corral (SDK)"
    errors: list[str] = []
    each: list[float] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        try:
            tracker.create(template, **_SMALL)
            each.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:
            errors.append(_error(exc))

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - began
    finally:
        tracker.kill_all()
    if errors:
        return [Row.failed(metric, system, template, f"{len(errors)}/{n} failed: {errors[0]}")]
    note = f"each: p50 {percentile(each, 50):.0f} ms, max {max(each):.0f} ms; memory_mb=64"
    return [Row(metric, system, template, f"all running after {wall:.2f} s", str(n), note)]


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (pid namespace, parent pid) for every process we can see."""
    found: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{entry}/ns/pid")
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = (ns, ppid)
    return found


def _tree_pss(root: int, procs: dict[int, tuple[str, int]], host_ns: str) -> int:
    """PSS of ``root`` and its descendants that run in the host's pid namespace."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if procs.get(pid, ("", 0))[0] == host_ns:
            total += _pss(pid)
            todo += children.get(pid, [])
    return total


def _settled(read: Callable[[], int]) -> int:
    samples = []
    for _ in range(5):
        samples.append(read())
        time.sleep(0.2)
    return sorted(samples)[len(samples) // 2]


def _idle_memory(tracker: _Tracker, template: str, n: int, server_pid: int) -> list[Row]:
    metric = "host memory per idle sandbox"
    system = "corral (SDK)"
    host_ns = os.readlink("/proc/self/ns/pid")
    before_procs = _processes()
    server_before = _tree_pss(server_pid, before_procs, host_ns)
    used_before = _settled(host_used_bytes)
    kernel_before = _settled(host_kernel_bytes)
    try:
        sandboxes = [tracker.create(template, **_SMALL) for _ in range(n)]
        for sbx in sandboxes:
            sbx.exec(_SLEEP_FOREVER, background=True)
        time.sleep(1)
        used_after = _settled(host_used_bytes)
        kernel_after = _settled(host_kernel_bytes)
        procs = _processes()
        new = {p: v for p, v in procs.items() if p not in before_procs}
        own = sum(_pss(p) for p, (ns, _) in new.items() if ns != host_ns)
        # Host-side helpers: new host-namespace processes that are not the server's children
        # (those are counted with the server) nor ours; identified by the sandbox ids they carry.
        ids = [s.id.encode() for s in sandboxes]
        helpers = 0
        for pid, (ns, _) in new.items():
            if ns != host_ns:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if any(i in cmdline for i in ids):
                helpers += _pss(pid)
        server_growth = _tree_pss(server_pid, procs, host_ns) - server_before
    except Exception as exc:
        return [Row.failed(metric, system, template, _error(exc))]
    finally:
        tracker.kill_all()
    # Measured again once they are gone: the mean of before and after cancels the host's drift.
    time.sleep(1)
    used_before = (used_before + _settled(host_used_bytes)) // 2
    kernel_before = (kernel_before + _settled(host_kernel_bytes)) // 2
    mib = 2**20
    kernel = (kernel_after - kernel_before) / n / mib
    beyond = (helpers + max(server_growth, 0)) / n / mib + kernel
    note = (
        f"helper processes {helpers / n / mib:.2f} MiB PSS + server growth"
        f" {server_growth / n / mib:.2f} MiB + kernel {kernel:.2f} MiB each;"
        f" host used (MemTotal-MemAvailable, noisy) {(used_after - used_before) / n / mib:+.2f} MiB each;"
        f" the sandbox's own processes {own / n / mib:.2f} MiB PSS"
    )
    return [
        Row(metric, system, template, f"{beyond:.2f} MiB beyond its own processes", str(n), note)
    ]


def _crun_floor_ms(template: str) -> float | None:
    """p50 of raw ``crun run`` for ``template`` from the peers section of the results, if any."""
    try:
        text = RESULTS.read_text(encoding="utf-8")
    except OSError:
        return None
    pattern = re.compile(
        r"^\| run /bin/true \| crun[^|]*, userns \| "
        + re.escape(template)
        + r" \| p50 ([\d.]+) ms",
        re.M,
    )
    m = pattern.search(text)
    return float(m[1]) if m else None


def _with_targets(rows: list[Row]) -> list[Row]:
    out = []
    for r in rows:
        target = ""
        p50 = re.match(r"p50 ([\d.]+) ms", r.value)
        if r.metric.startswith("create") and p50:
            target = "target p50 ≤ 40 ms"
            crun = _crun_floor_ms(r.template)
            if crun:
                target += f" and ≤ 8x raw crun ({float(p50[1]) / crun:.1f}x of {crun:.1f} ms)"
        elif r.metric == "exec round trip" and p50:
            target = "target p50 ≤ 10 ms"
        elif r.metric.startswith("100 concurrent") and r.value != "**fails**":
            target = "target ≤ 5 s"
        elif r.metric.startswith("host memory") and r.value != "**fails**":
            target = "target ≤ 3 MiB"
        note = "; ".join(x for x in (target, r.note) if x)
        out.append(Row(r.metric, r.system, r.template, r.value, r.n, note))
    return out


def served_parser(prog: str, runs: int, runs_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark run through ``served`` takes."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{prog}")
    p.add_argument("--templates-from", default="/var/lib/corral", help="data dir with templates")
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=runs, help=runs_help)
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


@contextlib.contextmanager
def served(
    args: argparse.Namespace, templates: Sequence[str], tag: str, subnet: int
) -> Iterator[tuple[_Tracker, Path, Path]]:
    """A ``corral server`` on a temporary data dir of its own, with a network of its own
    (``10.252.<subnet>.0/24``, host objects named after ``tag``) so that benchmarks never meet
    each other or a test server, the SDK pointed at it: (tracker of what is created, data dir,
    scratch dir). Whatever happens, every sandbox is killed and every tier's host state and the
    network are removed at the end."""
    from corral.runtime.microvm import MicroVMRuntime

    network = NetworkConfig(
        subnet=f"10.252.{subnet}.0/24",
        prefix=f"b{tag[:3]}",  # interface names: prefix + 10 hex digits, 15 at most
        nft_table=f"corral_b{tag}",
        dns_upstreams=["127.0.0.1:9"],
    )
    with tempfile.TemporaryDirectory(prefix=f"corral-bench-{tag}-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = _prepare_data_dir(args, tmp, templates)
        (tmp / "server.json").write_text(json.dumps({"network": network.model_dump(mode="json")}))
        tracker = _Tracker()
        try:
            with _server(data_dir, tmp / "server.log", tmp / "server.json") as (url, key, _):
                os.environ["CORRAL_URL"], os.environ["CORRAL_API_KEY"] = url, key
                yield tracker, data_dir, tmp
        finally:
            tracker.kill_all()
            agent = agent_binary_path()
            asyncio.run(MicroVMRuntime(data_dir, agent).purge())
            asyncio.run(ContainerRuntime(data_dir, agent).purge())
            asyncio.run(purge_network(network))
            remove_tree(data_dir)


def _prepare_data_dir(args: argparse.Namespace, tmp: Path, templates: Sequence[str]) -> Path:
    if args.data_dir:
        data_dir = Path(args.data_dir)
        for t in templates:
            build_in_data_dir(t, data_dir)
        return data_dir
    source = Path(args.templates_from)
    data_dir = tmp / "data"
    (data_dir / "templates").mkdir(parents=True)
    for t in templates:
        build_in_data_dir(t, source)
        # Reuse the built template read-only instead of building it again.
        os.symlink(rootfs_path(source, t).parent, data_dir / "templates" / t)
        if not is_built(rootfs_path(data_dir, t)):
            raise RuntimeError(f"template {t} is not visible through {data_dir}")
    os.chmod(data_dir, 0o700)
    return data_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sandbox")
    p.add_argument("--templates-from", default="/var/lib/corral", help="data dir with templates")
    p.add_argument("--data-dir", default=None, help="run the server on this data dir instead")
    p.add_argument("--templates", default="minimal,base")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--idle", type=int, default=50, help="idle sandboxes for the memory figure")
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    templates = [t for t in args.templates.split(",") if t]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-sdk-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = _prepare_data_dir(args, tmp, templates)
        tracker = _Tracker()
        # Its own subnet, host interface names and nft table: never those of a real server
        # on this host. DNS goes nowhere (these sandboxes are deny-all).
        network = NetworkConfig(
            subnet="10.252.0.0/22",
            prefix="bsdk",
            nft_table="corral_bench",
            dns_upstreams=["127.0.0.1:9"],
        )
        (tmp / "server.json").write_text(json.dumps({"network": network.model_dump(mode="json")}))
        try:
            with _server(data_dir, tmp / "server.log", tmp / "server.json") as (
                url,
                key,
                server_pid,
            ):
                os.environ["CORRAL_URL"] = url
                os.environ["CORRAL_API_KEY"] = key
                try:
                    for t in templates:
                        rows += _create_then_exec(tracker, t, args.runs)
                        print(table(rows), file=sys.stderr)
                    for t in templates:
                        rows += _exec_round_trip(tracker, t, args.runs)
                    rows += _concurrent_creates(tracker, templates[0], args.concurrency)
                    rows += _idle_memory(tracker, templates[0], args.idle, server_pid)
                finally:
                    tracker.kill_all()
        except RuntimeError as exc:
            rows.append(Row.failed("server start", "corral", "-", str(exc)))
        finally:
            if not args.data_dir:
                # The runtime's host state (loop disks, its mount dir under /run/corral) goes too.
                asyncio.run(ContainerRuntime(tmp / "data", agent_binary_path()).purge())
                remove_tree(tmp / "data")
            asyncio.run(purge_network(network))
    rows = _with_targets(rows)
    publish("corral", "corral", "python -m bench.bench_sandbox", rows, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
