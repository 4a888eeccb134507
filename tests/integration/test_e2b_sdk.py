"""The official ``e2b`` Python SDK (sync), unchanged, against a real corral server: lifecycle, commands, PTY, files, pause, snapshots, network."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import (  # noqa: E402
    CommandExitException,
    FileType,
    NotFoundException,
    Sandbox,
    SandboxQuery,
    TimeoutException,
)
from e2b.exceptions import (  # noqa: E402
    AuthenticationException,
    InvalidArgumentException,
    SandboxException,
    SandboxNotRunningException,
)
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

from tests.integration.conftest import point_e2b_at  # noqa: E402
from tests.integration.server_harness import (  # noqa: E402
    RunningServer,
    network_config_for_tests,
    running_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

E2B_VERSION = "2.63.0"  # the release this compatibility is tested against (pyproject pins it)


@pytest.fixture
def sbx(e2b_env: str) -> Iterator[Sandbox]:
    s = Sandbox.create(timeout=600)
    try:
        yield s
    finally:
        s.kill()


def test_create_with_metadata_and_envs_then_info_list_and_kill(e2b_env: str) -> None:
    tag = f"t{time.monotonic_ns()}"
    s = Sandbox.create(metadata={"task": tag, "team": "a"}, envs={"GREETING": "hi"}, timeout=120)
    try:
        assert s.commands.run("echo $GREETING").stdout == "hi\n"
        info = s.get_info()
        assert info.sandbox_id == s.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"task": tag, "team": "a"}
        assert info.state.value == "running"
        assert 110 <= (info.end_at - info.started_at).total_seconds() <= 130
        assert s.is_running()

        listed = Sandbox.list(query=SandboxQuery(metadata={"task": tag})).next_items()
        assert [i.sandbox_id for i in listed] == [s.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"task": "nope"})).next_items() == []
    finally:
        s.kill()
    assert not s.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(s.sandbox_id)
    assert Sandbox.list(query=SandboxQuery(metadata={"task": tag})).next_items() == []
    assert Sandbox.kill(s.sandbox_id) is False  # already gone


def test_list_pages_with_the_next_token(e2b_env: str) -> None:
    tag = f"p{time.monotonic_ns()}"
    made = [Sandbox.create(metadata={"page": tag}, timeout=120) for _ in range(3)]
    try:
        pager = Sandbox.list(query=SandboxQuery(metadata={"page": tag}), limit=2)
        first = pager.next_items()
        assert len(first) == 2 and pager.has_next
        second = pager.next_items()
        assert len(second) == 1 and not pager.has_next
        seen = {i.sandbox_id for i in first + second}
        assert seen == {s.sandbox_id for s in made}
    finally:
        for s in made:
            s.kill()


def test_commands_stream_fail_and_run_as_user_or_root(sbx: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sbx.commands.run(
        "echo one; echo two >&2; echo three",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert r.exit_code == 0 and r.stdout == "one\nthree\n" and r.stderr == "two\n"
    assert "".join(out) == "one\nthree\n" and "".join(err) == "two\n"

    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo oops >&2; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stderr == "oops\n"

    # E2B's defaults: the `user` account in its home; root and any cwd on request.
    assert sbx.commands.run("whoami; pwd").stdout == "user\n/home/user\n"
    assert sbx.commands.run("whoami; pwd", user="root", cwd="/tmp").stdout == "root\n/tmp\n"
    assert sbx.commands.run("echo $X$Y", envs={"X": "a", "Y": "b"}).stdout == "ab\n"
    # A login shell, as E2B runs commands: the profile's PATH is there.
    assert "/usr/bin" in sbx.commands.run("echo $PATH").stdout


def test_background_command_connect_list_and_kill(sbx: Sandbox) -> None:
    h = sbx.commands.run("for i in $(seq 1 300); do echo tick $i; sleep 0.1; done", background=True)
    listed = {p.pid: p for p in sbx.commands.list()}
    assert h.pid in listed
    assert listed[h.pid].cmd == "/bin/bash"
    assert listed[h.pid].args[:2] == ["-l", "-c"]

    again = sbx.commands.connect(h.pid)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    for stdout, _stderr, _pty in again:
        if stdout:
            seen.append(stdout)
        if "tick" in "".join(seen) or time.monotonic() > deadline:
            break
    assert "tick" in "".join(seen)
    again.disconnect()

    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert h.pid not in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(h.pid) is False  # nothing left to kill


def test_stdin_send_and_close(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    h.send_stdin("hello ")
    sbx.commands.send_stdin(h.pid, b"world\n")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hello world\ndone\n"
    # Without stdin=True the command reads end-of-file at once.
    assert sbx.commands.run("cat; echo eof").stdout == "eof\n"


def test_command_timeout_kills_the_command(sbx: Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; echo late > /tmp/late", timeout=1)
    assert time.monotonic() - start < 15
    time.sleep(0.5)
    assert not any("sleep 30" in " ".join(p.args) for p in sbx.commands.list())
    assert not sbx.files.exists("/tmp/late")


def test_pty_create_input_resize_and_kill(sbx: Sandbox) -> None:
    got = bytearray()
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(term.pid, b"stty size; echo marker-$((6*7))\n")
    resized = False
    for _out, _err, pty in term:
        got += pty or b""
        if not resized and b"marker-42" in got:
            sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
            sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
            resized = True
    text = got.decode(errors="replace")
    assert "24 80" in text and "30 100" in text, text
    assert term.wait().exit_code == 0

    other = sbx.pty.create(PtySize(rows=10, cols=40))
    assert sbx.pty.kill(other.pid) is True
    with pytest.raises(CommandExitException):
        other.wait()


def test_files_read_write_list_info_and_remove(sbx: Sandbox) -> None:
    info = sbx.files.write("/tmp/e2b/hello.txt", "hello world")
    assert info.path == "/tmp/e2b/hello.txt" and info.name == "hello.txt"
    assert sbx.files.read("/tmp/e2b/hello.txt") == "hello world"
    blob = bytes(range(256)) * 1000
    sbx.files.write("/tmp/e2b/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/e2b/blob.bin", format="bytes")) == blob
    assert b"".join(sbx.files.read("/tmp/e2b/blob.bin", format="stream")) == blob
    # gzip both ways, and the octet-stream upload.
    sbx.files.write("/tmp/e2b/gz.bin", blob, gzip=True)
    assert bytes(sbx.files.read("/tmp/e2b/gz.bin", format="bytes", gzip=True)) == blob

    written = sbx.files.write_files(
        [
            {"path": "/tmp/e2b/many/a.txt", "data": "A"},
            {"path": "/tmp/e2b/many/sub/b.txt", "data": b"B"},
        ]
    )
    assert {w.path for w in written} == {"/tmp/e2b/many/a.txt", "/tmp/e2b/many/sub/b.txt"}
    assert sbx.files.read("/tmp/e2b/many/sub/b.txt") == "B"

    # Relative paths are in the user's home, and files belong to that user.
    sbx.files.write("notes.txt", "in home")
    assert sbx.commands.run("cat /home/user/notes.txt; stat -c %U notes.txt").stdout == (
        "in home" + "user\n"
    )

    top = {e.name: e for e in sbx.files.list("/tmp/e2b")}
    assert set(top) == {"hello.txt", "blob.bin", "gz.bin", "many"}
    assert top["many"].type == FileType.DIR and top["hello.txt"].type == FileType.FILE
    assert top["hello.txt"].size == 11 and top["hello.txt"].owner == "user"
    deep = {e.path for e in sbx.files.list("/tmp/e2b/many", depth=2)}
    assert deep == {"/tmp/e2b/many/a.txt", "/tmp/e2b/many/sub", "/tmp/e2b/many/sub/b.txt"}

    assert sbx.files.exists("/tmp/e2b/hello.txt")
    assert not sbx.files.exists("/tmp/e2b/nope")
    entry = sbx.files.get_info("/tmp/e2b/hello.txt")
    assert entry.size == 11 and entry.permissions == "-rw-r--r--"
    with pytest.raises(NotFoundException):
        sbx.files.get_info("/tmp/e2b/nope")
    with pytest.raises(NotFoundException):
        sbx.files.read("/tmp/e2b/nope")

    assert sbx.files.make_dir("/tmp/e2b/new/deeper") is True
    assert sbx.files.make_dir("/tmp/e2b/new/deeper") is False  # already there
    moved = sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/new/hello.txt")
    assert moved.path == "/tmp/e2b/new/hello.txt"
    assert sbx.files.read("/tmp/e2b/new/hello.txt") == "hello world"
    sbx.files.remove("/tmp/e2b/new")
    assert not sbx.files.exists("/tmp/e2b/new")


def test_signed_file_urls(sbx: Sandbox) -> None:
    up = sbx.upload_url("/tmp/signed.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("signed.txt", b"via url")})
    assert r.status_code == 200, r.text
    down = sbx.download_url("/tmp/signed.txt")
    r = httpx.get(down)
    assert r.status_code == 200 and r.content == b"via url"
    # Tampered or expired signatures are refused.
    r = httpx.get(down.replace("signed.txt", "other.txt"))
    assert r.status_code == 401, r.text
    expired = sbx.download_url("/tmp/signed.txt", use_signature_expiration=-10)
    assert httpx.get(expired).status_code == 401


def test_watch_dir(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/w")
    handle = sbx.files.watch_dir("/tmp/w", recursive=True)
    try:
        sbx.commands.run("mkdir -p /tmp/w/sub && echo x > /tmp/w/sub/f && rm /tmp/w/sub/f")
        events: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events += handle.get_new_events()
            if any(e.name == "sub/f" and e.type.name == "REMOVE" for e in events):
                break
            time.sleep(0.2)
        kinds = {(e.name, e.type.name) for e in events}
        assert {
            ("sub", "CREATE"),
            ("sub/f", "CREATE"),
            ("sub/f", "WRITE"),
            ("sub/f", "REMOVE"),
        } <= kinds
    finally:
        handle.stop()


def test_metrics(sbx: Sandbox) -> None:
    first = sbx.get_metrics()
    assert len(first) >= 1
    m = first[-1]
    assert m.mem_total == 512 << 20 and 0 < m.mem_used < m.mem_total
    assert 0 < m.disk_used < m.disk_total <= 2048 << 20
    assert m.cpu_count == 1
    # Sampled every 5 s from then on: a busy loop shows up as CPU use.
    sbx.commands.run("timeout 7 sh -c 'while :; do :; done' >/dev/null 2>&1 &", user="root")
    deadline = time.monotonic() + 20
    series = first
    while time.monotonic() < deadline and not any(x.cpu_used_pct > 20 for x in series):
        time.sleep(1)
        series = sbx.get_metrics()
    assert any(x.cpu_used_pct > 20 for x in series), series
    assert [x.timestamp for x in series] == sorted(x.timestamp for x in series)


def test_file_metadata_and_watch_entries(sbx: Sandbox) -> None:
    """envd 0.6.2-0.6.4: metadata kept as user.e2b.* xattrs, events carrying the entry."""
    info = sbx.files.write("/tmp/meta/a.txt", "x", metadata={"Owner": "alice", "run-id": "7"})
    assert info.metadata == {"owner": "alice", "run-id": "7"}  # keys lowercased, as envd does
    assert sbx.files.get_info("/tmp/meta/a.txt").metadata == {"owner": "alice", "run-id": "7"}
    listed = {e.name: e.metadata for e in sbx.files.list("/tmp/meta")}
    assert listed == {"a.txt": {"owner": "alice", "run-id": "7"}}
    # Set inside, out of band, it shows too; other xattr namespaces do not.
    sbx.commands.run(
        "python3 -c \"import os; os.setxattr('/tmp/meta/a.txt', 'user.e2b.tag', b'v1');"
        " os.setxattr('/tmp/meta/a.txt', 'user.other', b'no')\""
    )
    assert sbx.files.get_info("/tmp/meta/a.txt").metadata == {
        "owner": "alice",
        "run-id": "7",
        "tag": "v1",
    }
    moved = sbx.files.rename("/tmp/meta/a.txt", "/tmp/meta/b.txt")
    assert moved.metadata is not None and moved.metadata["tag"] == "v1"
    # E2B allows any HTTP token character in a key; corral keeps the common ones, and says so.
    with pytest.raises(InvalidArgumentException, match="letters, digits"):
        sbx.files.write("/tmp/meta/d.txt", "z", metadata={"a!b": "x"})
    assert not sbx.files.exists("/tmp/meta/d.txt")
    # A new upload replaces the file and its metadata.
    assert sbx.files.write("/tmp/meta/b.txt", "y").metadata is None
    assert sbx.files.get_info("/tmp/meta/b.txt").metadata is None

    handle = sbx.files.watch_dir("/tmp/meta", include_entry=True, allow_network_mounts=True)
    try:
        sbx.files.write("/tmp/meta/c.txt", "hello")
        events: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.entry for e in events):
            events += handle.get_new_events()
            time.sleep(0.2)
        created = [e for e in events if e.name == "c.txt" and e.entry is not None]
        assert created and created[0].entry.path == "/tmp/meta/c.txt", events
    finally:
        handle.stop()


def test_set_timeout_and_expiry(e2b_env: str) -> None:
    s = Sandbox.create(timeout=600)
    try:
        s.set_timeout(2)
        deadline = time.monotonic() + 30
        while s.is_running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not s.is_running()
        with pytest.raises(SandboxNotRunningException):
            s.commands.run("true")
    finally:
        s.kill()


def test_timeout_pauses_and_traffic_resumes_with_lifecycle(e2b_env: str) -> None:
    s = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        s.files.write("/tmp/kept.txt", "kept")
        deadline = time.monotonic() + 30
        while Sandbox.get_info(s.sandbox_id).state.value != "paused":
            assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
            time.sleep(0.3)
        lifecycle = Sandbox.get_info(s.sandbox_id).lifecycle
        assert lifecycle == {"auto_resume": True, "on_timeout": "pause"}
        # auto_resume: the next request wakes it, files intact.
        assert s.files.read("/tmp/kept.txt") == "kept"
        assert Sandbox.get_info(s.sandbox_id).state.value == "running"
    finally:
        s.kill()


def test_pause_and_connect_keep_files_and_processes(e2b_env: str) -> None:
    s = Sandbox.create(timeout=600)
    try:
        s.files.write("/tmp/kept.txt", "kept")
        h = s.commands.run("sleep 600", background=True)
        assert s.pause() is True
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        assert Sandbox.pause(s.sandbox_id) is False  # already paused: E2B's 409
        assert not s.is_running()
        with pytest.raises(SandboxNotRunningException):
            s.commands.run("true")
        listed = {i.sandbox_id: i.state.value for i in Sandbox.list().next_items()}
        assert listed[s.sandbox_id] == "paused"

        back = Sandbox.connect(s.sandbox_id)
        assert back.is_running()
        assert back.files.read("/tmp/kept.txt") == "kept"
        # A pause freezes processes; they go on after it.
        assert h.pid in {p.pid for p in back.commands.list()}
    finally:
        s.kill()


def test_snapshot_fork_and_create_from_snapshot(sbx: Sandbox) -> None:
    sbx.files.write("/tmp/state.txt", "before")
    snap = sbx.create_snapshot()
    sbx.files.write("/tmp/state.txt", "after")
    assert snap.snapshot_id in {x.snapshot_id for x in Sandbox.list_snapshots().next_items()}
    ids = {x.snapshot_id for x in Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()}
    assert ids == {snap.snapshot_id}

    restored = Sandbox.create(snap.snapshot_id, timeout=120)
    try:
        assert restored.files.read("/tmp/state.txt") == "before"
    finally:
        restored.kill()

    forks = sbx.fork(count=2, timeout=120)
    try:
        assert len(forks) == 2
        for f in forks:
            assert isinstance(f, Sandbox), f
            assert f.files.read("/tmp/state.txt") == "after"
            f.files.write("/tmp/state.txt", f.sandbox_id)
        assert sbx.files.read("/tmp/state.txt") == "after"  # forks are copies
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert snap.snapshot_id not in {x.snapshot_id for x in Sandbox.list_snapshots().next_items()}


def _curl(s: Sandbox, url: str) -> str:
    return s.commands.run(f"curl -sS -m 5 -o /dev/null {url}; echo $?", user="root").stdout.strip()


def test_internet_access_and_allow_deny_lists(e2b_env: str) -> None:
    made: list[Sandbox] = []
    try:
        # E2B's default: the internet is open.
        open_ = Sandbox.create(timeout=120)
        made.append(open_)
        assert _curl(open_, "http://allowed.test/") == "0"
        closed = Sandbox.create(allow_internet_access=False, timeout=120)
        made.append(closed)
        assert _curl(closed, "http://allowed.test/") != "0"
        listed = Sandbox.create(
            network={"deny_out": ["0.0.0.0/0"], "allow_out": ["allowed.test"]}, timeout=120
        )
        made.append(listed)
        assert _curl(listed, "http://allowed.test/") == "0"
        assert _curl(listed, "http://blocked.test/") != "0"
        # other.test: blocked.test is the name the security tests keep from the fake DNS.
        denied = Sandbox.create(network={"deny_out": ["198.51.100.12"]}, timeout=120)
        made.append(denied)
        assert _curl(denied, "http://allowed.test/") == "0"
        assert _curl(denied, "http://other.test/") != "0"
        # Updates while running.
        denied.update_network({"deny_out": ["0.0.0.0/0"]})
        assert _curl(denied, "http://allowed.test/") != "0"
    finally:
        for s in made:
            s.kill()


def test_bad_input_gets_clear_errors(e2b_env: str, server: RunningServer) -> None:
    with pytest.raises(SandboxException, match="no-such-template"):
        Sandbox.create("no-such-template")
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_wrong")
    with pytest.raises(SandboxException, match="denyOut"):
        Sandbox.create(network={"deny_out": ["10.0.0.0/8"], "allow_out": ["10.1.2.3"]})
    # envd refuses a request without the sandbox's token, in E2B's error shape.
    with Sandbox.create(timeout=60) as s:
        r = httpx.post(
            f"{server.url}/filesystem.Filesystem/Stat",
            json={"path": "/"},
            headers={"E2b-Sandbox-Id": s.sandbox_id, "X-Access-Token": "wrong"},
        )
        assert r.status_code == 401 and r.json()["code"] == 401
    r = httpx.post(
        f"{server.url}/v2/sandboxes",
        json={"templateID": "base", "bogus": 1},
        headers={"X-API-KEY": server.admin_key},
    )
    assert r.status_code == 400 and "bogus" in r.json()["message"]


@pytest.fixture(scope="module")
def microvm_server(
    tmp_path_factory: pytest.TempPathFactory, server: RunningServer, fake_net: Any
) -> Iterator[RunningServer]:
    """A server whose E2B sandboxes are microVMs (``e2b.isolation``: E2B's API cannot ask)."""
    data = tmp_path_factory.mktemp("e2b-microvm") / "data"
    data.mkdir(parents=True)
    config = {"network": network_config_for_tests(fake_net.dns), "e2b": {"isolation": "microvm"}}
    (data / "server.json").write_text(json.dumps(config))
    templates = (server.data_dir / "templates").resolve()
    with running_server(data, templates, dns_upstream=fake_net.dns) as s:
        yield s


def test_microvm_pause_connect_and_fork_keep_processes(
    microvm_server: RunningServer, base_template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_e2b_at(microvm_server, monkeypatch)
    s = Sandbox.create(timeout=600)
    forks: list[Any] = []
    try:
        with microvm_server.client() as c:
            assert c.get(f"/v1/sandboxes/{s.sandbox_id}").json()["runtime"] == "microvm"
        # Renamed into place: a read never meets the file truncated mid-write.
        counter = "n=0; while true; do n=$((n+1)); echo $n > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.2; done"
        h = s.commands.run(counter, background=True)
        s.files.write("/tmp/kept.txt", "kept")
        time.sleep(1)
        assert s.pause() is True
        back = Sandbox.connect(s.sandbox_id)
        assert back.files.read("/tmp/kept.txt") == "kept"
        assert h.pid in {p.pid for p in back.commands.list()}
        before = int(back.files.read("/tmp/n"))
        time.sleep(1)
        assert int(back.files.read("/tmp/n")) > before  # the same process, still counting

        # A VM's snapshot holds its memory: the fork's copy of the process goes on too.
        forks = back.fork(count=1, timeout=300)
        fork = forks[0]
        assert isinstance(fork, Sandbox), fork
        assert h.pid in {p.pid for p in fork.commands.list()}
        seen = int(fork.files.read("/tmp/n"))
        time.sleep(1)
        assert int(fork.files.read("/tmp/n")) > seen
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
        s.kill()
