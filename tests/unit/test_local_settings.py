"""corral run's settings merge built-in < user file < project file < flags, refuse unknown keys and bad values, and let an untrusted project file only narrow."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.local.settings import (
    RESOURCE,
    Flags,
    Policy,
    Profile,
    ProjectSettings,
    SettingsError,
    UserSettings,
    builtins,
    find_project_dir,
    load_project_settings,
    load_user_settings,
    parse_builtins,
    resolve,
    user_settings_path,
)

HOME = Path("/home/dev")
PROJECT = Path("/home/dev/code/app")
CWD = PROJECT / "src"


def _resolve(
    flags: Flags | None = None,
    user: UserSettings | None = None,
    project: ProjectSettings | None = None,
) -> Policy:
    return resolve(
        flags or Flags(),
        project=PROJECT,
        home=HOME,
        cwd=CWD,
        user=user,
        project_settings=project,
    )


# ----------------------------------------------------------------------------- built-ins


def test_builtin_file_gives_every_entry_a_reason() -> None:
    text = RESOURCE.read_text()
    bi = parse_builtins(text)
    assert {"claude-code", "codex"} <= set(bi.profiles)
    # The model requires `reason` on every entry: dropping one is an error.
    broken = text.replace(
        '{ path = "~/.aws", reason = "AWS access keys and SSO tokens" }', '{ path = "~/.aws" }'
    )
    assert broken != text
    with pytest.raises(ValueError, match="reason"):
        parse_builtins(broken)


def test_builtin_defaults_hide_credentials_and_protect_agent_config() -> None:
    bi = builtins()
    for path in ("~/.ssh", "~/.aws", "~/.gnupg", "~/.config/gcloud", "~/.netrc"):
        assert path in bi.defaults.deny_read
    assert "~/.docker/config.json" in bi.defaults.deny_read
    for name in (".bashrc", ".zshrc", ".profile", ".claude", "CLAUDE.md", ".mcp.json"):
        assert name in bi.protected_names
    for name in (".cursorrules", ".vscode", ".idea", ".corral"):
        assert name in bi.protected_names
    assert {"hooks", "config"} <= set(bi.git_protected)
    assert ".env*" in bi.hide_names


def test_builtin_profiles_are_valid_settings() -> None:
    for profile in builtins().profiles.values():
        assert Profile.model_validate(profile.model_dump()) == profile


def test_agent_profiles_name_their_api_hosts_and_keys() -> None:
    bi = builtins()
    claude = bi.profiles["claude-code"]
    assert "api.anthropic.com" in claude.allow_domains
    assert "~/.claude" in claude.allow_write
    assert "~/.claude/settings.json" in claude.protect
    codex = bi.profiles["codex"]
    assert {"api.openai.com", "chatgpt.com", "auth.openai.com"} <= set(codex.allow_domains)
    # The keys are bound as secrets (placeholders inside), not passed: no `env` for them.
    assert {(s.env, tuple(s.hosts)) for s in claude.secrets} == {
        ("ANTHROPIC_API_KEY", ("api.anthropic.com",)),
        ("ANTHROPIC_AUTH_TOKEN", ("api.anthropic.com",)),
        ("CLAUDE_CODE_OAUTH_TOKEN", ("api.anthropic.com",)),
    }
    assert {(s.env, tuple(s.hosts)) for s in codex.secrets} == {
        ("OPENAI_API_KEY", ("api.openai.com",)),
        ("CODEX_API_KEY", ("api.openai.com",)),
    }
    assert claude.env == [] and codex.env == []
    for profile in (claude, codex):
        # Only hosts the profile itself allows, each with a reason.
        assert all(set(s.hosts) <= set(profile.allow_domains) for s in profile.secrets)
        assert all(s.reason for s in profile.secrets)


# --------------------------------------------------------------------------- loading files


def test_a_missing_file_is_no_settings(tmp_path: Path) -> None:
    assert load_user_settings(tmp_path / "nope.toml") is None
    assert load_project_settings(tmp_path) is None


def test_unknown_keys_are_refused_with_the_file_named(tmp_path: Path) -> None:
    f = tmp_path / "local.toml"
    f.write_text('allow_domain = ["example.com"]\n')
    with pytest.raises(SettingsError) as err:
        load_user_settings(f)
    assert str(f) in err.value.message
    assert "allow_domain: unknown key" in err.value.message
    f.write_text("[profiles.x]\nallow_writes = []\n")
    with pytest.raises(SettingsError, match=r"profiles\.x\.allow_writes: unknown key"):
        load_user_settings(f)


def test_bad_toml_and_bad_values_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "local.toml"
    f.write_text("allow_domains = [\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_user_settings(f)
    f.write_text('allow_domains = ["10.0.0.1"]\n')
    with pytest.raises(SettingsError, match=r"10\.0\.0\.1"):
        load_user_settings(f)
    f.write_text('allow_domains = ["*.com"]\n')
    with pytest.raises(SettingsError, match="too broad"):
        load_user_settings(f)
    f.write_text('env = ["A-B"]\n')
    with pytest.raises(SettingsError, match="not a variable name"):
        load_user_settings(f)
    f.write_text('deny_read = ["~root/x"]\n')
    with pytest.raises(SettingsError, match="~user"):
        load_user_settings(f)
    f.write_text('[setenv]\nCORRAL_LOCAL = "0"\n')
    with pytest.raises(SettingsError, match="set by corral"):
        load_user_settings(f)


def test_project_file_is_read_from_the_project(tmp_path: Path) -> None:
    (tmp_path / ".corral").mkdir()
    (tmp_path / ".corral" / "local.toml").write_text('deny_read = ["secrets"]\n')
    got = load_project_settings(tmp_path)
    assert got is not None and got.deny_read == ["secrets"]


def test_domains_with_ports_are_accepted() -> None:
    assert UserSettings(allow_domains=["Example.COM:8443", "*.pypi.org"]).allow_domains == [
        "example.com:8443",
        "*.pypi.org",
    ]


# ----------------------------------------------------------------------------------- merge


def test_layers_add_up_in_order() -> None:
    user = UserSettings(
        allow_domains=["pypi.org"],
        deny_read=["~/private"],
        setenv={"A": "user", "B": "user"},
    )
    project = ProjectSettings(deny_read=["data/raw"], setenv={"B": "project"})
    flags = Flags(profile="claude-code", allow_domains=["github.com"], deny_read=["../other"])
    p = _resolve(flags, user, project)
    assert p.profile == "claude-code"
    # built-in profile first, then the user file, then the flags
    assert p.allow_domains[0] == "api.anthropic.com"
    assert p.allow_domains[-2:] == ("pypi.org", "github.com")
    assert HOME / ".ssh" in p.deny_read  # built-in default
    assert HOME / "private" in p.deny_read  # user, ~ expanded
    assert PROJECT / "data/raw" in p.deny_read  # project: relative to the project
    assert PROJECT / "other" in p.deny_read  # flag: relative to the working directory
    assert p.setenv["A"] == "user" and p.setenv["B"] == "project"
    assert p.setenv["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert HOME / ".claude" in p.allow_write


def test_duplicates_collapse() -> None:
    p = _resolve(Flags(allow_domains=["a.example.com", "a.example.com"], deny_read=["~/.ssh"]))
    assert p.allow_domains == ("a.example.com",)
    assert p.deny_read.count(HOME / ".ssh") == 1


def test_an_untrusted_project_file_only_narrows() -> None:
    project = ProjectSettings(
        allow_domains=["evil.example"],
        allow_write=["~"],
        allow_read=["~/.ssh"],
        env=["GITHUB_TOKEN"],
        profile="codex",
        deny_read=["secrets"],
        env_deny=["MY_VAR"],
    )
    p = _resolve(project=project)
    assert p.allow_domains == ()
    assert p.allow_write == ()
    assert HOME / ".ssh" in p.deny_read
    assert "GITHUB_TOKEN" not in p.env_pass
    assert p.profile is None
    assert PROJECT / "secrets" in p.deny_read
    assert "MY_VAR" in p.env_deny
    (notice,) = p.notices
    assert "not trusted" in notice and "evil.example" in notice and "profile = codex" in notice


def test_a_trusted_project_file_widens_and_says_so() -> None:
    project = ProjectSettings(allow_domains=["pypi.org"], profile="codex")
    for flags, user in (
        (Flags(trust_project=True), None),
        (Flags(), UserSettings(trusted_projects=["~/code/app"])),
    ):
        p = _resolve(flags, user, project)
        assert "pypi.org" in p.allow_domains
        assert p.profile == "codex"
        (notice,) = p.notices
        assert "trusted project" in notice and "widens" in notice and "pypi.org" in notice


def test_a_narrowing_project_file_is_silent() -> None:
    assert _resolve(project=ProjectSettings(deny_read=["x"])).notices == ()


def test_profile_choice_flag_over_project_over_user() -> None:
    user = UserSettings(profile="claude-code")
    assert _resolve(user=user).profile == "claude-code"
    trusted = Flags(trust_project=True)
    assert _resolve(trusted, user, ProjectSettings(profile="codex")).profile == "codex"
    flags = Flags(profile="claude-code", trust_project=True)
    assert _resolve(flags, user, ProjectSettings(profile="codex")).profile == "claude-code"


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(SettingsError, match=r"no profile 'nope' \(known: claude-code, codex"):
        _resolve(Flags(profile="nope"))


def test_a_user_profile_extends_or_replaces_a_builtin_one() -> None:
    more = UserSettings(profiles={"codex": {"allow_domains": ["pypi.org"]}})  # type: ignore[dict-item]
    p = _resolve(Flags(profile="codex"), more)
    assert "api.openai.com" in p.allow_domains and "pypi.org" in p.allow_domains
    only = UserSettings(
        profiles={"codex": {"allow_domains": ["api.openai.com"], "extends_builtin": False}}  # type: ignore[dict-item]
    )
    p = _resolve(Flags(profile="codex"), only)
    assert p.allow_domains == ("api.openai.com",)
    assert p.allow_write == ()


def test_a_user_profile_of_its_own() -> None:
    user = UserSettings(profiles={"mine": {"allow_domains": ["example.org"]}})  # type: ignore[dict-item]
    assert _resolve(Flags(profile="mine"), user).allow_domains == ("example.org",)


def test_allow_read_takes_back_hidden_paths() -> None:
    p = _resolve(Flags(allow_read=["~/.aws"]))
    assert HOME / ".aws" not in p.deny_read
    assert HOME / ".ssh" in p.deny_read
    # allow_read of a parent takes back everything below it
    p = _resolve(Flags(allow_read=["~/.config"]))
    assert HOME / ".config/gcloud" not in p.deny_read
    assert HOME / ".config" in p.allow_read


def test_relative_paths_in_the_user_file_are_refused() -> None:
    with pytest.raises(SettingsError, match="must be absolute or start with ~/"):
        _resolve(user=UserSettings(deny_read=["relative/path"]))


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"--allow-domain: .*1\.2\.3\.4"):
        _resolve(Flags(allow_domains=["1.2.3.4"]))


# ---------------------------------------------------------------------------- environment


def test_secrets_stay_outside_unless_passed() -> None:
    env = {
        "PATH": "/usr/bin",
        "GITHUB_TOKEN": "t",
        "gh_token": "t",
        "AWS_SECRET_ACCESS_KEY": "k",
        "AWS_PROFILE": "p",
        "OPENAI_API_KEY": "k",
        "ANTHROPIC_API_KEY": "k",
        "DB_PASSWORD": "p",
        "https_proxy": "http://user:pw@proxy:3128",
        "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1",
        "TERM": "xterm",
    }
    p = _resolve(Flags(profile="claude-code"))
    out = p.sandbox_env(env)
    assert set(out) == {
        "PATH",
        "TERM",
        # not ANTHROPIC_API_KEY: the profile binds it as a secret (the network sets its
        # placeholder)
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
        "CORRAL_LOCAL",
    }
    assert out["CORRAL_LOCAL"] == "1"
    assert "ANTHROPIC_API_KEY" not in _resolve().sandbox_env(env)


def test_env_patterns_from_the_user_file() -> None:
    user = UserSettings(env=["GITHUB_*"], env_deny=["MY_*"])
    out = _resolve(user=user).sandbox_env({"GITHUB_TOKEN": "t", "MY_THING": "x", "OTHER": "y"})
    assert out == {"GITHUB_TOKEN": "t", "OTHER": "y", "CORRAL_LOCAL": "1"}


# ---------------------------------------------------------------------------------- places


def test_project_dir_is_the_git_toplevel_or_the_working_dir(tmp_path: Path) -> None:
    deep = tmp_path / "repo" / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_dir(deep) == deep
    (tmp_path / "repo" / ".git").mkdir()
    assert find_project_dir(deep) == tmp_path / "repo"
    wt = tmp_path / "wt" / "x"
    wt.mkdir(parents=True)
    (tmp_path / "wt" / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's .git file
    assert find_project_dir(wt) == tmp_path / "wt"


def test_user_settings_path_honours_xdg_only_outside_sudo() -> None:
    assert user_settings_path(HOME, {}) == HOME / ".config/corral/local.toml"
    xdg = {"XDG_CONFIG_HOME": "/cfg"}
    assert user_settings_path(HOME, xdg) == Path("/cfg/corral/local.toml")
    assert user_settings_path(HOME, {**xdg, "SUDO_UID": "1000"}) == (
        HOME / ".config/corral/local.toml"
    )
