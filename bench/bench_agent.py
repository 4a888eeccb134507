"""Exec round trip through the in-sandbox agent, without a container around it.

Starts the real agent binary as pid 1 of a private pid namespace (``unshare --pid --fork``)
listening on a unix socket in a temporary directory, then measures over ``--runs`` runs:

- ``exec_stream(["/bin/true"])`` through ``AgentClient`` (spawn + attach + exit event on one
  connection): the number the HTTP exec path builds on
- ``spawn`` + ``wait`` (two connections)
- ``ping`` (one connection, no process): the floor of any operation
- the same exec over a plain blocking socket (no asyncio): the agent's own share

Everything it starts is killed and the temporary directory removed.
Usage: ``python -m bench.bench_agent [--runs 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from corral.agent import AgentClient, ExecRequest, agent_binary_path
from corral.agent.protocol import Field, FrameType, encode_fields, encode_frame

__all__ = ["main"]

_TRUE = ["/bin/true"]


def _pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    out.append(int(entry))
    return out


@contextlib.contextmanager
def _agent() -> Iterator[Path]:
    binary = agent_binary_path()
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-agent-"))
    sock = tmp / "agent.sock"
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child=SIGKILL",
        str(binary),
        "--listen",
        str(sock),
    ]
    # unshare complains on stderr when its child is SIGKILLed at the end; nothing else to see.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the agent did not start")
            time.sleep(0.005)
        yield sock
    finally:
        for pid in _children(proc.pid) or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def _timed(runs: int, op: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(min(10, runs)):  # warm up: page cache, allocator, binaries
        await op()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        await op()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def _client_runs(sock: Path, runs: int) -> dict[str, list[float]]:
    client = AgentClient(lambda: asyncio.open_unix_connection(str(sock)))

    async def exec_stream() -> None:
        _, events = await client.exec_stream(ExecRequest(_TRUE))
        async for ev in events:
            if ev.kind == "exit" and ev.exit_code != 0:
                raise SystemExit(f"/bin/true exited {ev.exit_code}")

    async def spawn_wait() -> None:
        await client.wait(await client.spawn(ExecRequest(_TRUE)))

    async def ping() -> None:
        await client.ping()

    return {
        "exec_stream(/bin/true) via AgentClient": await _timed(runs, exec_stream),
        "spawn + wait via AgentClient": await _timed(runs, spawn_wait),
        "ping via AgentClient": await _timed(runs, ping),
    }


def _raw_runs(sock: Path, runs: int) -> list[float]:
    fields = [(Field.ARG, a) for a in _TRUE] + [(Field.ATTACH, True)]
    request = encode_frame(FrameType.SPAWN, encode_fields(fields))
    out = []
    for i in range(runs + 10):
        t = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            s.sendall(request)
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        if i >= 10:
            out.append((time.perf_counter() - t) * 1000)
        # OK(pid) then EXIT: the agent closes after the exit frame.
        if len(buf) < 10 or buf[4] != FrameType.OK or struct.unpack(">I", buf[:4])[0] > 100:
            raise SystemExit("unexpected reply from the agent")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("needs root and unshare (util-linux)", file=sys.stderr)
        return 2
    with _agent() as sock:
        results = asyncio.run(_client_runs(sock, args.runs))
        results["exec /bin/true over a blocking socket"] = _raw_runs(sock, args.runs)
    print(f"agent exec round trips, {args.runs} runs each (ms)")
    print(f"{'operation':<44} {'p50':>7} {'p95':>7} {'max':>7}")
    for name, samples in results.items():
        print(f"{name:<44} {_pct(samples, 50):7.2f} {_pct(samples, 95):7.2f} {max(samples):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
