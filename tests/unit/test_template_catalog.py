"""The template catalogue and layer store: references, versions, tags, tenant ownership,
deletion that spares pinned versions, collection of unused layers, and content digests that
ignore mtimes but see everything a sandbox can observe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from corral.templates.catalog import Catalog, LayerRef, Settings, parse_ref
from corral.templates.layers import LayerStore, tree_digest

A = LayerRef("sha256:" + "a" * 64, 10)
B = LayerRef("sha256:" + "b" * 64, 20)
C = LayerRef("sha256:" + "c" * 64, 30)


def add(cat: Catalog, name: str, *layers: LayerRef, owner: str = "t1", **kw: object) -> int:
    v = cat.add_version(
        name,
        owner,
        source="dockerfile",
        layers=layers,
        settings=Settings(env={"N": str(len(layers))}),
        built_at="2026-12-06T00:00:00Z",
        **kw,  # type: ignore[arg-type]
    )
    return v.version


def test_references_parse_and_bad_ones_are_refused() -> None:
    assert parse_ref("web") == ("web", None, None)
    assert parse_ref("web:prod") == ("web", "prod", None)
    assert parse_ref("web@3") == ("web", None, 3)
    for bad in ("Web", "web@x", "web@", "web:", "-web", "a" * 64, "we b", "web:Prod"):
        with pytest.raises(InvalidRequestError):
            parse_ref(bad)


def test_versions_and_tags(tmp_path: Path) -> None:
    cat = Catalog(tmp_path, reserved={"base"})
    assert add(cat, "web", A) == 1
    assert add(cat, "web", A, B, tags=["v2"]) == 2
    assert cat.resolve("web").version == 2 and cat.resolve("web:v2").version == 2
    assert cat.resolve("web@1").layers == (A,)
    assert cat.resolve("web").tags == ("latest", "v2")
    cat.set_tag("web", "stable", 1, tenant="t1")
    assert cat.resolve("web:stable").version == 1
    cat.remove_tag("web", "stable", tenant="t1")
    with pytest.raises(NotFoundError):
        cat.resolve("web:stable")
    # An identical rebuild is the same version; only its tags move.
    assert add(cat, "web", A, B, tags=["again"]) == 2
    assert [v.version for v in cat.versions("web")] == [1, 2]
    # A fresh catalogue reads back what the files hold.
    again = Catalog(tmp_path)
    assert again.resolve("web:again").version == 2
    assert again.resolve("web").settings == Settings(env={"N": "2"})


def test_names_belong_to_a_tenant_and_built_ins_are_reserved(tmp_path: Path) -> None:
    cat = Catalog(tmp_path, reserved={"base"})
    add(cat, "web", A)
    with pytest.raises(PermissionDeniedError):
        add(cat, "web", B, owner="t2")
    with pytest.raises(NotFoundError):
        cat.resolve("web", tenant="t2")
    assert cat.latest(tenant="t2") == []
    assert [v.name for v in cat.latest(tenant="t1")] == ["web"]
    assert cat.resolve("web", tenant=None).version == 1  # the server itself sees all
    with pytest.raises(InvalidRequestError):
        add(cat, "base", A)


def test_deleted_versions_stay_resolvable_while_pinned_then_are_collected(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    add(cat, "web", A, B)
    add(cat, "web", A, C)
    cat.delete("web@1", tenant="t1")
    with pytest.raises(NotFoundError):
        cat.resolve("web@1", pinned_ok=False)
    assert cat.resolve("web@1").layers == (A, B)  # what a live sandbox holds
    assert [v.version for v in cat.versions("web")] == [2]
    assert cat.collect(in_use={"web@1"}) == {A.digest, B.digest, C.digest}
    assert cat.collect(in_use=set()) == {A.digest, C.digest}
    with pytest.raises(NotFoundError):
        cat.resolve("web@1")
    cat.delete("web", tenant="t1")
    assert cat.latest() == [] and cat.collect(in_use=set()) == set()
    assert not (tmp_path / "web").exists()


def test_latest_falls_back_to_the_newest_left(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    add(cat, "web", A)
    add(cat, "web", B)
    cat.delete("web@2", tenant="t1")
    assert cat.resolve("web").version == 1


def _tree(root: Path, mtime: float) -> None:
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("hello")
    os.symlink("d/f", root / "link")
    for p in (root / "d" / "f", root / "d", root):
        os.utime(p, (mtime, mtime), follow_symlinks=False)


def test_tree_digest_ignores_mtimes_and_sees_contents_modes_and_owners(tmp_path: Path) -> None:
    _tree(tmp_path / "one", 1000)
    _tree(tmp_path / "two", 2000)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")
    (tmp_path / "two" / "d" / "f").write_text("hellO")
    assert tree_digest(tmp_path / "one") != tree_digest(tmp_path / "two")
    _tree(tmp_path / "three", 1000)
    os.chmod(tmp_path / "three" / "d" / "f", 0o600)
    assert tree_digest(tmp_path / "one") != tree_digest(tmp_path / "three")
    if os.geteuid() == 0:
        _tree(tmp_path / "four", 1000)
        os.chown(tmp_path / "four" / "d" / "f", 1000, 1000)
        assert tree_digest(tmp_path / "one") != tree_digest(tmp_path / "four")


def test_layer_store_commits_once_and_collects_what_nothing_keeps(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "layers")
    first = store.staging()
    _tree(first, 1000)
    digest, size = store.commit(first)
    assert store.has(digest) and size > 0 and not first.exists()
    second = store.staging()
    _tree(second, 3000)
    assert store.commit(second)[0] == digest  # the same content: one layer
    other = store.staging()
    (other / "x").write_text("x")
    other_digest, _ = store.commit(other)
    leftover = store.staging()
    store.sweep()
    assert not leftover.exists()
    removed, freed = store.collect(keep={digest})
    assert removed == 1 and freed > 0 and store.digests() == {digest}
    with pytest.raises(InvalidRequestError):
        store.path("sha256:../../etc")
    assert not store.has(other_digest)
