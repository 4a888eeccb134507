"""Templates through the SDK (sync and async) and the CLI against a real server: build from a
directory with .dockerignore and from Dockerfile text, progress events, a sandbox of the
result, versions, tags, delete; a failing build raises the typed error / exits 1 with the
step's output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from corral import AsyncTemplate, Sandbox, Template, errors
from corral.sdk import BuildEvent
from tests.conftest import Conn
from tests.integration.cli_harness import corral_text

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text(
        "FROM minimal\nWORKDIR /srv\nCOPY . .\nRUN ls -a /srv > /listing\n"
        'ENV MODE=sdk\nCMD ["sleep", "100000"]\n'
    )
    (tmp_path / "app.txt").write_text("app\n")
    (tmp_path / "secret.env").write_text("TOKEN=1\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "big.js").write_text("x")
    (tmp_path / ".dockerignore").write_text("*.env\nnode_modules\n")
    return tmp_path


def test_sdk_build_from_a_directory_then_a_sandbox_of_it(conn: Conn, project: Path) -> None:
    events: list[BuildEvent] = []
    try:
        t = Template.build("sdk-app", project, tag="v1", on_event=events.append, **conn)
        assert (t.name, t.version, t.source) == ("sdk-app", 1, "dockerfile")
        assert set(t.tags) == {"latest", "v1"} and t.workdir == "/srv" and t.env == {"MODE": "sdk"}
        assert t.start_cmd == ("sleep", "100000") or list(t.start_cmd or ()) == ["sleep", "100000"]
        assert [e.type for e in events][-1] == "done"
        assert any(e.type == "step" and e.instruction == "COPY . ." for e in events)
        with Sandbox.create("sdk-app:v1", timeout=60, **conn) as sbx:
            listing = sbx.exec("cat /listing").stdout.split()
            assert "app.txt" in listing and "Dockerfile" in listing
            assert "secret.env" not in listing and "node_modules" not in listing
            assert sbx.exec("pwd; echo $MODE").stdout == "/srv\nsdk\n"
        again = Template.build("sdk-app", project, **conn)
        assert again.version == 1  # all cached: the same version
        assert [v.version for v in Template.versions("sdk-app", **conn)] == [1]
        assert Template.get("sdk-app@1", **conn).ref == "sdk-app@1"
        assert any(x.name == "sdk-app" for x in Template.list(**conn))
    finally:
        Template.delete("sdk-app", **conn)
        Template.gc(**conn)
    with pytest.raises(errors.NotFoundError):
        Template.get("sdk-app", **conn)


def test_async_build_from_text_and_a_failing_build(conn: Conn) -> None:
    async def main() -> None:
        seen: list[str] = []

        async def on_event(e: BuildEvent) -> None:
            seen.append(e.type)

        t = await AsyncTemplate.build(
            "sdk-text", dockerfile_text="FROM minimal\nRUN echo hi\n", on_event=on_event, **conn
        )
        assert t.version == 1 and "output" in seen
        with pytest.raises(errors.InvalidRequestError) as caught:
            await AsyncTemplate.build(
                "sdk-text", dockerfile_text="FROM minimal\nRUN echo nope; exit 4\n", **conn
            )
        assert "exit code 4" in str(caught.value) and "nope" in str(caught.value)
        assert [v.version for v in await AsyncTemplate.versions("sdk-text", **conn)] == [1]
        await AsyncTemplate.delete("sdk-text", **conn)
        await AsyncTemplate.gc(**conn)

    asyncio.run(main())


def test_cli_build_inspect_tag_and_remove(env: dict[str, str], project: Path) -> None:
    built = corral_text(env, "template", "build", "--json", "cli-app", str(project))
    info: dict[str, Any] = json.loads(built.stdout)
    assert info["name"] == "cli-app" and info["version"] == 1
    shown = corral_text(env, "template", "inspect", "cli-app")
    assert "sleep" in shown.stdout and "/srv" in shown.stdout
    corral_text(env, "template", "tag", "cli-app@1", "stable")
    assert "stable" in corral_text(env, "template", "versions", "cli-app").stdout
    assert "cli-app" in corral_text(env, "template", "list").stdout
    bad = project / "Broken"
    bad.write_text("FROM minimal\nRUN echo failing-step >&2; exit 5\n")
    failed = corral_text(
        env, "template", "build", "-f", str(bad), "cli-app", str(project), check=False
    )
    assert (
        failed.returncode == 1
        and "exit code 5" in failed.stderr
        and "failing-step" in failed.stderr
    )
    unsupported = project / "Unsupported"
    unsupported.write_text("FROM minimal\nONBUILD RUN true\n")
    failed = corral_text(
        env, "template", "build", "-f", str(unsupported), "cli-app", str(project), check=False
    )
    assert failed.returncode == 1 and "line 2" in failed.stderr
    corral_text(env, "template", "rm", "cli-app")
    corral_text(env, "template", "gc")
    gone = corral_text(env, "template", "inspect", "cli-app", check=False)
    assert gone.returncode != 0
