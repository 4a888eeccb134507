"""corral run's secrets: settings and --secret merge, validate and obey the trust rule; the network binds set variables only, checks every binding as the server does, and gives the sandbox placeholders and the run's CA, never a value."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from corral.cli.main import app
from corral.errors import InvalidRequestError, RuntimeFailure
from corral.local import net as local_net
from corral.local.jail import ViolationLog, _net_event
from corral.local.net import (
    CA_BUNDLE_NAME,
    CA_NAME,
    SANDBOX_NET_DIR,
    LocalNetwork,
)
from corral.local.relay import SOCKET_NAME
from corral.local.settings import (
    Flags,
    ProjectSettings,
    SecretRule,
    SecretSpec,
    SettingsError,
    UserSettings,
    load_user_settings,
    parse_secret_flag,
)
from corral.net.view import EgressEvent
from tests.unit.test_local_settings import _resolve

NO_DNS = [("127.0.0.1", 9)]  # never asked: nothing here is resolved
PLACEHOLDER = re.compile(r"corral-secret-[0-9a-f]{40}-[0-9a-f]{20}")
VALUE = "sk-test-" + "0123456789abcdef" * 3


# -------------------------------------------------------------------------------- settings


def test_a_user_file_binds_variables_to_hosts(tmp_path: Path) -> None:
    f = tmp_path / "local.toml"
    f.write_text(
        'allow_domains = ["api.github.com"]\n'
        "secrets = [\n"
        '  { env = "GITHUB_TOKEN", hosts = ["API.GitHub.com."], header = "Authorization",'
        ' format = "Bearer {value}", reason = "gh" },\n'
        '  { env = "OTHER_KEY", hosts = ["*.example.org", "*.example.org"] },\n'
        "]\n"
    )
    user = load_user_settings(f)
    assert user is not None
    gh, other = user.secrets
    assert (gh.env, gh.hosts, gh.header, gh.format) == (
        "GITHUB_TOKEN",
        ["api.github.com"],
        "Authorization",
        "Bearer {value}",
    )
    assert other.hosts == ["*.example.org"] and other.header is None and other.format is None


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ('{ env = "K", hosts = ["1.2.3.4"] }', "IP address"),
        ('{ env = "K", hosts = ["*"] }', "anywhere"),
        ('{ env = "K", hosts = ["*.com"] }', "too broad"),
        ('{ env = "K", hosts = [] }', "at least 1"),
        ('{ env = "K" }', "hosts: Field required"),
        ('{ env = "1K", hosts = ["a.example.com"] }', "not a variable"),
        ('{ env = "A-B", hosts = ["a.example.com"] }', "not a variable"),
        ('{ env = "CORRAL_LOCAL", hosts = ["a.example.com"] }', "set by corral"),
        ('{ env = "K", hosts = ["a.example.com"], header = "bad header" }', "header"),
        ('{ env = "K", hosts = ["a.example.com"], format = "Bearer" }', "{value}"),
        ('{ env = "K", hosts = ["a.example.com"], fmt = "x" }', "fmt: unknown key"),
    ],
)
def test_bad_bindings_are_refused_with_the_file_named(tmp_path: Path, entry: str, why: str) -> None:
    f = tmp_path / "local.toml"
    f.write_text(f"secrets = [{entry}]\n")
    with pytest.raises(SettingsError) as info:
        load_user_settings(f)
    assert str(f) in info.value.message and "secrets.0" in info.value.message
    assert why in info.value.message


def test_the_secret_flag() -> None:
    assert parse_secret_flag("K:a.example.com") == {"env": "K", "hosts": ["a.example.com"]}
    assert parse_secret_flag(" K : a.example.com , b.example.com") == {
        "env": "K",
        "hosts": ["a.example.com", "b.example.com"],
    }
    for bad in ("K", "K:", ":a.example.com", "K:a.example.com,", "K:a,,b"):
        with pytest.raises(SettingsError, match=rf"--secret {re.escape(repr(bad))}: expected"):
            parse_secret_flag(bad)
    flags = Flags(allow_domains=["a.example.com"], secrets=["K:1.2.3.4"])
    with pytest.raises(SettingsError, match=r"^--secret: .*IP address"):
        _resolve(flags)


def test_layers_add_hosts_and_the_last_header_wins() -> None:
    user = UserSettings(
        allow_domains=["gw.example.com"],
        secrets=[
            SecretRule(env="ANTHROPIC_API_KEY", hosts=["gw.example.com"], header="x-api-key"),
            SecretRule(env="TOKEN_A", hosts=["gw.example.com"], format="Bearer {value}"),
        ],
    )
    flags = Flags(
        profile="claude-code",
        secrets=["TOKEN_A:api.anthropic.com", "ANTHROPIC_API_KEY:gw.example.com"],
    )
    p = _resolve(flags, user)
    by_env = {s.env: s for s in p.secrets}
    # The profile's first, in the order bound; then the user's own.
    assert list(by_env) == [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "TOKEN_A",
    ]
    assert by_env["ANTHROPIC_API_KEY"] == SecretSpec(
        "ANTHROPIC_API_KEY", ("api.anthropic.com", "gw.example.com"), "x-api-key", "{value}"
    )
    assert by_env["TOKEN_A"] == SecretSpec(
        "TOKEN_A", ("gw.example.com", "api.anthropic.com"), None, "Bearer {value}"
    )


def test_an_untrusted_project_cannot_bind_and_says_so() -> None:
    project = ProjectSettings(secrets=[SecretRule(env="ANTHROPIC_API_KEY", hosts=["evil.example"])])
    p = _resolve(Flags(profile="claude-code"), project=project)
    assert {s.env: s.hosts for s in p.secrets}["ANTHROPIC_API_KEY"] == ("api.anthropic.com",)
    (notice,) = p.notices
    assert "not trusted" in notice and "secrets = ANTHROPIC_API_KEY:evil.example" in notice
    trusted = _resolve(Flags(profile="claude-code", trust_project=True), project=project)
    assert {s.env: s.hosts for s in trusted.secrets}["ANTHROPIC_API_KEY"] == (
        "api.anthropic.com",
        "evil.example",
    )
    (notice,) = trusted.notices
    assert "widens" in notice and "evil.example" in notice


def test_a_binding_needs_an_allowed_domain() -> None:
    with pytest.raises(SettingsError, match=r"K is bound to a\.example\.com.*no domain is allowed"):
        _resolve(Flags(secrets=["K:a.example.com"]))


def test_a_bound_variable_never_passes_and_setenv_cannot_set_it() -> None:
    user = UserSettings(
        allow_domains=["a.example.com"],
        env=["MY_KEY", "OTHER_API_KEY"],
        setenv={"MY_KEY": "x", "KEEP": "y"},
        secrets=[SecretRule(env="MY_KEY", hosts=["a.example.com"])],
    )
    p = _resolve(user=user)
    out = p.sandbox_env({"MY_KEY": "real", "OTHER_API_KEY": "passed", "PATH": "/bin"})
    assert "MY_KEY" not in out
    assert out["OTHER_API_KEY"] == "passed" and out["KEEP"] == "y"
    assert any("setenv MY_KEY is ignored" in n for n in p.notices)


def test_the_run_command_takes_the_secret_flag(tmp_path: Path) -> None:
    """Through the CLI: a malformed --secret is a usage error (exit 2), one line."""
    result = CliRunner().invoke(
        app,
        ["run", "--as-root", "--secret", "NOHOST", "--", "true"],
        env={"HOME": str(tmp_path)},
    )
    assert result.exit_code == 2, result.output
    assert "--secret 'NOHOST': expected ENV:HOST" in result.output
    result = CliRunner().invoke(
        app,
        ["run", "--as-root", "--secret", "K:a.example.com", "--", "true"],
        env={"HOME": str(tmp_path)},
    )
    assert result.exit_code == 2, result.output
    assert "no domain is allowed" in result.output


# ------------------------------------------------------------------------------- the network


def _net(tmp_path: Path, environ: dict[str, str], *specs: SecretSpec, **kw: object) -> LocalNetwork:
    return LocalNetwork(
        ["api.example.com", "*.example.org", "plain.example.net:8080"],
        tmp_path / "run",
        dns_upstreams=NO_DNS,
        secrets=specs,
        environ=environ,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        (("other.example.com",), r"other\.example\.com, which .* port 443 .*--allow-domain"),
        (("plain.example.net",), r"plain\.example\.net, which .* port 443"),
        (("example.org",), r"example\.org, which .* port 443"),
    ],
)
def test_a_host_the_run_cannot_reach_on_443_is_refused(
    tmp_path: Path, hosts: tuple[str, ...], why: str
) -> None:
    # Checked whether or not the variable is set: a wrong binding fails every run alike.
    for environ in ({"K": VALUE, "J": VALUE}, {}):
        with pytest.raises(InvalidRequestError, match=why):
            _net(tmp_path, environ, SecretSpec("K", ("api.example.com",)), SecretSpec("J", hosts))
        assert not (tmp_path / "run").exists()  # refused before anything was made


async def test_an_unset_variable_is_not_bound_and_verbose_says_so(tmp_path: Path) -> None:
    notes: list[str] = []
    net = _net(tmp_path, {"K": ""}, SecretSpec("K", ("api.example.com",)), note=notes.append)
    assert notes == ["secret K: not set in the environment, not bound"]
    async with net:
        assert net.placeholders == {} and net.ro_files() == []
        assert {p.name for p in net.socket_dir.iterdir()} == {"relay.py", SOCKET_NAME}
        env = net.sandbox_env()
        assert "K" not in env and "SSL_CERT_FILE" not in env


async def test_a_set_variable_becomes_a_placeholder_and_the_ca_is_given(tmp_path: Path) -> None:
    specs = (
        SecretSpec("K", ("api.example.com", "*.example.org")),
        SecretSpec("UNSET", ("api.example.com",)),
    )
    environ = {"K": VALUE, "PATH": "/bin"}
    async with _net(tmp_path, environ, *specs) as net:
        placeholder = net.placeholders["K"]
        assert PLACEHOLDER.fullmatch(placeholder) and list(net.placeholders) == ["K"]
        env = net.sandbox_env()
        assert env["K"] == placeholder and "UNSET" not in env
        bundle, ca = f"{SANDBOX_NET_DIR}/{CA_BUNDLE_NAME}", f"{SANDBOX_NET_DIR}/{CA_NAME}"
        assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == bundle
        assert env["NODE_EXTRA_CA_CERTS"] == ca
        # The files, readable by the sandbox's user: the CA, and the host's roots plus it.
        directory = net.socket_dir
        ca_pem = (directory / CA_NAME).read_bytes()
        roots = b"".join(Path(p).read_bytes() for p in local_net._system_bundles()[:1])
        assert (directory / CA_BUNDLE_NAME).read_bytes().rstrip(b"\n").endswith(ca_pem.strip())
        assert (directory / CA_BUNDLE_NAME).read_bytes().startswith(roots)
        for name in (CA_NAME, CA_BUNDLE_NAME):
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o644
        # Name-constrained to the bound hosts, and valid as a CA.
        cert = x509.load_pem_x509_certificate(ca_pem)
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        assert {str(n.value) for n in constraints.permitted_subtrees or ()} == {
            "api.example.com",
            "example.org",
        }
        # Bound over every system bundle the host has, read-only.
        assert net.ro_files() == [
            (directory / CA_BUNDLE_NAME, p) for p in local_net._system_bundles()
        ]
        # The value is in none of it.
        for path in directory.iterdir():
            if path.is_file():
                assert VALUE.encode() not in path.read_bytes()
        assert VALUE not in repr(env) and VALUE not in repr(net.ro_files())
    assert list((tmp_path / "run").iterdir()) == []


async def test_placeholders_are_new_each_run_with_a_steady_tail(tmp_path: Path) -> None:
    """Random per run; the last 20 characters (what Claude Code remembers an approved key by)
    are the same for the same variable."""
    seen = []
    for _ in range(2):
        async with _net(tmp_path, {"K": VALUE}, SecretSpec("K", ("api.example.com",))) as net:
            seen.append(net.placeholders["K"])
    assert seen[0] != seen[1] and seen[0][-20:] == seen[1][-20:]
    assert VALUE[-20:] != seen[0][-20:]


async def test_a_value_that_cannot_go_in_a_header_is_refused_unshown(tmp_path: Path) -> None:
    bad = "sk-secret\r\nX-Evil: 1"
    net = _net(tmp_path, {"K": bad}, SecretSpec("K", ("api.example.com",)))
    with pytest.raises(InvalidRequestError) as info:
        await net.start()
    assert info.value.message.startswith("$K: ") and "control characters" in info.value.message
    assert "sk-secret" not in info.value.message
    for bad, why in (("x" * 16385, "1 to 16384 characters"), ("sk-\udcff", "Unicode text")):
        net = _net(tmp_path, {"K": bad}, SecretSpec("K", ("api.example.com",)))
        with pytest.raises(InvalidRequestError, match=why):
            await net.start()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files away")
async def test_the_ca_files_belong_to_the_sandbox_user(tmp_path: Path) -> None:
    async with _net(
        tmp_path, {"K": VALUE}, SecretSpec("K", ("api.example.com",)), owner=(65534, 65534)
    ) as net:
        for name in (CA_NAME, CA_BUNDLE_NAME):
            info = (net.socket_dir / name).stat()
            assert (info.st_uid, info.st_gid) == (65534, 65534)


async def test_plain_http_to_a_bound_host_is_refused_before_any_lookup(tmp_path: Path) -> None:
    events: list[EgressEvent] = []
    async with _net(
        tmp_path, {"K": VALUE}, SecretSpec("K", ("api.example.com",)), on_event=events.append
    ) as net:
        placeholder = net.placeholders["K"]
        reader, writer = await asyncio.open_unix_connection(str(net.socket_dir / SOCKET_NAME))
        writer.write(
            b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n"
            + f"Authorization: Bearer {placeholder}\r\n\r\n".encode()
        )
        reply = await reader.read()
        writer.close()
    assert reply.startswith(b"HTTP/1.1 502 "), reply
    assert b"sent only over TLS" in reply and VALUE.encode() not in reply
    assert [(e.kind, e.decision, e.name, e.port) for e in events] == [
        ("tcp", "deny", "api.example.com", 80)
    ]
    assert "sent only over TLS" in events[0].reason


async def test_upstream_ca_file(tmp_path: Path) -> None:
    """The proxy verifies upstreams against the host's store plus ``upstream_ca_file``."""
    async with _net(tmp_path, {"K": VALUE}, SecretSpec("K", ("api.example.com",))) as net:
        ca_pem = (net.socket_dir / CA_NAME).read_bytes()
    extra = tmp_path / "extra.pem"
    extra.write_bytes(ca_pem)
    net = _net(tmp_path, {}, upstream_ca_file=extra)
    subjects = [c["subject"] for c in net._upstream_context().get_ca_certs()]
    assert any("corral sandbox CA" in str(s) for s in subjects)
    extra.write_text("not a certificate\n")
    with pytest.raises(RuntimeFailure, match="cannot load CA certificates"):
        _net(tmp_path, {}, upstream_ca_file=extra)._upstream_context()


# -------------------------------------------------------------------------------- reporting


def test_verbose_shows_each_injection_and_the_summary_does_not_count_it() -> None:
    said: list[str] = []
    log = ViolationLog(said.append, verbose=True)
    event = EgressEvent(
        "local",
        "inject",
        "allow",
        "POST /v1/messages: injected ANTHROPIC_API_KEY",
        "api.anthropic.com",
        "1.2.3.4",
        443,
    )
    _net_event(log, said.append, True)(event)
    assert said == ["injected ANTHROPIC_API_KEY: api.anthropic.com POST /v1/messages"]
    _net_event(log, said.append, False)(event)
    assert len(said) == 1 and log.summary() is None
