"""Dockerfile parsing: text in, typed build stages out, with Docker's substitution rules applied.

The builder executes what this returns and never looks at Dockerfile syntax itself: ARG and ENV
substitution, shell-form wrapping with the current SHELL, WORKDIR resolution and stage
references are all settled here, following Docker's reference (BuildKit's parser and word
lexer). What corral cannot build (heredocs, ``RUN --mount``, ADD from a URL, ONBUILD, other
platforms) is refused up front with its line, so a build never fails half-way for a reason the
text already showed.

A registry base image's ENV, WORKDIR and SHELL matter for substitution (``ENV PATH=/x:$PATH``)
and relative WORKDIRs; the builder passes them in ``bases`` once it has the images' configs
(parse once to learn the bases, fetch them, parse again). Without them a base counts as empty.
"""

from __future__ import annotations

import json
import posixpath
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from corral.errors import InvalidRequestError

__all__ = [
    "DEFAULT_SHELL",
    "Arg",
    "BaseImage",
    "Cmd",
    "Copy",
    "DockerfileError",
    "Entrypoint",
    "Env",
    "Expose",
    "From",
    "Healthcheck",
    "Label",
    "Run",
    "Shell",
    "Stage",
    "Step",
    "StopSignal",
    "User",
    "Volume",
    "Workdir",
    "parse",
]

DEFAULT_SHELL = ("/bin/sh", "-c")


class DockerfileError(InvalidRequestError):
    """The Dockerfile cannot be built as written; the message starts ``Dockerfile line N: ``."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"Dockerfile line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Step:
    """One instruction: ``line`` is its first line, ``text`` is it as written (for logs)."""

    line: int
    text: str


@dataclass(frozen=True)
class From(Step):
    image: str  # after substitution of global ARGs; may name an earlier stage (see Stage)
    alias: str | None


@dataclass(frozen=True)
class Run(Step):
    command: tuple[str, ...]
    shell_form: bool
    # ARG values in scope and not shadowed by an ENV of the same name: the RUN's environment
    # on top of the stage's ENV. Docker does not persist them into the image.
    env: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Copy(Step):
    sources: tuple[str, ...]  # as written (after substitution), relative to context or stage
    dest: str  # absolute (resolved against WORKDIR); ends in / when Docker takes it as a dir
    from_stage: str | None  # --from as written (after substitution)
    chown: str | None
    chmod: str | None  # octal digits, e.g. "755"
    add: bool  # ADD: local sources only; unpacking local archives is the builder's
    # The earlier stage --from names (by name or index); None with from_stage set: an image.
    from_index: int | None


@dataclass(frozen=True)
class Env(Step):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Workdir(Step):
    path: str  # absolute, resolved against the previous WORKDIR


@dataclass(frozen=True)
class User(Step):
    user: str


@dataclass(frozen=True)
class Arg(Step):
    name: str
    value: str | None  # the value in effect (build arg, default or global); None = unset


@dataclass(frozen=True)
class Cmd(Step):
    command: tuple[str, ...]
    shell_form: bool


@dataclass(frozen=True)
class Entrypoint(Step):
    command: tuple[str, ...]
    shell_form: bool


@dataclass(frozen=True)
class Label(Step):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Expose(Step):
    ports: tuple[str, ...]  # "80", "80/udp", "8000-8010/tcp"


@dataclass(frozen=True)
class Shell(Step):
    shell: tuple[str, ...]


@dataclass(frozen=True)
class StopSignal(Step):
    signal: str


@dataclass(frozen=True)
class Volume(Step):
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Healthcheck(Step):
    command: tuple[str, ...] | None  # None: HEALTHCHECK NONE
    interval: float = 30.0  # seconds; the defaults are Docker's
    timeout: float = 30.0
    start_period: float = 0.0
    retries: int = 3
    start_interval: float = 5.0


_HEALTH_DEFAULTS = {"interval": 30.0, "timeout": 30.0, "start-period": 0.0, "start-interval": 5.0}


@dataclass(frozen=True)
class Stage:
    index: int
    name: str | None  # FROM … AS name, lowercased
    base: str  # the FROM image after substitution
    steps: tuple[Step, ...]  # everything after FROM, in order
    base_stage: int | None  # the earlier stage ``base`` names; None: an image or scratch
    from_step: From  # the FROM instruction itself (its line and text, for logs)


@dataclass(frozen=True)
class BaseImage:
    """What parsing needs of a registry base image's config."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    shell: tuple[str, ...] = DEFAULT_SHELL


_WS = " \t\v\f\r"
_WS_RE = re.compile(r"[ \t\v\f\r]+")
_DIRECTIVE = re.compile(r"#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*")
_STAGE_NAME = re.compile(r"[a-z][a-z0-9._-]*")
_HEREDOC = re.compile(r"[0-9]*<<-?[^<]+")
_NAME = re.compile(r"[0-9]+|[@*#?$!-]|\w+")
_PORT = re.compile(r"[0-9]+(-[0-9]+)?(/(tcp|udp|sctp))?", re.IGNORECASE)
_UNITS = {  # Go's duration units; micro is spelled three ways
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}  # fmt: skip
_DURATION_PART = r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION = re.compile(f"(?:{_DURATION_PART})+")
_PLATFORMS = {"linux/amd64", "linux/x86_64"}
_REMOTE = ("http://", "https://", "git://", "git@", "ssh://")
# BuildKit defines these without an ARG: usable in FROM at once, in a stage after `ARG NAME`.
_AUTO_ARGS = {
    "TARGETPLATFORM": "linux/amd64",
    "TARGETOS": "linux",
    "TARGETARCH": "amd64",
    "TARGETVARIANT": "",
    "BUILDPLATFORM": "linux/amd64",
    "BUILDOS": "linux",
    "BUILDARCH": "amd64",
    "BUILDVARIANT": "",
}
# Flags each instruction takes: name -> whether it needs a value.
_FLAGS: dict[str, dict[str, bool]] = {
    "FROM": {"platform": True},
    "COPY": {"from": True, "chown": True, "chmod": True, "link": False},
    "ADD": {"chown": True, "chmod": True, "link": False},
    "HEALTHCHECK": dict.fromkeys(
        ("interval", "timeout", "start-period", "start-interval", "retries"), True
    ),
}
# Docker flags corral knowingly cannot honour: named as unsupported rather than unknown.
_UNSUPPORTED_FLAGS = {
    "RUN": {"mount", "network", "security", "device"},
    "COPY": {"parents", "exclude"},
    "ADD": {"checksum", "keep-git-dir", "parents", "exclude"},
}


class _Bad(Exception):
    """A problem with the instruction being parsed; parse() adds its line number."""


@dataclass(frozen=True)
class _Instruction:
    line: int
    keyword: str  # upper-cased
    rest: str  # the arguments, continuation lines joined the way Docker joins them
    text: str


def parse(
    text: str,
    build_args: Mapping[str, str] | None = None,
    *,
    bases: Mapping[str, BaseImage] | None = None,
) -> tuple[Stage, ...]:
    """The stages of Dockerfile ``text``; ``bases`` maps a Stage.base image to its config."""
    escape, instructions = _instructions(text)
    return _Parser(escape, build_args or {}, bases or {}).run(instructions)


# --- lines ----------------------------------------------------------------------------------


def _instructions(text: str) -> tuple[str, list[_Instruction]]:
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    escape, seen, i = "\\", set[str](), 0
    # Parser directives: only at the very top; the first line that is not one ends them.
    while i < len(lines):
        m = _DIRECTIVE.fullmatch(lines[i].lstrip(_WS))
        name = m[1].lower() if m else ""
        if name not in ("syntax", "escape", "check"):
            break
        if name in seen:
            raise DockerfileError(i + 1, f"only one {name} parser directive can be used")
        seen.add(name)
        if name == "escape":
            assert m is not None
            if m[2] not in ("\\", "`"):
                raise DockerfileError(i + 1, f"invalid escape character {m[2]!r} (\\ or `)")
            escape = m[2]
        i += 1
    out: list[_Instruction] = []
    while i < len(lines):
        start, first = i, lines[i].strip(_WS)
        i += 1
        if not first or first.startswith("#"):
            continue
        joined, more = _continued(first, escape)
        shown = [joined.strip(_WS)]
        while more and i < len(lines):
            line = lines[i]
            i += 1
            # Comments and blank lines inside a continued instruction are dropped, as Docker does.
            if not line.strip(_WS) or line.lstrip(_WS).startswith("#"):
                continue
            piece, more = _continued(line, escape)
            joined += piece
            shown.append(piece.strip(_WS))
        parts = _WS_RE.split(joined.strip(_WS), maxsplit=1)
        rest = parts[1] if len(parts) > 1 else ""
        text = " ".join(p for p in shown if p)
        out.append(_Instruction(start + 1, parts[0].upper(), rest, text))
    return escape, out


def _continued(line: str, escape: str) -> tuple[str, bool]:
    """The line without its continuation mark, and whether the next line continues it."""
    trimmed = line.rstrip(" \t")
    if trimmed.endswith(escape):
        return trimmed[:-1], True
    return line, False


# --- words ----------------------------------------------------------------------------------


def _word_end(s: str, i: int, escape: str) -> int:
    """Where the word starting at ``i`` ends: at unquoted whitespace (quotes kept in it)."""
    quote = ""
    while i < len(s):
        c = s[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == escape and quote != "'":
                i += 1
        elif c in _WS:
            break
        elif c in "'\"":
            quote = c
        elif c == escape:
            i += 1
        i += 1
    return min(i, len(s))


def _split_words(s: str, escape: str) -> list[str]:
    """Words split on unquoted whitespace, quotes and escapes left for the lexer (parseWords)."""
    words: list[str] = []
    i = 0
    while True:
        while i < len(s) and s[i] in _WS:
            i += 1
        if i == len(s):
            return words
        end = _word_end(s, i, escape)
        words.append(s[i:end])
        i = end


def _split_flags(rest: str, escape: str) -> tuple[list[str], str]:
    """The leading ``--name[=value]`` words (without ``--``) and the rest; ``--`` ends them."""
    flags: list[str] = []
    i = 0
    while True:
        while i < len(rest) and rest[i] in _WS:
            i += 1
        if not rest.startswith("--", i):
            return flags, rest[i:]
        end = _word_end(rest, i, escape)
        word, i = rest[i:end], end
        if word == "--":
            return flags, rest[i:].lstrip(_WS)
        flags.append(word[2:])


def _json_array(rest: str) -> list[str] | None:
    """The exec form's JSON array of strings, or None for shell form."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None  # not JSON: Docker takes it as shell form
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) for v in value):
        raise _Bad("a JSON array here must hold only strings")
    return value


class _Lexer:
    """Docker's word processing (BuildKit's shell lexer): quotes, escapes, $-substitution."""

    def __init__(self, s: str, env: Mapping[str, str], escape: str) -> None:
        self.s, self.i, self.env, self.escape = s, 0, env, escape

    def word(self, stop: str = "") -> str:
        s, out = self.s, list[str]()
        while self.i < len(s):
            c = s[self.i]
            if c == stop:
                self.i += 1
                return "".join(out)
            if c == "'":
                end = s.find("'", self.i + 1)
                if end < 0:
                    raise _Bad(f"unterminated single quote in {s!r}")
                out.append(s[self.i + 1 : end])
                self.i = end + 1
            elif c == '"':
                out.append(self._double())
            elif c == "$":
                out.append(self._dollar())
            elif c == self.escape:
                out.append(s[self.i + 1 : self.i + 2])  # a trailing escape escapes nothing
                self.i += 2
            else:
                out.append(c)
                self.i += 1
        if stop:
            raise _Bad(f"missing {stop!r} in {s!r}")
        return "".join(out)

    def _double(self) -> str:
        s, out = self.s, list[str]()
        self.i += 1
        while self.i < len(s):
            c = s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "$":
                out.append(self._dollar())
                continue
            # Inside double quotes the escape only escapes ", $ and itself; otherwise it is kept.
            if c == self.escape and s[self.i + 1 : self.i + 2] in ('"', "$", self.escape):
                self.i += 1
                c = s[self.i]
            out.append(c)
            self.i += 1
        raise _Bad(f"unterminated double quote in {s!r}")

    def _name(self) -> str:
        m = _NAME.match(self.s, self.i)
        if not m:
            return ""
        self.i = m.end()
        return m[0]

    def _dollar(self) -> str:
        self.i += 1
        if not self.s.startswith("{", self.i):
            name = self._name()
            return self.env.get(name, "") if name else "$"
        self.i += 1
        if self.s[self.i : self.i + 1] in ("", "{", "}", ":"):
            raise _Bad(f"bad substitution in {self.s!r}")
        name = self._name()
        op = self.s[self.i : self.i + 1]
        self.i += 1
        if not op:
            raise _Bad(f"missing '}}' in {self.s!r}")
        if op == "}":
            return self.env.get(name, "")
        colon = op == ":"
        if colon:
            op = self.s[self.i : self.i + 1]
            self.i += 1
        if op not in ("-", "+", "?"):
            raise _Bad(f"unsupported substitution in {self.s!r} (use ${{V}}, :-, :+ or :?)")
        word = self.word("}")
        value = self.env.get(name)
        if value is None or (colon and not value):
            if op == "?":
                raise _Bad(f"{name}: {word or 'is not set'}")
            return word if op == "-" else ""
        return word if op == "+" else value


# --- instructions ---------------------------------------------------------------------------


@dataclass
class _Building:
    """The stage being parsed: what later instructions in it see."""

    index: int
    name: str | None
    base_stage: int | None
    from_step: From
    env: dict[str, str]
    workdir: str
    shell: tuple[str, ...]
    args: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)


_Handler = Callable[["_Parser", _Instruction, dict[str, str | None], str], None]


class _Parser:
    def __init__(self, escape: str, build_args: Mapping[str, str], bases: Mapping[str, BaseImage]):
        self.escape, self.build_args, self.bases = escape, build_args, bases
        self.global_args = dict(_AUTO_ARGS)
        self.stages: list[_Building] = []
        # (line, reference, stage index) of every FROM / COPY --from taken as an image name:
        # naming a stage defined later is an error, known only once every stage is seen.
        self.image_refs: list[tuple[int, str, int]] = []

    def run(self, instructions: list[_Instruction]) -> tuple[Stage, ...]:
        if not instructions:
            raise DockerfileError(1, "the Dockerfile is empty")
        for ins in instructions:
            try:
                self._one(ins)
            except _Bad as e:
                raise DockerfileError(ins.line, str(e)) from None
        if not self.stages:
            raise DockerfileError(instructions[0].line, "no FROM instruction")
        names = {b.name: b.index for b in self.stages if b.name}
        for line, ref, index in self.image_refs:
            named = names.get(ref.lower())
            if named is not None:
                where = "its own stage" if named == index else "a stage defined later"
                raise DockerfileError(
                    line, f"{ref!r} names {where}; only earlier stages can be used"
                )
        return tuple(
            Stage(b.index, b.name, b.from_step.image, tuple(b.steps), b.base_stage, b.from_step)
            for b in self.stages
        )

    def _one(self, ins: _Instruction) -> None:
        handler = _HANDLERS.get(ins.keyword)
        if handler is None:
            raise _Bad(f"unsupported instruction {ins.keyword}")
        if not self.stages and ins.keyword not in ("ARG", "FROM"):
            raise _Bad(f"{ins.keyword} before the first FROM (only ARG may come before it)")
        raw, rest = _split_flags(ins.rest, self.escape)
        handler(self, ins, self._flags(ins.keyword, raw), rest)

    def _flags(self, keyword: str, raw: list[str]) -> dict[str, str | None]:
        spec, flags = _FLAGS.get(keyword, {}), dict[str, str | None]()
        for flag in raw:
            name, eq, value = flag.partition("=")
            if name in _UNSUPPORTED_FLAGS.get(keyword, ()):
                raise _Bad(f"{keyword} --{name} is unsupported")
            if name not in spec:
                raise _Bad(f"unknown flag --{name} for {keyword}")
            if name in flags:
                raise _Bad(f"--{name} given twice")
            if spec[name] and not eq:
                raise _Bad(f"--{name} needs a value")
            if not spec[name] and eq and value.lower() not in ("true", "false"):
                raise _Bad(f"--{name} takes no value but true or false")
            flags[name] = value if eq else None
        return flags

    # -- state helpers

    @property
    def stage(self) -> _Building:
        return self.stages[-1]

    def _scope(self) -> dict[str, str]:
        if not self.stages:
            return self.global_args
        return self.stage.args | self.stage.env  # ENV wins over ARG of the same name

    def _expand(self, word: str) -> str:
        return _Lexer(word, self._scope(), self.escape).word()

    def _add(self, step: Step) -> None:
        self.stage.steps.append(step)

    def _stage_named(self, ref: str) -> int | None:
        ref = ref.lower()
        return next((b.index for b in self.stages if b.name == ref), None)

    def _command(self, keyword: str, rest: str, heredocs: bool) -> tuple[tuple[str, ...], bool]:
        items = _json_array(rest)
        if items is not None:
            return tuple(items), False
        if heredocs:
            self._no_heredoc(rest)
        if not rest:
            raise _Bad(f"{keyword} needs a command")
        return (*self.stage.shell, rest), True

    def _no_heredoc(self, rest: str) -> None:
        if any(_HEREDOC.fullmatch(w) for w in _split_words(rest, self.escape)):
            raise _Bad("heredocs are not supported")

    def _name_values(self, keyword: str, rest: str) -> tuple[tuple[str, str], ...]:
        words = _split_words(rest, self.escape)
        if not words:
            raise _Bad(f"{keyword} needs NAME=VALUE")
        if "=" not in words[0]:  # legacy `ENV NAME VALUE`: the value is the rest of the line
            parts = _WS_RE.split(rest, maxsplit=1)
            if len(parts) < 2:
                raise _Bad(f"{keyword} {parts[0]} needs a value (NAME=VALUE)")
            raw = [(parts[0], parts[1])]
        else:
            bad = next((w for w in words if "=" not in w), None)
            if bad is not None:
                raise _Bad(f"{keyword} {bad}: expected NAME=VALUE")
            raw = [(k, v) for k, _, v in (w.partition("=") for w in words)]
        # Every pair sees the variables from before the instruction, as in Docker.
        pairs = tuple((self._expand(k), self._expand(v)) for k, v in raw)
        if any(not k for k, _ in pairs):
            raise _Bad(f"{keyword} name is empty")
        return pairs

    # -- one method per instruction

    def _from(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        words = _WS_RE.split(rest) if rest else []
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
            raise _Bad("FROM takes an image and optionally AS name")
        platform = flags.get("platform")
        if platform is not None:
            value = _Lexer(platform, self.global_args, self.escape).word()
            if value.lower() not in _PLATFORMS:
                raise _Bad(f"platform {value!r} is unsupported (only linux/amd64)")
        image = _Lexer(words[0], self.global_args, self.escape).word()
        if not image:
            raise _Bad(f"FROM {words[0]} names no image")
        alias = words[2].lower() if len(words) == 3 else None
        if alias is not None and not _STAGE_NAME.fullmatch(alias):
            raise _Bad(f"invalid stage name {alias!r} (letters, digits, . _ -)")
        if alias is not None and self._stage_named(alias) is not None:
            raise _Bad(f"duplicate stage name {alias!r}")
        index, base_stage = len(self.stages), self._stage_named(image)
        if base_stage is not None:
            earlier = self.stages[base_stage]
            env, workdir, shell = dict(earlier.env), earlier.workdir, earlier.shell
        else:
            self.image_refs.append((ins.line, image, index))
            config = self.bases.get(image, BaseImage())
            env, workdir, shell = dict(config.env), config.workdir, config.shell
        step, workdir = From(ins.line, ins.text, image, alias), _resolve("/", workdir or "/")
        building = _Building(index, alias, base_stage, step, env, workdir, shell or DEFAULT_SHELL)
        self.stages.append(building)

    def _arg(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        words = _split_words(rest, self.escape)
        if not words:
            raise _Bad("ARG needs a name")
        for word in words:
            name, eq, default = word.partition("=")
            if not name:
                raise _Bad(f"ARG {word}: the name is empty")
            value: str | None = None
            if name in self.build_args:
                value = self.build_args[name]
            elif eq:
                value = self._expand(default)
            elif name in self.global_args:  # a bare ARG brings a global one into the stage
                value = self.global_args[name]
            scope = self.stage.args if self.stages else self.global_args
            if value is None:
                scope.pop(name, None)
            else:
                scope[name] = value
            if self.stages:
                self._add(Arg(ins.line, ins.text, name, value))

    def _run(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        command, shell_form = self._command("RUN", rest, heredocs=True)
        if not command:
            raise _Bad("RUN needs a command")
        env = tuple((k, v) for k, v in self.stage.args.items() if k not in self.stage.env)
        self._add(Run(ins.line, ins.text, command, shell_form, env))

    def _cmd(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        self._add(Cmd(ins.line, ins.text, *self._command("CMD", rest, heredocs=False)))

    def _entrypoint(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        command = self._command("ENTRYPOINT", rest, heredocs=False)
        self._add(Entrypoint(ins.line, ins.text, *command))

    def _shell(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        shell = _json_array(rest)
        if not shell:
            raise _Bad('SHELL needs a non-empty JSON array, e.g. ["/bin/bash", "-c"]')
        self.stage.shell = tuple(shell)
        self._add(Shell(ins.line, ins.text, self.stage.shell))

    def _copy(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        add = ins.keyword == "ADD"
        items = _json_array(rest)
        if items is None:
            self._no_heredoc(rest)
            items = _WS_RE.split(rest) if rest else []
        if len(items) < 2:
            raise _Bad(f"{ins.keyword} needs at least one source and a destination")
        paths = [self._expand(p) for p in items]
        if not all(paths):
            raise _Bad(f"{ins.keyword}: a path is empty after substitution")
        remote = next((p for p in paths[:-1] if p.lower().startswith(_REMOTE)), None)
        if remote is not None:
            raise _Bad(f"{ins.keyword} from a URL or git repository is unsupported: {remote}")
        dest = _resolve(self.stage.workdir, paths[-1])
        if paths[-1] == "." or paths[-1].endswith("/"):
            dest = dest.rstrip("/") + "/"
        if len(paths) > 2 and not dest.endswith("/"):
            raise _Bad(f"{ins.keyword} of several sources needs a destination ending in /")
        chown, chmod, source = (
            None if flags.get(k) is None else self._expand(str(flags[k]))
            for k in ("chown", "chmod", "from")
        )
        if chown == "":
            raise _Bad("--chown is empty")
        if chmod is not None and not re.fullmatch(r"[0-7]{1,4}", chmod):
            raise _Bad(f"--chmod={chmod}: expected octal permissions such as 755")
        from_index = None if source is None else self._copy_source(ins.line, source)
        sources = tuple(paths[:-1])
        self._add(Copy(ins.line, ins.text, sources, dest, source, chown, chmod, add, from_index))

    def _copy_source(self, line: int, source: str) -> int | None:
        here = self.stage.index
        if not source:
            raise _Bad("--from is empty")
        if re.fullmatch(r"[0-9]+", source):
            if int(source) >= here:
                raise _Bad(f"--from={source}: stage {int(source)} is not built before this one")
            return int(source)
        index = self._stage_named(source)
        if index == here:
            raise _Bad(f"--from={source} names its own stage; only earlier stages can be used")
        if index is None:
            self.image_refs.append((line, source, here))
        return index

    def _env(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        pairs = self._name_values("ENV", rest)
        self.stage.env.update(pairs)
        self._add(Env(ins.line, ins.text, pairs))

    def _label(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        self._add(Label(ins.line, ins.text, self._name_values("LABEL", rest)))

    def _workdir(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        path = self._expand(rest)
        if not path:
            raise _Bad("WORKDIR needs a path")
        self.stage.workdir = _resolve(self.stage.workdir, path)
        self._add(Workdir(ins.line, ins.text, self.stage.workdir))

    def _user(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        user = self._expand(rest)
        if not user or _WS_RE.search(user):
            raise _Bad("USER takes one user[:group]")
        self._add(User(ins.line, ins.text, user))

    def _expose(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        ports = [p for w in _split_words(rest, self.escape) for p in self._expand(w).split()]
        if not ports:
            raise _Bad("EXPOSE needs a port")
        bad = next((p for p in ports if not _PORT.fullmatch(p)), None)
        if bad is not None:
            raise _Bad(f"EXPOSE {bad}: expected PORT, PORT-PORT, optionally /tcp, /udp or /sctp")
        self._add(Expose(ins.line, ins.text, tuple(ports)))

    def _volume(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        items = _json_array(rest)
        paths = tuple(self._expand(p) for p in (_WS_RE.split(rest) if items is None else items))
        if not paths or not all(paths):
            raise _Bad("VOLUME needs a path")
        self._add(Volume(ins.line, ins.text, paths))

    def _stopsignal(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        sig = self._expand(rest)
        if not _valid_signal(sig):
            raise _Bad(f"STOPSIGNAL {sig!r} is not a signal")
        self._add(StopSignal(ins.line, ins.text, sig))

    def _healthcheck(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        words = _WS_RE.split(rest, maxsplit=1)
        kind, command_text = words[0].upper(), words[1] if len(words) > 1 else ""
        if kind == "NONE":
            if command_text or flags:
                raise _Bad("HEALTHCHECK NONE takes no arguments")
            self._add(Healthcheck(ins.line, ins.text, None))
            return
        if kind != "CMD":
            raise _Bad("HEALTHCHECK needs CMD or NONE")
        command, _ = self._command("HEALTHCHECK CMD", command_text, heredocs=False)
        if not command:
            raise _Bad("HEALTHCHECK CMD needs a command")
        retries = flags.get("retries")
        if retries is not None and not re.fullmatch(r"[0-9]+", retries):
            raise _Bad(f"--retries={retries}: expected a whole number")
        interval, timeout, start_period, start_interval = (
            _duration(flags, name) for name in _HEALTH_DEFAULTS
        )
        retries_n = int(retries or 0) or Healthcheck.retries  # 0 means the default, as in Docker
        self._add(
            Healthcheck(
                ins.line,
                ins.text,
                command,
                interval,
                timeout,
                start_period,
                retries_n,
                start_interval,
            )
        )

    def _maintainer(self, ins: _Instruction, flags: dict[str, str | None], rest: str) -> None:
        """Deprecated and without effect on the image: accepted and dropped."""


_HANDLERS: dict[str, _Handler] = {
    "FROM": _Parser._from,
    "ARG": _Parser._arg,
    "RUN": _Parser._run,
    "CMD": _Parser._cmd,
    "ENTRYPOINT": _Parser._entrypoint,
    "SHELL": _Parser._shell,
    "COPY": _Parser._copy,
    "ADD": _Parser._copy,
    "ENV": _Parser._env,
    "LABEL": _Parser._label,
    "WORKDIR": _Parser._workdir,
    "USER": _Parser._user,
    "EXPOSE": _Parser._expose,
    "VOLUME": _Parser._volume,
    "STOPSIGNAL": _Parser._stopsignal,
    "HEALTHCHECK": _Parser._healthcheck,
    "MAINTAINER": _Parser._maintainer,
}


def _resolve(current: str, path: str) -> str:
    """``path`` made absolute against the current WORKDIR and normalised."""
    return "/" + posixpath.normpath(posixpath.join(current, path)).lstrip("/")


def _duration(flags: dict[str, str | None], name: str) -> float:
    """A Go duration flag (``30s``, ``1m30s``, ``500ms``) in seconds; 0 or absent: default."""
    text, default = flags.get(name), _HEALTH_DEFAULTS[name]
    if text is None or text == "0":
        return default
    if not _DURATION.fullmatch(text):
        raise _Bad(f"--{name}={text}: expected a duration such as 30s, 1m30s or 500ms")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(_DURATION_PART, text))
    if seconds == 0:
        return default
    if seconds < 0.001:
        raise _Bad(f"--{name}={text}: must be at least 1ms")
    return seconds


def _valid_signal(sig: str) -> bool:
    if re.fullmatch(r"[0-9]+", sig):
        return 0 < int(sig) <= 64
    name = sig.upper().removeprefix("SIG")
    return f"SIG{name}" in signal.Signals.__members__ or bool(
        re.fullmatch(r"RTMIN\+[0-9]+|RTMAX-[0-9]+", name)
    )
