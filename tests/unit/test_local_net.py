"""Local mode's host-side network: the policy built from allowed domains, the sandbox's proxy
variables and relay argv, and corral's egress proxy answering on its unix socket."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.local import net as local_net
from corral.local.net import (
    NO_PROXY,
    PROXY_URL,
    RELAY,
    RELAY_NAME,
    SANDBOX_ID,
    SANDBOX_NET_DIR,
    LocalNetwork,
    local_policy,
)
from corral.local.relay import PORT, SOCKET_NAME, parse_args
from corral.net.policy import AddressGuard, NetworkPolicy, compile_policy
from corral.net.proxy import EgressProxy
from corral.net.view import EgressEvent, IPAddress, NetRegistry, SandboxNet

# Never asked in these tests (every request is refused before any lookup); a closed port.
NO_DNS = [("127.0.0.1", 9)]


def rules(policy: NetworkPolicy) -> list[tuple[str | None, list[int | str] | None]]:
    return [(r.domain, r.ports) for r in policy.allow]


# --------------------------------------------------------------------------- the policy


def test_domains_become_rules_on_web_ports() -> None:
    policy = local_policy(["Example.COM.", "*.pkg.example.org", "api.example.net:8443"])
    assert rules(policy) == [
        ("example.com", [80, 443]),
        ("*.pkg.example.org", [80, 443]),
        ("api.example.net", [8443]),
    ]
    assert policy.deny == [] and policy.preset == "none"


def test_repeated_domains_merge_their_ports() -> None:
    policy = local_policy(["example.com:22", "example.com", "EXAMPLE.com:443"])
    assert rules(policy) == [("example.com", [22, 80, 443])]


def test_no_domains_denies_everything() -> None:
    compiled = compile_policy(local_policy([]), AddressGuard())
    assert not compiled.check_name("example.com", 443).allowed


def test_compiled_policy_allows_exactly_those_names_and_ports() -> None:
    compiled = compile_policy(
        local_policy(["example.com", "*.example.org", "git.example.net:22"]), AddressGuard()
    )
    assert compiled.check_name("example.com", 443).allowed
    assert compiled.check_name("example.com", 80).allowed
    assert not compiled.check_name("example.com", 22).allowed
    assert not compiled.check_name("www.example.com", 443).allowed
    assert compiled.check_name("a.b.example.org", 443).allowed
    assert not compiled.check_name("example.org", 443).allowed  # a wildcard is not its suffix
    assert compiled.check_name("git.example.net", 22).allowed
    assert not compiled.check_name("git.example.net", 443).allowed
    assert not compiled.check_name("evil.com", 443).allowed


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("1.2.3.4", "IP address"),
        ("[::1]", "IP address"),
        ("::1", "IP address"),
        ("*", "too broad"),
        ("*.com", "too broad"),
        ("localhost", "two labels"),
        ("bad_label.com", "label"),
        ("", "empty"),
        ("example.com:0", "outside 1-65535"),
        ("example.com:70000", "outside 1-65535"),
        ("example.com:http", "label"),
    ],
)
def test_bad_domains_are_refused_by_name(entry: str, why: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        local_policy(["example.com", entry])
    assert repr(entry) in info.value.message and why in info.value.message


def test_too_many_domains() -> None:
    with pytest.raises(InvalidRequestError, match="at most 64"):
        local_policy([f"h{i}.example.com" for i in range(65)])
    assert len(local_policy([f"h{i}.example.com" for i in range(64)]).allow) == 64


def test_a_bad_domain_fails_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"10\.0\.0\.1"):
        LocalNetwork(["10.0.0.1"], tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the sandbox side


def test_sandbox_env_points_everything_at_the_relay(tmp_path: Path) -> None:
    env = LocalNetwork(["example.com"], tmp_path).sandbox_env()
    assert f"http://127.0.0.1:{PORT}" == PROXY_URL
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "GRPC_PROXY"):
        assert env[name] == env[name.lower()] == PROXY_URL
    assert env["GLOBAL_AGENT_HTTP_PROXY"] == env["GLOBAL_AGENT_HTTPS_PROXY"] == PROXY_URL
    assert env["NODE_USE_ENV_PROXY"] == "1"
    # Only the sandbox's own loopback bypasses the proxy (never any outside name or range).
    assert env["NO_PROXY"] == env["no_proxy"] == env["GLOBAL_AGENT_NO_PROXY"] == NO_PROXY
    assert set(NO_PROXY.split(",")) == {"localhost", "127.0.0.1", "::1"}


def test_wrap_starts_the_relay_then_the_command(tmp_path: Path) -> None:
    net = LocalNetwork([], tmp_path)
    argv = net.wrap(["claude", "--", "-x"])
    assert argv == [
        sys.executable,
        "-I",
        "-S",
        f"{SANDBOX_NET_DIR}/{RELAY_NAME}",
        "--dir",
        SANDBOX_NET_DIR,
        "--",
        "claude",
        "--",
        "-x",
    ]
    assert RELAY.is_file()
    assert parse_args(argv[4:]) == (SANDBOX_NET_DIR, PORT, ["claude", "--", "-x"])
    with pytest.raises(InvalidRequestError):
        net.wrap([])


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--dir", "/d"],
        ["--dir", "/d", "--"],
        ["--", "true"],
        ["--dir"],
        ["--dir", "/d", "--port", "0", "--", "true"],
        ["--dir", "/d", "--port", "x", "--", "true"],
        ["--dir", "/d", "--other", "1", "--", "true"],
    ],
)
def test_relay_refuses_bad_arguments(args: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_args(args)


def test_relay_arguments() -> None:
    assert parse_args(["--port", "8080", "--dir", "/d", "--", "sh", "-c", "x"]) == (
        "/d",
        8080,
        ["sh", "-c", "x"],
    )


# --------------------------------------------------------------------------- the proxy's socket


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[tuple[LocalNetwork, list[EgressEvent]]]:
    events: list[EgressEvent] = []
    net = LocalNetwork(
        ["example.com"], tmp_path / "run", dns_upstreams=NO_DNS, on_event=events.append
    )
    await net.start()
    try:
        yield net, events
    finally:
        await net.stop()


async def ask(path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_socket_dir_is_private_and_removed(tmp_path: Path) -> None:
    net = LocalNetwork(["example.com"], tmp_path / "run", dns_upstreams=NO_DNS)
    with pytest.raises(RuntimeError):
        _ = net.socket_dir
    await net.start()
    directory = net.socket_dir
    assert directory.parent == tmp_path / "run" and directory.name.startswith("net-")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    sock = directory / SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert {p.name for p in directory.iterdir()} == {RELAY_NAME, SOCKET_NAME}
    assert (directory / RELAY_NAME).read_bytes() == RELAY.read_bytes()
    await net.start()  # already started: nothing changes
    assert net.socket_dir == directory
    await net.stop()
    assert not directory.exists() and list((tmp_path / "run").iterdir()) == []
    await net.stop()


async def test_denials_are_answered_and_reported(
    started: tuple[LocalNetwork, list[EgressEvent]],
) -> None:
    net, events = started
    sock = net.socket_dir / SOCKET_NAME
    reply = await ask(sock, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403 ")
    reply = await ask(sock, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403 ")
    reply = await ask(sock, b"CONNECT example.com:22 HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403 ")
    reply = await ask(sock, b"\x16\x03\x01 not a proxy request\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert [(e.sandbox_id, e.kind, e.decision) for e in events] == [(SANDBOX_ID, "tcp", "deny")] * 4
    assert [(e.name, e.ip, e.port) for e in events[:3]] == [
        ("evil.example", None, 443),
        (None, "127.0.0.1", 80),
        ("example.com", None, 22),
    ]


async def test_long_run_dir_still_binds(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    events: list[EgressEvent] = []
    async with LocalNetwork(
        ["example.com"], deep, dns_upstreams=NO_DNS, on_event=events.append
    ) as net:
        sock = net.socket_dir / SOCKET_NAME
        assert len(os.fsencode(sock)) > 108 and stat.S_ISSOCK(sock.stat().st_mode)
        # Too long to connect to by name too: through /proc, as the bind went.
        fd = os.open(net.socket_dir, os.O_PATH)
        try:
            reply = await ask(
                Path(f"/proc/self/fd/{fd}/{SOCKET_NAME}"), b"CONNECT x.y:443 HTTP/1.1\r\n\r\n"
            )
        finally:
            os.close(fd)
        assert reply.startswith(b"HTTP/1.1 403 ")
    assert list(deep.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files away")
async def test_owner_gets_the_directory_and_socket(tmp_path: Path) -> None:
    async with LocalNetwork(
        [], tmp_path / "run", dns_upstreams=NO_DNS, owner=(65534, 65534)
    ) as net:
        files = [net.socket_dir / SOCKET_NAME, net.socket_dir / RELAY_NAME]
        for path in (tmp_path / "run", net.socket_dir, *files):
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (65534, 65534)


async def test_no_dns_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_net, "upstreams_from_resolv_conf", lambda: [])
    net = LocalNetwork(["example.com"], tmp_path / "run")
    with pytest.raises(RuntimeFailure, match=r"resolv\.conf"):
        await net.start()
    assert not (tmp_path / "run").exists()


async def test_unix_listener_follows_the_registry(tmp_path: Path) -> None:
    """A connection is refused once its sandbox left the registry; a path is listened on once."""
    registry = NetRegistry()
    policy = compile_policy(local_policy(["example.com"]), AddressGuard())
    registry.add(SandboxNet("sb", "t", ipaddress.IPv4Address("0.0.0.0"), policy))
    events: list[EgressEvent] = []

    async def resolve(name: str) -> list[tuple[IPAddress, float]]:
        raise AssertionError(f"nothing should be resolved ({name})")

    proxy = EgressProxy(registry, resolve, events.append, host=None, port=0)
    with pytest.raises(RuntimeFailure, match="no TCP address"):
        await proxy.start()
    path = tmp_path / "p.sock"
    await proxy.listen_unix(path, "sb")
    try:
        with pytest.raises(RuntimeFailure, match="already listens"):
            await proxy.listen_unix(path, "sb")
        other = EgressProxy(registry, resolve, events.append, host=None, port=0)
        with pytest.raises(RuntimeFailure, match="cannot listen"):
            await other.listen_unix(path, "sb")  # the file exists: never taken over
        reply = await ask(path, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 ") and len(events) == 1
        registry.remove("sb")
        # Closed unanswered (a reset, on a unix socket, when the request was left unread).
        try:
            reply = await ask(path, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        assert reply == b"" and len(events) == 1
    finally:
        await proxy.stop()
    assert not path.exists()
