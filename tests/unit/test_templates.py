"""The template registry is read-only, rejects unknown names, and builds atomically and once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from corral.errors import NotFoundError, RuntimeFailure
from corral.templates import TEMPLATES, TemplateDef, build, build_in_data_dir, is_built, registry
from corral.templates.__main__ import main as cli_main
from corral.templates.debian import host_mirror_lines
from corral.templates.minimal import _is_static_elf, find_static_busybox

Builder = Callable[[Path, Callable[[str], None] | None], None]


def _use_builder(monkeypatch: pytest.MonkeyPatch, name: str, builder: Builder) -> None:
    builders = dict(registry._BUILDERS)
    builders[name] = builder
    monkeypatch.setattr(registry, "_BUILDERS", MappingProxyType(builders))


def _partial_then_fail(dest: Path, on_output: Callable[[str], None] | None) -> None:
    (dest / "etc").mkdir(parents=True)
    (dest / "etc" / "half-written").write_text("x")
    raise RuntimeFailure("builder broke halfway")


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_registry_lists_minimal_and_base() -> None:
    assert {"minimal", "base"} <= set(TEMPLATES)
    assert TEMPLATES["base"] == TemplateDef("base", TEMPLATES["base"].description)
    assert all(t.description for t in TEMPLATES.values())


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        TEMPLATES["evil"] = TemplateDef("evil", "x")  # type: ignore[index]


def test_unknown_template_raises_not_found_and_creates_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "rootfs"
    with pytest.raises(NotFoundError, match="unknown template 'nope'"):
        build("nope", dest)
    with pytest.raises(NotFoundError):
        build_in_data_dir("nope", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_is_built_only_for_non_empty_directories(tmp_path: Path) -> None:
    assert not is_built(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert not is_built(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    assert not is_built(tmp_path / "file")


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_builder(monkeypatch, "minimal", _partial_then_fail)
    dest = tmp_path / "rootfs"
    with pytest.raises(RuntimeFailure, match="halfway"):
        build("minimal", dest)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_rebuild_keeps_the_old_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "rootfs"
    build("minimal", dest)
    before = sorted(p.name for p in dest.iterdir())
    _use_builder(monkeypatch, "minimal", _partial_then_fail)
    with pytest.raises(RuntimeFailure):
        build("minimal", dest, force=True)
    assert sorted(p.name for p in dest.iterdir()) == before
    assert _siblings(dest) == ["rootfs"]


def test_built_template_is_reused_and_force_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = registry._BUILDERS["minimal"]

    def counting(dest: Path, on_output: Callable[[str], None] | None) -> None:
        calls.append(dest)
        real(dest, on_output)

    _use_builder(monkeypatch, "minimal", counting)
    dest = tmp_path / "rootfs"
    build("minimal", dest)
    build("minimal", dest)
    assert len(calls) == 1
    build("minimal", dest, force=True)
    assert len(calls) == 2
    assert is_built(dest)
    assert _siblings(dest) == ["rootfs"]


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    entered = threading.Event()
    release = threading.Event()
    real = registry._BUILDERS["minimal"]

    def slow(dest: Path, on_output: Callable[[str], None] | None) -> None:
        nonlocal calls
        calls += 1
        entered.set()
        release.wait(10)
        real(dest, on_output)

    _use_builder(monkeypatch, "minimal", slow)
    dest = tmp_path / "rootfs"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            build("minimal", dest)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    assert entered.wait(10)
    release.set()
    for t in threads:
        t.join(20)
    assert errors == []
    assert calls == 1
    assert is_built(dest)


def test_meta_json_written_once_per_build(tmp_path: Path) -> None:
    info = build_in_data_dir("minimal", tmp_path)
    assert info.built and info.size_bytes and info.built_at
    meta = tmp_path / "templates" / "minimal" / "meta.json"
    first = meta.read_text()
    again = build_in_data_dir("minimal", tmp_path)
    assert meta.read_text() == first
    assert again == info
    meta.unlink()  # a template whose meta.json went missing gets it back without a rebuild
    assert build_in_data_dir("minimal", tmp_path).built_at == info.built_at


def test_host_mirror_lines_follow_the_hosts_debian_entries(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb [signed-by=/k.gpg] http://mirror.example/debian bullseye main contrib\n"
        "deb-src http://mirror.example/debian bullseye main\n"
        "deb http://security.example/debian-security bullseye-security main\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n"
    )
    (d / "vendor.list").write_text("deb https://vendor.example/apt cloud-sdk-bookworm main\n")
    (d / "node.sources").write_text(
        "Types: deb\nURIs: https://node.example/\nSuites: nodistro\nComponents: main\n"
    )
    (d / "old.list.disabled").write_text("deb http://disabled.example/debian bookworm main\n")

    assert host_mirror_lines("bookworm", tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://security.example/debian-security bookworm-security main",
        "deb http://mirror.example/debian bookworm-updates main",
    ]


def test_host_mirror_lines_empty_without_sources(tmp_path: Path) -> None:
    assert host_mirror_lines("bookworm", tmp_path) == []


def test_static_busybox_is_recognised() -> None:
    busybox = find_static_busybox()
    assert _is_static_elf(busybox)
    assert not _is_static_elf(Path("/bin/ls"))  # dynamically linked on Debian


def test_cli_rejects_unknown_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "nope", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["build", "minimal", "-q", "--data-dir", str(tmp_path)]) == 0
    assert "template minimal: built" in capsys.readouterr().out
    assert cli_main(["build", "minimal", "--data-dir", str(tmp_path)]) == 0
    assert "already built" in capsys.readouterr().out
    assert cli_main(["list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "minimal" in out and "base" in out and "not built" in out


def test_leftovers_of_a_killed_build_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".rootfs.build-dead0001"
    (stale / "etc").mkdir(parents=True)
    (tmp_path / ".rootfs.old-dead0002").mkdir()
    build("minimal", tmp_path / "rootfs")
    assert _siblings(tmp_path / "rootfs") == ["rootfs"]
