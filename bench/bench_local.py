"""Local mode against Anthropic's sandbox-runtime (``srt``): start-up cost and the same probes.

- start-up: ``/bin/true`` bare, under ``corral run``, and under ``srt`` (both with one allowed
  domain, so both start their network side; and corral without any);
- file work: 2000 files created, then 2000 opened for reading, by a shell loop: bare, under
  ``corral run`` (every create goes through the guard, corral/local/guard.py), under
  ``corral run --verbose`` (every open does: the read audit) and under ``srt``;
- probes: the escapes and leaks of the threat model that apply to a process sandbox, run under
  both tools in the same temporary project and HOME, each printed as blocked or not.

Both run as root with ``HOME`` a temporary directory (under /var/tmp) (corral with ``--as-root``), so they see the
same files. srt is installed from npm into ``bench/.peers/srt`` (``--srt-dir``); it needs
bubblewrap, socat and ripgrep (apt). Network probes reach only a listener this script opens on the
host's loopback. Usage: ``python -m bench.bench_local [--runs 30]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import Row, publish, table

__all__ = ["main"]

_SRT_VERSION = "0.0.83"
_ROOT = Path(__file__).resolve().parents[1]

# (name, shell command run in the project's sub/ directory); blocked = non-zero exit.
_PROBES: tuple[tuple[str, str], ...] = (
    ("append to ~/.bashrc from a project subdirectory", 'echo x >> "$HOME/.bashrc"'),
    ("write the project's .git/hooks/pre-commit", "echo x > ../.git/hooks/pre-commit"),
    ("write an existing sub/.claude/settings.json", "echo x > .claude/settings.json"),
    (
        "create a new sub/.vscode/settings.json",
        "mkdir -p .vscode && echo x > .vscode/settings.json",
    ),
    ("create a new CLAUDE.md in the project", "echo x > ../CLAUDE.md"),
    (
        "create a new .mcp.json through a symlink",
        "ln -s ../.mcp.json m && echo x > m",
    ),
    ("read ~/.ssh/id_rsa through a symlink planted in the project", "cat ../key-link"),
    ("read ~/.aws/credentials", 'cat "$HOME/.aws/credentials"'),
    ("connect to a host loopback listener ignoring proxy variables", "python3 {probe}/tcp.py"),
    ("connect to a host unix socket in $HOME", "python3 {probe}/unix.py"),
    ("create a user namespace (unshare -U)", "unshare -U true"),
    ("io_uring_setup", "python3 {probe}/uring.py"),
    ("AF_ALG socket", "python3 -c 'import socket; socket.socket(38, 5)'"),
    ("ptrace-attach to the parent shell", "python3 {probe}/ptrace.py"),
)

_TCP = """import os, socket
s = socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=3)
s.close()
"""
_UNIX = """import os, socket
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.join(os.environ["HOME"], "agent.sock"))
"""
_URING = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)
sys.exit(0 if fd >= 0 else 1)
"""
_PTRACE = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PTRACE_SEIZE: attaches without stopping the shell (ATTACH would leave it stopped).
sys.exit(0 if libc.ptrace(0x4206, os.getppid(), 0, 0) == 0 else 1)
"""


@contextlib.contextmanager
def _world(tmp: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A HOME with secrets and rc files, a project with a git dir and agent files, a loopback
    listener and a unix socket; yields (project/sub, home, env)."""
    home, project = tmp / "home", tmp / "project"
    for d in (
        home / ".ssh",
        home / ".aws",
        project / ".git" / "hooks",
        project / "sub" / ".claude",
    ):
        d.mkdir(parents=True)
    (home / ".bashrc").write_text("# rc\n")
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key=x\n")
    (project / "sub" / ".claude" / "settings.json").write_text("{}\n")
    (project / "key-link").symlink_to(home / ".ssh" / "id_rsa")
    probe = tmp / "probe"
    probe.mkdir()
    for name, text in (("tcp", _TCP), ("unix", _UNIX), ("uring", _URING), ("ptrace", _PTRACE)):
        (probe / f"{name}.py").write_text(text)
    listener = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(home / "agent.sock"))
    unix.listen()
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                listener.accept()[0].close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "HOME": str(home),
        "PROBE_PORT": str(listener.getsockname()[1]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        yield project / "sub", home, env
    finally:
        stop.set()
        thread.join()
        listener.close()
        unix.close()


def _corral(extra: Sequence[str], cmd: str) -> list[str]:
    corral = str(Path(sys.executable).parent / "corral")
    return [corral, "run", "--as-root", *extra, "--", "sh", "-c", cmd]


def _srt(srt: Path, settings: Path, cmd: str) -> list[str]:
    return [str(srt), "-s", str(settings), "-c", cmd]


def _install_srt(where: Path) -> Path:
    binary = where / "node_modules" / ".bin" / "srt"
    if not binary.exists():
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
             f"@anthropic-ai/sandbox-runtime@{_SRT_VERSION}"],
            cwd=where, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    missing = [t for t in ("bwrap", "socat", "rg") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"srt needs {', '.join(missing)} (apt: bubblewrap socat ripgrep)")
    return binary


def _startup(argv: Sequence[str], cwd: Path, env: dict[str, str], runs: int) -> list[float]:
    ms: list[float] = []
    for i in range(runs + 3):
        t = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[:3]}… exited {done.returncode}: {done.stderr[-300:]!r}")
        if i >= 3:  # the first runs warm the page cache
            ms.append((time.perf_counter() - t) * 1000)
    return ms


# A shell loop (dash: `: > f` is a builtin, so the figure is opens, not process start-ups).
_N_FILES = 2000
_CREATE = (
    f"rm -rf w && mkdir w && i=0 && while [ $i -lt {_N_FILES} ]; do : > w/f$i; i=$((i+1)); done"
)
_READ = f"i=0; while [ $i -lt {_N_FILES} ]; do : < w/f$i; i=$((i+1)); done"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_local")
    p.add_argument("--runs", type=int, default=30, help="start-ups per figure")
    p.add_argument("--srt-dir", default=str(_ROOT / "bench" / ".peers" / "srt"))
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    srt: Path | None = None
    try:
        srt = _install_srt(Path(args.srt_dir))
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        rows.append(Row.failed("start-up of /bin/true", "srt", "-", str(exc)))
    # Not under /tmp: corral gives the sandbox a fresh /tmp, which would hide the project.
    with tempfile.TemporaryDirectory(prefix="corral-bench-local-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        with _world(tmp) as (sub, home, env):
            env["PYTHONPATH"] = str(_ROOT)
            settings = tmp / "srt-settings.json"
            settings.write_text(
                json.dumps(
                    {
                        "network": {"allowedDomains": ["example.com"], "deniedDomains": []},
                        "filesystem": {
                            "denyRead": ["~/.ssh", "~/.aws"],
                            "allowWrite": [str(sub.parent)],
                            "denyWrite": [],
                        },
                    }
                )
            )
            metric = "start-up of /bin/true"
            bare = _startup(["/bin/true"], sub, env, args.runs)
            rows.append(Row.latency(metric, "bare", "-", bare, "baseline"))
            probe_dir = tmp / "probe"
            for label, extra in (
                ("corral run (no network)", []),
                ("corral run --allow-domain example.com", ["--allow-domain", "example.com"]),
            ):
                try:
                    ms = _startup(_corral(extra, "/bin/true"), sub, env, args.runs)
                    rows.append(Row.latency(metric, label, "-", ms, ""))
                except RuntimeError as exc:
                    rows.append(Row.failed(metric, label, "-", str(exc)))
            if srt is not None:
                try:
                    ms = _startup(_srt(srt, settings, "/bin/true"), sub, env, args.runs)
                    rows.append(
                        Row.latency(
                            metric, f"srt {_SRT_VERSION} (allowedDomains example.com)", "-", ms, ""
                        )
                    )
                except RuntimeError as exc:
                    rows.append(Row.failed(metric, "srt", "-", str(exc)))
            for metric, cmd in (
                (f"create {_N_FILES} files (shell loop)", _CREATE),
                (f"open {_N_FILES} files for reading (shell loop)", _READ),
            ):
                subprocess.run(["sh", "-c", _CREATE], cwd=sub, check=True)
                tools: list[tuple[str, list[str]]] = [
                    ("bare", ["sh", "-c", cmd]),
                    ("corral run", _corral([], cmd)),
                    ("corral run --verbose (read audit)", _corral(["--verbose"], cmd)),
                ]
                if srt is not None:
                    tools.append((f"srt {_SRT_VERSION}", _srt(srt, settings, cmd)))
                for label, argv_ in tools:
                    try:
                        ms = _startup(argv_, sub, env, max(3, args.runs // 6))
                        rows.append(Row.latency(metric, label, "-", ms, "whole command"))
                    except RuntimeError as exc:
                        rows.append(Row.failed(metric, label, "-", str(exc)))
            shutil.rmtree(sub / "w", ignore_errors=True)
            print(table(rows), file=sys.stderr)
            for name, cmd in _PROBES:
                results = []
                for tool in ("bare", "corral", "srt"):
                    if tool == "srt" and srt is None:
                        results.append("-")
                        continue
                    shell = cmd.format(probe=probe_dir)
                    if tool == "bare":  # the control: unsandboxed, every probe must succeed
                        argv_ = ["sh", "-c", shell]
                    elif tool == "corral":
                        argv_ = _corral(["--allow-domain", "example.com"], shell)
                    else:
                        argv_ = _srt(srt, settings, shell)  # type: ignore[arg-type]
                    run_env = {**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                    done = subprocess.run(
                        argv_, cwd=sub, env=run_env, capture_output=True, timeout=60, input=b""
                    )
                    results.append("blocked" if done.returncode != 0 else "NOT blocked")
                    _restore(home, sub)
                if results[0] != "NOT blocked":
                    rows.append(
                        Row.failed(f"probe: {name}", "bare", "-", "the probe fails unsandboxed")
                    )
                    continue
                rows.append(
                    Row(
                        f"probe: {name}",
                        "corral run / srt",
                        "-",
                        f"{results[1]} / {results[2]}",
                        "1",
                        "unsandboxed: not blocked (control)",
                    )
                )
    print(table(rows), file=sys.stderr)
    publish(
        "local",
        "local mode (corral run) vs Anthropic sandbox-runtime",
        "python -m bench.bench_local",
        rows,
        write=not args.no_write,
    )
    return 0


def _restore(home: Path, sub: Path) -> None:
    """Undo what a probe that was not blocked changed, so the next tool meets the same files."""
    (home / ".bashrc").write_text("# rc\n")
    (sub / ".claude" / "settings.json").write_text("{}\n")
    hook = sub.parent / ".git" / "hooks" / "pre-commit"
    hook.unlink(missing_ok=True)
    (sub / "m").unlink(missing_ok=True)
    (sub.parent / ".mcp.json").unlink(missing_ok=True)
    (sub.parent / "CLAUDE.md").unlink(missing_ok=True)
    shutil.rmtree(sub / ".vscode", ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
