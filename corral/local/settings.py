"""Settings of ``corral run`` (docs/local.md): the built-in defaults and profiles
(``corral/resources/local-profiles.toml``), the invoking user's ``~/.config/corral/local.toml``,
the project's ``.corral/local.toml`` and the command-line flags, merged into one :class:`Policy`.

Every layer adds to the lists of the layers below it (in the order built-in < user file < project
file < flags); ``allow_read`` is the one way to take a hidden path back. The project file comes
with the repository, which may be someone else's, so it is not trusted by default: what it
*narrows* (``deny_read``, ``protect``, ``env_deny``, ``setenv``, which only acts inside) always
applies; what it *widens* (``allow_domains``, ``allow_write``, ``allow_read``, ``env``,
``secrets``, ``profile``) applies only when the user trusts the project (``--trust-project``, or
the project in ``trusted_projects`` of the user file), and is shown in the notices either way. The
agent cannot rewrite the project file between runs: ``.corral/`` is on the mandatory read-only
list.

``secrets`` bind an environment variable of the invoking user to the hosts its value may be sent
to: inside, the variable holds a placeholder, and corral's egress proxy puts the value into
HTTPS requests toward those hosts (``corral.local.net``). Bindings of one variable in several
layers add up: the hosts are the union, the last ``header``/``format`` given wins.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from corral.errors import InvalidRequestError

__all__ = [
    "PROJECT_SETTINGS",
    "Builtins",
    "Flags",
    "Policy",
    "Profile",
    "ProjectSettings",
    "Rules",
    "SecretRule",
    "SecretSpec",
    "SettingsError",
    "UserSettings",
    "builtins",
    "find_project_dir",
    "load_project_settings",
    "load_user_settings",
    "parse_project_settings",
    "parse_secret_flag",
    "parse_user_settings",
    "read_settings",
    "resolve",
    "user_settings_path",
]

RESOURCE = Path(__file__).resolve().parent.parent / "resources" / "local-profiles.toml"
PROJECT_SETTINGS = Path(".corral") / "local.toml"
# Shell patterns over variable names: letters, digits, '_' and the wildcards '*' and '?'.
_ENV_PATTERN = re.compile(r"[A-Za-z0-9_*?]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by corral itself inside the sandbox; a settings file must not fake or drop it.
_RESERVED_ENV = frozenset({"CORRAL_LOCAL"})
# A variable a secret is bound to: its name is also the secret's name in the proxy's messages and
# events, which allow letters, digits, '.', '_' and '-' (64 at most) and a letter or digit first.
_SECRET_ENV = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_SECRET_SYNTAX = "ENV:HOST[,HOST...], e.g. ANTHROPIC_API_KEY:api.anthropic.com"


class SettingsError(InvalidRequestError):
    """A settings file or flag that cannot be used; the message names the file and the key."""


# ------------------------------------------------------------------------------ file models


def _check_domains(values: list[str]) -> list[str]:
    # The network's own parser decides (names, *.suffix, either with :PORT), so a settings file
    # cannot accept what the proxy would then refuse.
    if not values:
        return values  # importing the egress stack costs a quarter of a second: not for nothing
    from corral.local.net import local_policy

    out = []
    for raw in values:
        try:
            local_policy([raw])
        except InvalidRequestError as exc:
            raise ValueError(exc.message) from None
        out.append(raw.strip().lower())
    return out


def _check_env_patterns(values: list[str]) -> list[str]:
    for raw in values:
        if not _ENV_PATTERN.fullmatch(raw):
            raise ValueError(f"{raw!r} is not a variable name or pattern (letters, digits, _ * ?)")
    return values


def _check_paths(values: list[str]) -> list[str]:
    for raw in values:
        if not raw or "\0" in raw:
            raise ValueError("a path must be a non-empty string without NUL")
        if raw.startswith("~") and raw != "~" and not raw.startswith("~/"):
            raise ValueError(f"{raw!r}: only ~ and ~/... are understood, not ~user")
    return values


def _check_secret_host(env: str, raw: str) -> str:
    # As the server checks bound hosts; whether the run may reach the host on 443 is checked
    # when the network starts (corral.local.net).
    from corral.net.policy import secret_host

    try:
        return secret_host(raw)
    except ValueError as exc:
        raise ValueError(f"{env}: host {raw!r} {exc}") from None


class SecretRule(BaseModel):
    """One entry of ``secrets``: keep the value of ``env`` outside the sandbox and send it only
    to ``hosts`` (names or ``*.domain``), over HTTPS. The command sees a placeholder in ``env``;
    the proxy swaps it for the value wherever it appears in a request line or header toward a
    bound host, and with ``header`` also sets that header to ``format`` (``{value}`` in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: StrictStr
    hosts: list[StrictStr] = Field(min_length=1)
    header: StrictStr | None = None
    format: StrictStr | None = None
    reason: StrictStr = ""

    @field_validator("env")
    @classmethod
    def _env(cls, value: str) -> str:
        if not _SECRET_ENV.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a variable a secret can be bound to (a letter, then up to "
                "63 letters, digits or _)"
            )
        if value in _RESERVED_ENV:
            raise ValueError(f"{value} is set by corral")
        return value

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        env = info.data.get("env", "secret")
        return list(dict.fromkeys(_check_secret_host(env, h) for h in value))

    @model_validator(mode="after")
    def _header_and_format(self) -> SecretRule:
        if self.header is not None or self.format is not None:
            # The server's own rules for a binding's header and format. Imported only here:
            # corral.core costs start-up time a binding without them does not need.
            from corral.core.commands import SecretBinding

            try:
                SecretBinding(
                    name=self.env,
                    hosts=self.hosts,
                    env=self.env,
                    header=self.header,
                    format=self.format or "{value}",
                )
            except ValidationError as exc:
                raise ValueError(f"{self.env}: {_describe(exc)}") from None
        return self

    def shown(self) -> str:
        return f"{self.env}:{','.join(self.hosts)}"


@dataclass(frozen=True)
class SecretSpec:
    """A variable bound to hosts after the merge (see :class:`SecretRule`)."""

    env: str
    hosts: tuple[str, ...]
    header: str | None = None
    format: str = "{value}"


class Rules(BaseModel):
    """One layer's rules: the top level of a settings file, a profile, or the flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_domains: list[StrictStr] = Field(default_factory=list)
    allow_write: list[StrictStr] = Field(default_factory=list)
    allow_read: list[StrictStr] = Field(default_factory=list)
    deny_read: list[StrictStr] = Field(default_factory=list)
    protect: list[StrictStr] = Field(default_factory=list)
    env: list[StrictStr] = Field(default_factory=list)
    env_deny: list[StrictStr] = Field(default_factory=list)
    setenv: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    secrets: list[SecretRule] = Field(default_factory=list)

    _domains = field_validator("allow_domains")(_check_domains)
    _env = field_validator("env", "env_deny")(_check_env_patterns)
    _paths = field_validator("allow_write", "allow_read", "deny_read", "protect")(_check_paths)

    @field_validator("setenv")
    @classmethod
    def _setenv(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"setenv: {name!r} is not a variable name")
            if name in _RESERVED_ENV:
                raise ValueError(f"setenv: {name} is set by corral")
            if "\0" in text:
                raise ValueError(f"setenv: the value of {name} contains NUL")
        return value


class Profile(Rules):
    """``[profiles.NAME]``. A user profile named like a built-in one adds to it, unless
    ``extends_builtin = false`` (the way to narrow a built-in profile)."""

    description: StrictStr = ""
    extends_builtin: StrictBool = True


class UserSettings(Rules):
    """``~/.config/corral/local.toml`` of the invoking user."""

    profile: StrictStr | None = None
    trusted_projects: list[StrictStr] = Field(default_factory=list)
    profiles: dict[StrictStr, Profile] = Field(default_factory=dict)

    _trusted = field_validator("trusted_projects")(_check_paths)


class ProjectSettings(Rules):
    """``.corral/local.toml`` in the project directory."""

    profile: StrictStr | None = None


# --------------------------------------------------------------------------- built-in data


class _Reasoned(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: StrictStr = Field(min_length=1)


class _PathEntry(_Reasoned):
    path: StrictStr


class _NameEntry(_Reasoned):
    name: StrictStr


class _PatternEntry(_Reasoned):
    pattern: StrictStr


class _DomainEntry(_Reasoned):
    domain: StrictStr


class _SetEnvEntry(_Reasoned):
    name: StrictStr
    value: StrictStr


class _SecretEntry(_Reasoned):
    env: StrictStr
    hosts: list[StrictStr] = Field(min_length=1)
    header: StrictStr | None = None
    format: StrictStr | None = None


class _BuiltinProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: StrictStr
    allow_domains: list[_DomainEntry] = Field(default_factory=list)
    allow_write: list[_PathEntry] = Field(default_factory=list)
    deny_read: list[_PathEntry] = Field(default_factory=list)
    protect: list[_PathEntry] = Field(default_factory=list)
    env: list[_NameEntry] = Field(default_factory=list)
    setenv: list[_SetEnvEntry] = Field(default_factory=list)
    secrets: list[_SecretEntry] = Field(default_factory=list)


class _BuiltinDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    deny_read: list[_PathEntry]
    hide_names: list[_PatternEntry]
    hide_names_under: list[_PathEntry]
    hide_names_prune: list[_NameEntry]
    env_deny: list[_NameEntry]


class _Mandatory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    names: list[_NameEntry]
    git: list[_NameEntry]


class _BuiltinFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    about: StrictStr
    defaults: _BuiltinDefaults
    mandatory: _Mandatory
    profiles: dict[StrictStr, _BuiltinProfile]


@dataclass(frozen=True)
class Builtins:
    """The resource file as the merge uses it (reasons dropped; they are for people)."""

    defaults: Rules
    hide_names: tuple[str, ...]
    hide_under: tuple[str, ...]
    hide_prune: frozenset[str]
    protected_names: frozenset[str]
    git_protected: tuple[str, ...]
    profiles: Mapping[str, Profile]


def _profile_from(entry: _BuiltinProfile) -> Profile:
    # Not validated here: checking domains loads the whole egress stack, most of a run's
    # start-up time, and these are our own (tests/unit/test_local_settings.py validates them).
    return Profile.model_construct(
        description=entry.description,
        extends_builtin=True,
        allow_domains=[e.domain for e in entry.allow_domains],
        allow_write=[e.path for e in entry.allow_write],
        deny_read=[e.path for e in entry.deny_read],
        protect=[e.path for e in entry.protect],
        env=[e.name for e in entry.env],
        setenv={e.name: e.value for e in entry.setenv},
        secrets=[
            SecretRule.model_construct(
                env=e.env, hosts=e.hosts, header=e.header, format=e.format, reason=e.reason
            )
            for e in entry.secrets
        ],
    )


def parse_builtins(text: str) -> Builtins:
    """The built-in settings from the text of local-profiles.toml (a bad file is a bug)."""
    raw = _BuiltinFile.model_validate(tomllib.loads(text))
    d = raw.defaults
    return Builtins(
        defaults=Rules(
            deny_read=[e.path for e in d.deny_read],
            env_deny=[e.name for e in d.env_deny],
        ),
        hide_names=tuple(e.pattern for e in d.hide_names),
        hide_under=tuple(e.path for e in d.hide_names_under),
        hide_prune=frozenset(e.name for e in d.hide_names_prune),
        protected_names=frozenset(e.name for e in raw.mandatory.names),
        git_protected=tuple(e.name for e in raw.mandatory.git),
        profiles={name: _profile_from(p) for name, p in raw.profiles.items()},
    )


@lru_cache(maxsize=1)
def builtins() -> Builtins:
    return parse_builtins(RESOURCE.read_text())


# ------------------------------------------------------------------------------- loading

_M = TypeVar("_M", bound=BaseModel)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def read_settings(path: Path) -> str | None:
    """A settings file's text, None when there is none. Kept apart from parsing so that the
    jail can read a user's file as that user and parse it itself."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None


def _parse(text: str, path: Path, model: type[_M]) -> _M:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(f"{path}: {_describe(exc)}") from None


def parse_user_settings(text: str, path: Path) -> UserSettings:
    return _parse(text, path, UserSettings)


def parse_project_settings(text: str, path: Path) -> ProjectSettings:
    return _parse(text, path, ProjectSettings)


def load_user_settings(path: Path) -> UserSettings | None:
    text = read_settings(path)
    return None if text is None else parse_user_settings(text, path)


def load_project_settings(project: Path) -> ProjectSettings | None:
    path = project / PROJECT_SETTINGS
    text = read_settings(path)
    return None if text is None else parse_project_settings(text, path)


def user_settings_path(home: Path, environ: Mapping[str, str]) -> Path:
    """The invoking user's settings file. ``XDG_CONFIG_HOME`` counts only when the environment
    is the user's own (not under sudo, where it would be root's or stale)."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg.startswith("/") and "SUDO_UID" not in environ:
        return Path(xdg) / "corral" / "local.toml"
    return home / ".config" / "corral" / "local.toml"


def find_project_dir(cwd: Path) -> Path:
    """The project directory: the nearest ancestor of ``cwd`` (itself included) holding a
    ``.git`` entry (a directory, or the file of a worktree or submodule), else ``cwd``.
    Found by looking rather than by running git, which refuses another user's repository when
    run as root."""
    for d in (cwd, *cwd.parents):
        if os.path.lexists(d / ".git"):
            return d
    return cwd


# --------------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class Flags:
    """What the command line asked for (paths relative to the working directory)."""

    profile: str | None = None
    allow_domains: Sequence[str] = ()
    allow_write: Sequence[str] = ()
    allow_read: Sequence[str] = ()
    deny_read: Sequence[str] = ()
    secrets: Sequence[str] = ()  # ENV:HOST[,HOST...]
    trust_project: bool = False


@dataclass(frozen=True)
class Policy:
    """Everything the jail needs to know, with paths expanded (not yet resolved: symlinks are
    the jail's business, at the moment it builds the mounts)."""

    project: Path
    home: Path
    profile: str | None
    allow_domains: tuple[str, ...]
    allow_write: tuple[Path, ...]
    allow_read: tuple[Path, ...]
    deny_read: tuple[Path, ...]
    protect: tuple[Path, ...]
    hide_names: tuple[str, ...]
    hide_under: tuple[Path, ...]
    hide_prune: frozenset[str]
    protected_names: frozenset[str]
    git_protected: tuple[str, ...]
    env_pass: tuple[str, ...]
    env_deny: tuple[str, ...]
    setenv: Mapping[str, str]
    notices: tuple[str, ...] = ()
    sources: tuple[str, ...] = field(default=())
    secrets: tuple[SecretSpec, ...] = ()

    def sandbox_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The environment the command gets: the caller's, minus ``env_deny`` matches not named
        in ``env``, plus ``setenv`` and ``CORRAL_LOCAL=1``. A variable bound as a secret is never
        passed, whatever ``env`` says: the network puts its placeholder in instead."""
        bound = {s.env for s in self.secrets}
        out = {k: v for k, v in environ.items() if k not in bound and not self.env_denied(k)}
        out.update(self.setenv)
        out["CORRAL_LOCAL"] = "1"
        return out

    def env_denied(self, name: str) -> bool:
        up = name.upper()
        if any(fnmatch.fnmatchcase(up, p.upper()) for p in self.env_pass):
            return False
        return any(fnmatch.fnmatchcase(up, p.upper()) for p in self.env_deny)


_WIDENING = ("allow_domains", "allow_write", "allow_read", "env", "secrets")


def _expand(raw: str, home: Path, base: Path | None, where: str) -> Path:
    if raw == "~":
        return home
    if raw.startswith("~/"):
        return Path(os.path.normpath(home / raw[2:]))
    if raw.startswith("/"):
        return Path(os.path.normpath(raw))
    if base is None:
        raise SettingsError(f"{where}: {raw!r} must be absolute or start with ~/")
    return Path(os.path.normpath(base / raw))


def _union(lists: Iterable[Iterable[Any]]) -> tuple[Any, ...]:
    seen: dict[Any, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return tuple(seen)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _shown(rules: Rules, keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        values = getattr(rules, key)
        if values:
            shown = [v.shown() if isinstance(v, SecretRule) else v for v in values]
            parts.append(f"{key} = {', '.join(shown)}")
    return "; ".join(parts)


@dataclass
class _Layer:
    rules: Rules
    base: Path | None  # where relative paths are relative to (None: they are an error)
    where: str


def _pick_profile(
    name: str, user: UserSettings | None, bi: Builtins, where: str
) -> list[tuple[Profile, str]]:
    found: list[tuple[Profile, str]] = []
    mine = user.profiles.get(name) if user else None
    if name in bi.profiles and (mine is None or mine.extends_builtin):
        found.append((bi.profiles[name], f"built-in profile {name}"))
    if mine is not None:
        found.append((mine, f"profile {name} of the user settings"))
    if not found:
        known = sorted({*bi.profiles, *(user.profiles if user else {})})
        raise SettingsError(f"{where}: no profile {name!r} (known: {', '.join(known)})")
    return found


def resolve(
    flags: Flags,
    *,
    project: Path,
    home: Path,
    cwd: Path,
    user: UserSettings | None,
    project_settings: ProjectSettings | None,
    user_file: Path | None = None,
    bi: Builtins | None = None,
) -> Policy:
    """Merge every layer into a Policy. ``user``/``project_settings`` are the loaded files (None
    when absent); ``user_file`` only names the user file in messages."""
    bi = bi or builtins()
    user_where = str(user_file) if user_file else "user settings"
    proj_where = str(project / PROJECT_SETTINGS)
    notices: list[str] = []
    sources = ["built-in"]

    trusted = flags.trust_project
    if user is not None:
        sources.append(user_where)
        trusted_dirs = [
            _expand(p, home, None, f"{user_where}: trusted_projects") for p in user.trusted_projects
        ]
        trusted = trusted or any(project == t for t in trusted_dirs)

    proj_rules: Rules | None = None
    proj_profile: str | None = None
    if project_settings is not None:
        sources.append(proj_where)
        widening = _shown(project_settings, _WIDENING)
        if project_settings.profile:
            widening = "; ".join(filter(None, [f"profile = {project_settings.profile}", widening]))
        if trusted:
            proj_rules = project_settings
            proj_profile = project_settings.profile
            if widening:
                notices.append(f"{proj_where} (trusted project) widens: {widening}")
        else:
            proj_rules = project_settings.model_copy(update={k: [] for k in _WIDENING})
            if widening:
                notices.append(
                    f"{proj_where}: ignored what would widen the sandbox ({widening}): the "
                    "project is not trusted (pass --trust-project, or list it in "
                    f"trusted_projects of {user_where})"
                )

    layers: list[_Layer] = [_Layer(bi.defaults, None, "built-in defaults")]
    name = flags.profile or proj_profile or (user.profile if user else None)
    picked_where = "--profile" if flags.profile else (proj_where if proj_profile else user_where)
    user_profile_layers: list[_Layer] = []
    if name:
        for prof, where in _pick_profile(name, user, bi, picked_where):
            (layers if where.startswith("built-in") else user_profile_layers).append(
                _Layer(prof, None, where)
            )
    if user is not None:
        layers.append(_Layer(user, None, user_where))
    layers.extend(user_profile_layers)
    if proj_rules is not None:
        layers.append(_Layer(proj_rules, project, proj_where))
    flag_rules = _flag_rules(flags)
    layers.append(_Layer(flag_rules, cwd, "flags"))

    def paths(key: str) -> tuple[Path, ...]:
        return _union(
            [
                _expand(p, home, layer.base, f"{layer.where}: {key}")
                for p in getattr(layer.rules, key)
            ]
            for layer in layers
        )

    allow_read = paths("allow_read")
    deny_read = tuple(p for p in paths("deny_read") if not any(_under(p, a) for a in allow_read))
    setenv: dict[str, str] = {}
    for layer in layers:
        setenv.update(layer.rules.setenv)

    def strings(key: str) -> tuple[str, ...]:
        return _union(getattr(layer.rules, key) for layer in layers)

    allow_domains = strings("allow_domains")
    secrets = _merge_secrets(layers)
    if secrets and not allow_domains:
        first = secrets[0]
        raise SettingsError(
            f"secret {first.env} is bound to {first.hosts[0]}, which this run cannot reach: no "
            f"domain is allowed (--allow-domain {first.hosts[0]}, or allow_domains in the "
            "settings)"
        )
    for spec in secrets:
        if spec.env in setenv:
            notices.append(
                f"setenv {spec.env} is ignored: {spec.env} is bound as a secret (the command "
                "gets its placeholder)"
            )
            del setenv[spec.env]

    return Policy(
        project=project,
        home=home,
        profile=name,
        allow_domains=allow_domains,
        allow_write=paths("allow_write"),
        allow_read=allow_read,
        deny_read=deny_read,
        protect=paths("protect"),
        hide_names=bi.hide_names,
        hide_under=tuple(
            _expand(p, home, None, "built-in hide_names_under") for p in bi.hide_under
        ),
        hide_prune=bi.hide_prune,
        protected_names=bi.protected_names,
        git_protected=bi.git_protected,
        env_pass=strings("env"),
        env_deny=strings("env_deny"),
        setenv=setenv,
        notices=tuple(notices),
        sources=tuple(sources),
        secrets=secrets,
    )


def _merge_secrets(layers: Sequence[_Layer]) -> tuple[SecretSpec, ...]:
    """One binding per variable, in the order first bound: the union of the hosts every layer
    gives it, the last header and format given."""
    merged: dict[str, SecretSpec] = {}
    for layer in layers:
        for rule in layer.rules.secrets:
            old = merged.get(rule.env) or SecretSpec(rule.env, ())
            merged[rule.env] = SecretSpec(
                env=rule.env,
                hosts=_union([old.hosts, rule.hosts]),
                header=rule.header if rule.header is not None else old.header,
                format=rule.format if rule.format is not None else old.format,
            )
    return tuple(merged.values())


def parse_secret_flag(text: str) -> dict[str, Any]:
    """``--secret ENV:HOST[,HOST...]`` as a ``secrets`` entry; SettingsError on another shape."""
    env, sep, rest = text.partition(":")
    hosts = [h.strip() for h in rest.split(",")]
    if not sep or not env.strip() or not all(hosts):
        raise SettingsError(f"--secret {text!r}: expected {_SECRET_SYNTAX}")
    return {"env": env.strip(), "hosts": hosts}


def _flag_rules(flags: Flags) -> Rules:
    secrets = [parse_secret_flag(s) for s in flags.secrets]
    try:
        return Rules(
            allow_domains=list(flags.allow_domains),
            allow_write=list(flags.allow_write),
            allow_read=list(flags.allow_read),
            deny_read=list(flags.deny_read),
            secrets=secrets,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        text = _describe(exc)
        for key, flag in (
            ("allow_domains", "--allow-domain"),
            ("allow_write", "--allow-write"),
            ("allow_read", "--allow-read"),
            ("deny_read", "--deny-read"),
            ("secrets", "--secret"),
        ):
            # secrets.0.hosts: the entry's field is named by the message itself
            text = re.sub(rf"\b{key}(\.\d+)?(\.[a-z_]+)?:", f"{flag}:", text)
        raise SettingsError(text) from None
