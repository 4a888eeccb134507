"""Templates: how long builds and imports take.

- the built-in ``base`` from scratch (mmdebstrap of Debian 12 + packages, into a fresh dir);
- a Dockerfile build FROM base (venv, a COPY of an app, compileall), cold, fully cached, and
  after one source file changed;
- an import of a ~100 MB image from a registry on loopback (Debian's docker-registry), cold
  and again with every layer already stored;
- side by side, the same Dockerfile with ``docker build`` (classic builder, a private dockerd;
  from ``bench/setup-peers.sh``), cold and cached.

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``).

Usage: ``python -m bench.bench_templates [--templates-from /var/lib/corral] [--runs 3]
[--skip-base] [--only-peer]``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import Row, publish
from bench.bench_sandbox import served, served_parser

__all__ = ["main"]

DOCKERFILE = """\
FROM base
ENV VENV=/opt/venv PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv $VENV && $VENV/bin/python -c 'import sys; print(sys.version)'
WORKDIR /app
COPY app/ ./
RUN python3 -m compileall -q /app && du -sh /app
USER user
CMD ["python3", "-m", "http.server", "8000"]
HEALTHCHECK CMD python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8000")'
"""


def _app_files(version: int) -> dict[str, bytes]:
    """A small Python app: ~300 modules, ~5 MB."""
    files = {"Dockerfile": DOCKERFILE.encode()}
    for i in range(300):
        body = f"# module {i}\n" + "".join(
            f"def f{j}(x):\n    return x + {j}\n" for j in range(400)
        )
        files[f"app/pkg/mod{i}.py"] = body.encode()
    files["app/main.py"] = f"VERSION = {version}\n".encode()
    return files


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _api() -> httpx.Client:
    return httpx.Client(
        base_url=os.environ["CORRAL_URL"],
        headers={"Authorization": f"Bearer {os.environ['CORRAL_API_KEY']}"},
        timeout=1800,
    )


def _stream(c: httpx.Client, url: str, **kw: Any) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    with c.stream("POST", url, **kw) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
        events = [json.loads(line) for line in r.iter_lines() if line]
    took = time.perf_counter() - t0
    if events[-1]["type"] != "done":
        raise RuntimeError(f"{url}: {events[-1]}")
    return took, events


def _build(c: httpx.Client, files: dict[str, bytes], **params: Any) -> tuple[float, int]:
    took, events = _stream(
        c,
        "/v1/templates/bench-app/builds",
        content=_tar(files),
        params=params,
        headers={"content-type": "application/x-tar"},
    )
    cached = sum(1 for e in events if e["type"] == "step" and e.get("cached"))
    return took, cached


def _base_from_scratch() -> Row:
    from corral.templates import build_in_data_dir

    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-base-"))
    try:
        t0 = time.perf_counter()
        info = build_in_data_dir("base", scratch)
        took = time.perf_counter() - t0
        size = (info.size_bytes or 0) / 2**20
        return Row(
            "build `base` from scratch",
            "corral (mmdebstrap)",
            "base",
            f"{took:.1f} s",
            "1",
            f"{size:.0f} MiB; packages from deb.debian.org",
        )
    except Exception as exc:
        return Row.failed("build `base` from scratch", "corral", "base", str(exc)[:200])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _dockerfile_rows(c: httpx.Client, runs: int) -> list[Row]:
    rows: list[Row] = []
    cold: list[float] = []
    for _ in range(runs):
        took, _ = _build(c, _app_files(1), no_cache="true")
        cold.append(took)
    warm: list[float] = []
    changed: list[float] = []
    for i in range(runs):
        took, cached = _build(c, _app_files(1))
        warm.append(took)
        assert cached == 3, f"expected every file step cached, {cached} were"
        took, _ = _build(c, _app_files(100 + i))
        changed.append(took)
    note = "FROM base; venv, COPY 5 MB app, compileall"
    rows.append(Row.seconds("Dockerfile build, no cache", "corral", "base", cold, note))
    rows.append(Row.seconds("Dockerfile build, all cached", "corral", "base", warm, note))
    rows.append(
        Row.seconds(
            "Dockerfile build, one source file changed",
            "corral",
            "base",
            changed,
            "COPY on rebuilt",
        )
    )
    return rows


def _import_rows(c: httpx.Client, runs: int) -> list[Row]:
    try:
        from tests.integration.registry_harness import Registry, random_image
    except ImportError as exc:
        return [Row.failed("import a 100 MB image", "corral", "-", f"no registry harness: {exc}")]
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="corral-bench-registry-") as tmp,
        Registry(Path(tmp)) as registry,
    ):
        ref = random_image(registry, "bench/big", "1", total_mb=100)
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(runs):
            c.delete("/v1/templates/bench-big")
            c.post("/v1/templates/gc")
            body = {"image": ref}
            cold.append(_stream(c, "/v1/templates/bench-big/imports", json=body)[0])
            warm.append(_stream(c, "/v1/templates/bench-big/imports", json=body)[0])
        note = "gzip layers from docker-registry on loopback"
        rows.append(Row.seconds("import a 100 MB image", "corral", "-", cold, note))
        rows.append(
            Row.seconds("import it again (layers stored)", "corral", "-", warm, "manifest only")
        )
    return rows


def _docker_rows(templates_from: Path, runs: int) -> list[Row]:
    """The same Dockerfile with ``docker build`` on a private dockerd, FROM an
    image imported from corral's own base rootfs, so both build on the same files."""
    from bench.peers import _private_dockerd

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-docker-") as tmp:
        work = Path(tmp)
        with _private_dockerd(work) as (cli, error):
            if cli is None:
                return [Row.failed("Dockerfile build", "docker", "base", error)]
            docker: list[str] = cli
            # Debian ships no buildx plugin, which the CLI needs for BuildKit: the classic
            # builder it is (one container per step, layer cache by instruction).
            env = {**os.environ, "DOCKER_BUILDKIT": "0"}

            def run(*argv: str, stdin: Any = None) -> str:
                out = subprocess.run(
                    [*docker, *argv], capture_output=True, text=True, env=env, stdin=stdin,
                    check=False,
                )  # fmt: skip
                if out.returncode != 0:
                    raise RuntimeError(f"docker {argv[0]}: {out.stderr.strip()[-300:]}")
                return out.stdout.strip()

            try:
                version = run("version", "--format", "{{.Server.Version}}")
                rootfs = templates_from / "templates" / "base" / "rootfs"
                tar = subprocess.Popen(
                    ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."],
                    stdout=subprocess.PIPE,
                )
                run("import", "-", "corral-base:latest", stdin=tar.stdout)
                tar.wait()
                ctx = work / "ctx"
                for name, data in _app_files(1).items():
                    (ctx / name).parent.mkdir(parents=True, exist_ok=True)
                    (ctx / name).write_bytes(data)
                (ctx / "Dockerfile").write_text(
                    DOCKERFILE.replace("FROM base", "FROM corral-base:latest")
                )
                cold: list[float] = []
                warm: list[float] = []
                for i in range(runs):
                    t0 = time.perf_counter()
                    run("build", "-q", "--network", "none", "--no-cache", "-t", f"app{i}", str(ctx))
                    cold.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    run("build", "-q", "--network", "none", "-t", f"app{i}", str(ctx))
                    warm.append(time.perf_counter() - t0)
                label = f"docker {version} (classic builder)"
                note = "private dockerd, overlay2; the base imported from corral's base rootfs"
                rows.append(Row.seconds("Dockerfile build, no cache", label, "base", cold, note))
                rows.append(Row.seconds("Dockerfile build, all cached", label, "base", warm, note))
            except (RuntimeError, OSError) as exc:
                rows.append(Row.failed("Dockerfile build", "docker", "base", str(exc)[:200]))
    return rows


class _SkipCorral(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    p = served_parser("bench_templates", 3, "builds and imports per case")
    p.add_argument("--skip-base", action="store_true", help="do not rebuild base from scratch")
    p.add_argument("--only-peer", action="store_true", help="only the docker build rows")
    args = p.parse_args(argv)
    rows: list[Row] = []
    if not args.skip_base and not args.only_peer:
        rows.append(_base_from_scratch())
    try:
        if args.only_peer:
            raise _SkipCorral
        with served(args, ["base"], "tpl", 12) as _, _api() as c:
            rows += _dockerfile_rows(c, args.runs)
            rows += _import_rows(c, args.runs)
            c.delete("/v1/templates/bench-app")
            c.delete("/v1/templates/bench-big")
    except _SkipCorral:
        pass
    except RuntimeError as exc:
        rows.append(Row.failed("server", "corral", "-", str(exc)[:300]))
    rows += _docker_rows(Path(args.templates_from), args.runs)
    publish(
        "templates",
        "corral templates: builds and imports",
        "python -m bench.bench_templates",
        rows,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
