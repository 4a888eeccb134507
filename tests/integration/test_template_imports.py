"""OCI imports through the HTTP API against a real registry on loopback (Debian's
docker-registry with token auth) and from tarballs: an imported image's layers (whiteouts and
opaque dirs included), env, working dir, start command and ready check reach its sandboxes;
re-imports fetch nothing stored; registry and tarball failures are clear errors before
anything is stored, and tenants cannot point the server at private addresses."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.registry_harness import (
    Image,
    Registry,
    build_image,
    docker_save_members,
    layer_tar,
    registry_skip_reason,
)
from tests.integration.server_harness import RunningServer, exec_stdout

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

USER, PASSWORD = "puller", "s3cret"


@pytest.fixture
def api(template_api: httpx.Client) -> httpx.Client:
    why = registry_skip_reason()
    if why:
        pytest.skip(why)
    return template_api


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    if registry_skip_reason():
        pytest.skip(registry_skip_reason() or "")
    with Registry(tmp_path, auth=(USER, PASSWORD)) as r:
        yield r


def rootfs_layer(server: RunningServer) -> bytes:
    """The minimal template's root filesystem as a layer tar (numeric owners)."""
    root = (server.data_dir / "templates").resolve() / "minimal" / "rootfs"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()


def app_image(server: RunningServer, compression: str = "gzip") -> Image:
    top = layer_tar(
        {
            "srv/": None,
            "srv/app/": None,
            "srv/app/hello.txt": "hello from an image\n",
            "bin/.wh.vi": b"",  # a whiteout: the base's /bin/vi is gone
            "etc/.wh..wh..opq": b"",  # an opaque dir: only what this layer has in /etc
            "etc/motd": "image motd\n",
            "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
            "etc/group": "root:x:0:\n",
        }
    )
    config = {
        "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "APP=imported"],
        "WorkingDir": "/srv/app",
        "Cmd": ["sh", "-c", "echo up > /tmp/up; exec sleep 100000"],
        "Healthcheck": {"Test": ["CMD-SHELL", "test -f /tmp/up"]},
    }
    return build_image([rootfs_layer(server), top], compression, config=config)


def stream(c: httpx.Client, url: str, **kw: Any) -> tuple[int, list[dict[str, Any]]]:
    with c.stream("POST", url, **kw) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        return 200, [json.loads(line) for line in r.iter_lines() if line]


def import_image(c: httpx.Client, name: str, ref: str, **body: Any) -> tuple[int, list[Any]]:
    return stream(
        c, f"/v1/templates/{name}/imports", json={"image": ref, **body}, params={"tag": "v1"}
    )


def test_an_image_from_a_registry_becomes_a_template(
    api: httpx.Client, server: RunningServer, registry: Registry
) -> None:
    image = app_image(server, "zstd")
    registry.push("team/app", "1", image)
    ref = f"{registry.host}/team/app:1"
    status, events = import_image(api, "imported", ref, username=USER, password=PASSWORD)
    assert status == 200, events
    assert events[-1]["type"] == "done", events[-1]
    assert any(e["type"] == "progress" for e in events)
    t = events[-1]["template"]
    assert (t["source"], t["image"], t["version"]) == ("image", ref, 1)
    assert [layer["digest"] for layer in t["layers"]] == list(image.diff_ids)
    assert t["env"] == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APP": "imported"}
    assert t["workdir"] == "/srv/app" and t["ready_cmd"] == ["/bin/sh", "-c", "test -f /tmp/up"]

    sid = api.post("/v1/sandboxes", json={"template": "imported:v1"}).json()["id"]
    assert exec_stdout(api, sid, "pwd; cat hello.txt; echo $APP; cat /tmp/up") == (
        "/srv/app\nhello from an image\nimported\nup\n"
    )
    # Whiteout and opaque dir apply: /bin/vi is gone, /etc holds only the image's files.
    assert exec_stdout(api, sid, "test ! -e /bin/vi && echo gone") == "gone\n"
    etc = set(exec_stdout(api, sid, "ls /etc").split())
    assert {"motd", "passwd", "group"} <= etc and "shadow" not in etc

    # Again: every layer is stored, so only the manifest and config are fetched.
    before = len(registry.blob_requests())
    status, events = import_image(api, "imported", ref, username=USER, password=PASSWORD)
    assert events[-1]["type"] == "done" and events[-1]["template"]["version"] == 1
    fetched = registry.blob_requests()[before:]
    assert all(image.config.digest in path for path in fetched), fetched


def test_a_manifest_list_gives_its_amd64_image(
    api: httpx.Client, server: RunningServer, registry: Registry
) -> None:
    amd64 = build_image([layer_tar({"arch": "amd64\n"})], "gzip")
    arm64 = build_image([layer_tar({"arch": "arm64\n"})], "gzip", platform="linux/arm64")
    registry.push_index("team/multi", "1", [arm64, amd64])
    status, events = import_image(
        api, "multi", f"{registry.host}/team/multi:1", username=USER, password=PASSWORD
    )
    assert status == 200 and events[-1]["type"] == "done", events
    assert [x["digest"] for x in events[-1]["template"]["layers"]] == list(amd64.diff_ids)


def test_registry_failures_are_clear_errors_and_store_nothing(
    api: httpx.Client, server: RunningServer, registry: Registry
) -> None:
    arm = build_image([layer_tar({"a": "b"})], "gzip", platform="linux/arm64")
    registry.push_index("team/armonly", "1", [arm])
    registry.push("team/app", "1", build_image([layer_tar({"a": "b"})]))
    host = registry.host
    cases = [
        (f"{host}/team/app:1", {"username": USER, "password": "wrong"}, 403, "refused"),
        (f"{host}/team/app:nope", {"username": USER, "password": PASSWORD}, 404, "not found"),
        (f"{host}/team/armonly:1", {"username": USER, "password": PASSWORD}, 400, "linux/arm64"),
        ("127.0.0.1:1/team/app:1", {}, 502, "unreachable"),
        ("UPPER/Case:bad tag", {}, 400, ""),
    ]
    for ref, creds, status, words in cases:
        got, events = import_image(api, "failing", ref, **creds)
        assert got == status, (ref, events)
        assert words in events[0]["error"]["message"], events
    assert api.get("/v1/templates/failing").status_code == 404
    assert not list((server.data_dir / "layers").glob(".new-*"))


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_docker_save_tarball_becomes_a_template(api: httpx.Client, server: RunningServer) -> None:
    image = app_image(server, "none")
    status, events = stream(
        api,
        "/v1/templates/saved/imports",
        content=_tarball(docker_save_members(image)),
        headers={"content-type": "application/x-tar"},
    )
    assert status == 200 and events[-1]["type"] == "done", events
    assert events[-1]["template"]["source"] == "archive"
    sid = api.post("/v1/sandboxes", json={"template": "saved"}).json()["id"]
    assert exec_stdout(api, sid, "cat /srv/app/hello.txt") == "hello from an image\n"


@pytest.mark.parametrize("evil", ["../escape.json", "/abs/manifest.json"])
def test_tarballs_with_escaping_member_names_are_refused(api: httpx.Client, evil: str) -> None:
    members = {"manifest.json": b"[]", evil: b"{}"}
    status, events = stream(
        api,
        "/v1/templates/evil/imports",
        content=_tarball(members),
        headers={"content-type": "application/x-tar"},
    )
    assert status == 400, events
    assert api.get("/v1/templates/evil").status_code == 404


def test_a_layer_that_writes_through_a_symlink_stores_nothing(
    api: httpx.Client, server: RunningServer, tmp_path: Path
) -> None:
    target = tmp_path / "outside"
    target.mkdir()
    evil = layer_tar({"link": f"->{target}", "link/owned": "pwned\n"})
    image = build_image([evil], "none")
    status, events = stream(
        api,
        "/v1/templates/evil/imports",
        content=_tarball(docker_save_members(image)),
        headers={"content-type": "application/x-tar"},
    )
    message = events[-1]["message"] if status == 200 else events[0]["error"]["message"]
    assert "link" in message, events
    assert list(target.iterdir()) == []
    assert api.get("/v1/templates/evil").status_code == 404
    assert not list((server.data_dir / "layers").glob(".new-*"))


def test_a_tenant_cannot_point_the_server_at_a_private_address(
    api: httpx.Client, server: RunningServer, registry: Registry
) -> None:
    name = f"imp{time.time_ns()}"
    assert api.post("/v1/tenants", json={"name": name}).status_code == 201
    key = api.post(f"/v1/tenants/{name}/keys", json={"name": "k"}).json()["key"]
    with server.client(key) as other:
        for ref in (f"{registry.host}/team/app:1", "127.0.0.1:7700/x:1", "169.254.169.254/x:1"):
            status, events = import_image(other, "mine", ref)
            assert status == 403, (ref, events)
            assert "non-public address" in events[0]["error"]["message"]


def test_a_dockerfile_can_start_from_a_registry_image(
    api: httpx.Client, server: RunningServer, tmp_path: Path
) -> None:
    """FROM an image that is no template pulls it, as Docker's FROM does (layers stored once,
    its ENV and WORKDIR apply); COPY --from an image too."""
    with Registry(tmp_path) as open_registry:
        open_registry.push("team/base", "1", app_image(server))
        ref = f"{open_registry.host}/team/base:1"
        dockerfile = (
            f'FROM {ref}\nRUN echo "$APP in $(pwd)" > /from-image\n'
            f"COPY --from={ref} /srv/app/hello.txt /copied.txt\n"
        )
        status, events = stream(
            api,
            "/v1/templates/fromimage/builds",
            content=_tarball({"Dockerfile": dockerfile.encode()}),
            headers={"content-type": "application/x-tar"},
        )
        assert status == 200 and events[-1]["type"] == "done", events[-1]
        assert any(e["type"] == "progress" for e in events)
        t = events[-1]["template"]
        assert t["env"]["APP"] == "imported" and t["workdir"] == "/srv/app"
        sid = api.post("/v1/sandboxes", json={"template": "fromimage"}).json()["id"]
        out = exec_stdout(api, sid, "cat /from-image /copied.txt")
        assert out == "imported in /srv/app\nhello from an image\n"
        bad = stream(
            api,
            "/v1/templates/fromimage/builds",
            content=_tarball({"Dockerfile": f"FROM {open_registry.host}/team/none:1\n".encode()}),
            headers={"content-type": "application/x-tar"},
        )
        assert bad[0] == 404 and "no corral template" in bad[1][0]["error"]["message"]
