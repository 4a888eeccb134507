"""parse() follows Docker's rules and refuses, by line, what corral cannot build."""

from __future__ import annotations

import pytest

from corral.errors import InvalidRequestError
from corral.templates.dockerfile import (
    DEFAULT_SHELL,
    Arg,
    BaseImage,
    Cmd,
    Copy,
    DockerfileError,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Label,
    Run,
    Shell,
    Stage,
    Step,
    StopSignal,
    User,
    Volume,
    Workdir,
    parse,
)


def steps(text: str, build_args: dict[str, str] | None = None) -> tuple[Step, ...]:
    """The steps of the last stage."""
    return parse(text, build_args)[-1].steps


def one(body: str, build_args: dict[str, str] | None = None) -> Step:
    """The single step ``body`` makes after ``FROM img``."""
    (step,) = steps(f"FROM img\n{body}", build_args)
    return step


def error(text: str, build_args: dict[str, str] | None = None) -> DockerfileError:
    with pytest.raises(DockerfileError) as info:
        parse(text, build_args)
    return info.value


def assert_error(text: str, line: int, words: str) -> None:
    e = error(text)
    assert e.line == line
    assert e.message.startswith(f"Dockerfile line {line}: ")
    assert words in e.message


# --- lines, comments, continuations, directives ---------------------------------------------


def test_a_minimal_dockerfile_is_one_stage_without_steps() -> None:
    (stage,) = parse("FROM debian:12\n")
    assert stage == Stage(
        0, None, "debian:12", (), None, From(1, "FROM debian:12", "debian:12", None)
    )


def test_comments_and_blank_lines_are_skipped_but_counted() -> None:
    (step,) = steps("# top\n\nFROM a\n   # indented comment\n\n  RUN true\n")
    assert step.line == 6
    assert step.text == "RUN true"


def test_keywords_are_case_insensitive() -> None:
    (stage,) = parse("from a as B\nrun true\nWorkDir /x\n")
    assert stage.name == "b"
    assert [type(s) for s in stage.steps] == [Run, Workdir]


def test_continuation_keeps_the_first_line_and_joins_like_docker() -> None:
    step = steps("FROM a\nRUN apt-get update && \\\n    apt-get install -y curl\n")[0]
    assert isinstance(step, Run)
    assert step.line == 2
    assert step.command == (*DEFAULT_SHELL, "apt-get update &&     apt-get install -y curl")
    assert step.text == "RUN apt-get update && apt-get install -y curl"


def test_comments_and_blank_lines_inside_a_continuation_are_dropped() -> None:
    step = one("RUN a \\\n# a comment\n\n   b \\   \n  c")
    assert isinstance(step, Run)
    assert step.command[-1] == "a    b   c"
    assert step.text == "RUN a b c"


def test_continuation_at_the_end_of_the_file_is_accepted() -> None:
    step = one("RUN true \\")
    assert isinstance(step, Run)
    assert step.command[-1] == "true"


def test_crlf_and_byte_order_mark() -> None:
    (stage,) = parse("\ufeffFROM a\r\nRUN one \\\r\n two\r\n")
    step = stage.steps[0]
    assert isinstance(step, Run)
    assert step.command[-1] == "one  two"


def test_escape_directive_switches_to_backtick() -> None:
    text = "# escape=`\nFROM a\nCOPY c:\\src \\dst\nRUN dir `\n  x\nENV P=a`$b\n"
    copy, run, env = steps(text)
    assert isinstance(copy, Copy) and isinstance(run, Run) and isinstance(env, Env)
    assert copy.sources == ("c:\\src",)
    assert copy.dest == "/\\dst"  # a Linux path: the backslash is part of the name
    assert run.command[-1] == "dir   x"
    assert env.pairs == (("P", "a$b"),)


def test_directives_after_a_comment_are_plain_comments() -> None:
    step = steps("# hello\n# escape=`\nFROM a\nRUN a \\\n b\n")[0]
    assert isinstance(step, Run)
    assert step.command[-1] == "a  b"


def test_syntax_directive_is_ignored() -> None:
    assert parse("# syntax=docker/dockerfile:1\nFROM a\n")[0].base == "a"


def test_duplicate_directive_is_an_error() -> None:
    assert_error("# escape=\\\n# escape=`\nFROM a\n", 2, "only one escape")


def test_invalid_escape_character_is_an_error() -> None:
    assert_error("# escape=x\nFROM a\n", 1, "invalid escape character")


def test_errors_are_invalid_requests() -> None:
    e = error("")
    assert isinstance(e, InvalidRequestError)
    assert e.status == 400
    assert e.code == "invalid_request"


# --- stages ---------------------------------------------------------------------------------


def test_empty_dockerfile_is_an_error() -> None:
    assert_error("", 1, "empty")
    assert_error("\n# only a comment\n\n", 1, "empty")


def test_only_args_is_an_error() -> None:
    assert_error("\nARG A=1\nARG B\n", 2, "no FROM")


def test_instruction_before_from_is_an_error() -> None:
    assert_error("ARG A=1\n\nRUN true\nFROM a\n", 3, "RUN before the first FROM")


def test_multi_stage_names_and_indices() -> None:
    first, second = parse("FROM golang:1.22 AS Build\nRUN go build\nFROM debian\n")
    assert (first.index, first.name, first.base) == (0, "build", "golang:1.22")
    assert (second.index, second.name, second.base) == (1, None, "debian")
    assert second.from_step.line == 3


def test_from_an_earlier_stage_inherits_env_workdir_and_shell() -> None:
    text = (
        'FROM a AS base\nENV A=1\nWORKDIR /app\nSHELL ["/bin/bash", "-c"]\n'
        "FROM BASE\nWORKDIR sub\nENV B=$A\nRUN x\n"
    )
    _, stage = parse(text)
    assert stage.base == "BASE"
    assert stage.base_stage == 0
    workdir, env, run = stage.steps
    assert workdir == Workdir(6, "WORKDIR sub", "/app/sub")
    assert env == Env(7, "ENV B=$A", (("B", "1"),))
    assert isinstance(run, Run) and run.command == ("/bin/bash", "-c", "x")


def test_from_an_image_has_no_base_stage() -> None:
    assert parse("FROM scratch\n")[0].base_stage is None


def test_from_needs_one_or_three_words() -> None:
    assert_error("FROM\n", 1, "FROM takes an image")
    assert_error("FROM a b\n", 1, "FROM takes an image")
    assert_error("FROM a IS b\n", 1, "FROM takes an image")


def test_from_empty_after_substitution_is_an_error() -> None:
    assert_error("ARG B\nFROM $B\n", 2, "names no image")


def test_duplicate_stage_names_are_an_error() -> None:
    assert_error("FROM a AS x\nRUN true\nFROM b AS X\n", 3, "duplicate stage name 'x'")


def test_invalid_stage_name_is_an_error() -> None:
    assert_error("FROM a AS 1st\n", 1, "invalid stage name")


def test_from_naming_a_later_stage_is_an_error() -> None:
    assert_error("FROM later\nFROM a AS later\n", 1, "defined later")


def test_from_naming_its_own_stage_is_an_error() -> None:
    assert_error("FROM me AS me\n", 1, "its own stage")


def test_from_platform_amd64_is_accepted() -> None:
    text = "FROM --platform=linux/amd64 a\nFROM --platform=$BUILDPLATFORM b\n"
    assert [s.base for s in parse(text)] == ["a", "b"]


def test_from_other_platform_is_an_error() -> None:
    assert_error("FROM a\nFROM --platform=linux/arm64 b\n", 2, "'linux/arm64' is unsupported")


def test_from_unknown_flag_is_an_error() -> None:
    assert_error("FROM --pull a\n", 1, "unknown flag --pull for FROM")


# --- COPY / ADD -----------------------------------------------------------------------------


def test_copy_shell_and_exec_forms() -> None:
    assert one("COPY a b /dst/") == Copy(
        2, "COPY a b /dst/", ("a", "b"), "/dst/", None, None, None, False, None
    )
    step = one('COPY ["a b", "/d e"]')
    assert isinstance(step, Copy)
    assert (step.sources, step.dest) == (("a b",), "/d e")


@pytest.mark.parametrize(
    ("dest", "resolved"),
    [("/abs", "/abs"), ("/abs/", "/abs/"), ("rel", "/app/rel"), ("rel/", "/app/rel/"),
     (".", "/app/"), ("./", "/app/"), ("..", "/"), ("sub/.", "/app/sub")],
)  # fmt: skip
def test_copy_destination_resolves_against_workdir(dest: str, resolved: str) -> None:
    copy = steps(f"FROM a\nWORKDIR /app\nCOPY src {dest}\n")[-1]
    assert isinstance(copy, Copy) and copy.dest == resolved


def test_copy_of_several_sources_needs_a_directory() -> None:
    assert_error("FROM a\nCOPY a b /dst\n", 2, "needs a destination ending in /")
    copy = steps("FROM a\nWORKDIR /w\nCOPY a b .\n")[-1]
    assert isinstance(copy, Copy) and copy.dest == "/w/"


def test_copy_flags() -> None:
    step = one("COPY --chown=1000:1000 --chmod=0755 --link src /dst")
    assert isinstance(step, Copy)
    assert (step.chown, step.chmod, step.from_stage) == ("1000:1000", "0755", None)


def test_copy_flags_are_substituted() -> None:
    copy = steps("FROM img\nARG U=app\nCOPY --chown=$U:$U --from=$U a b", {"U": "web"})[-1]
    assert isinstance(copy, Copy)
    assert (copy.chown, copy.from_stage) == ("web:web", "web")


def test_copy_from_earlier_stage_by_name_and_index() -> None:
    text = "FROM a AS build\nFROM b\nCOPY --from=Build /x /y\nCOPY --from=0 /x /y\n"
    by_name, by_index = parse(text)[1].steps
    assert isinstance(by_name, Copy) and isinstance(by_index, Copy)
    assert (by_name.from_stage, by_name.from_index) == ("Build", 0)
    assert (by_index.from_stage, by_index.from_index) == ("0", 0)


def test_copy_from_an_image() -> None:
    step = one("COPY --from=busybox:1.36 /bin/busybox /bin/")
    assert isinstance(step, Copy)
    assert (step.from_stage, step.from_index) == ("busybox:1.36", None)


def test_copy_from_a_later_stage_is_an_error() -> None:
    assert_error("FROM a\nCOPY --from=later /x /y\nFROM b AS later\n", 2, "defined later")
    assert_error("FROM a\nCOPY --from=1 /x /y\nFROM b\n", 2, "not built before")


def test_copy_from_its_own_stage_is_an_error() -> None:
    assert_error("FROM a AS me\nRUN x\nCOPY --from=me /x /y\n", 3, "its own stage")
    assert_error("FROM a\nCOPY --from=0 /x /y\n", 2, "not built before")


def test_copy_needs_a_source_and_a_destination() -> None:
    assert_error("FROM a\nCOPY onlyone\n", 2, "needs at least one source")
    assert_error('FROM a\nCOPY ["onlyone"]\n', 2, "needs at least one source")


def test_copy_empty_path_after_substitution_is_an_error() -> None:
    assert_error("FROM a\nCOPY $NOPE /x\n", 2, "empty after substitution")


def test_copy_flag_errors() -> None:
    assert_error("FROM a\nCOPY --chmod=u+x a b\n", 2, "octal")
    assert_error("FROM a\nCOPY --from a b\n", 2, "--from needs a value")
    assert_error("FROM a\nCOPY --chown=1 --chown=2 a b\n", 2, "--chown given twice")
    assert_error("FROM a\nCOPY --link=maybe a b\n", 2, "--link takes no value")
    assert_error("FROM a\nCOPY --parents a b\n", 2, "COPY --parents is unsupported")
    assert_error("FROM a\nCOPY --bogus a b\n", 2, "unknown flag --bogus for COPY")


def test_add_is_a_copy_with_add_set() -> None:
    step = one("ADD --chown=1 --chmod=644 app.tar.gz /opt/")
    assert step == Copy(
        2,
        "ADD --chown=1 --chmod=644 app.tar.gz /opt/",
        ("app.tar.gz",),
        "/opt/",
        None,
        "1",
        "644",
        True,
        None,
    )


@pytest.mark.parametrize(
    "source",
    ["https://example.com/x.tgz", "http://x/y", "git@github.com:a/b.git", "git://host/r"],
)
def test_add_of_a_url_or_git_is_unsupported(source: str) -> None:
    assert_error(f"FROM a\nADD {source} /x\n", 2, "unsupported")


def test_copy_of_a_url_is_an_error() -> None:
    assert_error("FROM a\nCOPY https://example.com/x /x\n", 2, "COPY from a URL")


def test_add_from_is_an_unknown_flag() -> None:
    assert_error("FROM a\nADD --from=a x y\n", 2, "unknown flag --from for ADD")


# --- RUN / CMD / ENTRYPOINT / SHELL ---------------------------------------------------------


def test_run_shell_form_uses_default_shell_and_is_not_substituted() -> None:
    step = one("RUN echo $HOME ${X:-y} 'q'")
    assert step == Run(
        2, "RUN echo $HOME ${X:-y} 'q'", (*DEFAULT_SHELL, "echo $HOME ${X:-y} 'q'"), True, ()
    )


def test_run_exec_form() -> None:
    step = one('RUN ["echo", "$HOME"]')
    assert isinstance(step, Run)
    assert (step.command, step.shell_form) == (("echo", "$HOME"), False)


def test_invalid_json_is_shell_form() -> None:
    step = one('RUN ["echo", oops]')
    assert isinstance(step, Run)
    assert step.command == (*DEFAULT_SHELL, '["echo", oops]')


def test_json_array_of_non_strings_is_an_error() -> None:
    assert_error("FROM a\nCMD [1, 2]\n", 2, "only strings")


def test_run_needs_a_command() -> None:
    assert_error("FROM a\nRUN\n", 2, "RUN needs a command")
    assert_error("FROM a\nRUN []\n", 2, "RUN needs a command")


@pytest.mark.parametrize(
    "flag", ["mount=type=cache,target=/x", "network=host", "security=insecure"]
)
def test_run_flags_are_unsupported_by_name(flag: str) -> None:
    name = flag.split("=")[0]
    assert_error(f"FROM a\nRUN --{flag} make\n", 2, f"RUN --{name} is unsupported")


def test_run_unknown_flag_is_an_error() -> None:
    assert_error("FROM a\nRUN --frobnicate make\n", 2, "unknown flag --frobnicate")


def test_shell_changes_later_shell_forms() -> None:
    text = (
        'FROM a\nRUN one\nSHELL ["/bin/bash", "-eu", "-c"]\nRUN two\nCMD three\nENTRYPOINT four\n'
    )
    run1, shell, run2, cmd, entrypoint = steps(text)
    assert isinstance(run1, Run) and run1.command == ("/bin/sh", "-c", "one")
    assert shell == Shell(3, 'SHELL ["/bin/bash", "-eu", "-c"]', ("/bin/bash", "-eu", "-c"))
    assert isinstance(run2, Run) and run2.command == ("/bin/bash", "-eu", "-c", "two")
    assert cmd == Cmd(5, "CMD three", ("/bin/bash", "-eu", "-c", "three"), True)
    assert entrypoint == Entrypoint(6, "ENTRYPOINT four", ("/bin/bash", "-eu", "-c", "four"), True)


def test_shell_needs_a_json_array() -> None:
    assert_error("FROM a\nSHELL /bin/bash -c\n", 2, "JSON array")
    assert_error("FROM a\nSHELL []\n", 2, "JSON array")


def test_cmd_and_entrypoint_exec_forms_may_be_empty() -> None:
    assert one("CMD []") == Cmd(2, "CMD []", (), False)
    assert one('ENTRYPOINT ["tini", "--"]') == Entrypoint(
        2, 'ENTRYPOINT ["tini", "--"]', ("tini", "--"), False
    )


def test_cmd_needs_a_command() -> None:
    assert_error("FROM a\nCMD\n", 2, "CMD needs a command")


@pytest.mark.parametrize(
    "body",
    ["RUN cat <<EOF > /x", "RUN <<-EOT bash", "COPY <<EOF /x", 'ADD <<"EOF" /x', "RUN 3<<END x"],
)
def test_heredocs_are_unsupported(body: str) -> None:
    assert_error(f"FROM a\n{body}\nhello\nEOF\n", 2, "heredocs are not supported")


@pytest.mark.parametrize(
    "body", ['RUN cat <<< "hi"', "RUN echo $((1 << 2))", 'RUN ["sh", "-c", "cat <<EOF"]']
)
def test_not_heredocs(body: str) -> None:
    assert isinstance(one(body), Run)


# --- ENV / LABEL / ARG and substitution -----------------------------------------------------


def test_env_forms_and_quoting() -> None:
    step = one('ENV A=1 B="two words" C=three\\ words D=\'$A\' E="$A"')
    assert step == Env(
        2,
        'ENV A=1 B="two words" C=three\\ words D=\'$A\' E="$A"',
        (("A", "1"), ("B", "two words"), ("C", "three words"), ("D", "$A"), ("E", "")),
    )


def test_env_legacy_form_takes_the_rest_of_the_line() -> None:
    step = one('ENV GREETING hello "big" world')
    assert isinstance(step, Env)
    assert step.pairs == (("GREETING", "hello big world"),)


def test_env_sees_the_previous_instruction_not_its_own() -> None:
    env1, env2 = steps("FROM a\nENV A=1 B=$A\nENV C=$A\n")
    assert isinstance(env1, Env) and isinstance(env2, Env)
    assert env1.pairs == (("A", "1"), ("B", ""))
    assert env2.pairs == (("C", "1"),)


def test_env_errors() -> None:
    assert_error("FROM a\nENV\n", 2, "ENV needs NAME=VALUE")
    assert_error("FROM a\nENV ONLY\n", 2, "needs a value")
    assert_error("FROM a\nENV A=1 B\n", 2, "expected NAME=VALUE")
    assert_error("FROM a\nENV =x\n", 2, "name is empty")


def test_label_pairs_and_legacy_form() -> None:
    assert one('LABEL a=1 "b c"="d e"') == Label(
        2, 'LABEL a=1 "b c"="d e"', (("a", "1"), ("b c", "d e"))
    )
    step = one("LABEL maintainer someone@example.com")
    assert isinstance(step, Label)
    assert step.pairs == (("maintainer", "someone@example.com"),)


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("$SET", "x"),
        ("${SET}", "x"),
        ("pre${SET}post", "prexpost"),
        ("$SET_more", ""),
        ("${SET}_more", "x_more"),
        ("${UNSET:-dflt}", "dflt"),
        ("${EMPTY:-dflt}", "dflt"),
        ("${EMPTY-dflt}", ""),
        ("${UNSET-dflt}", "dflt"),
        ("${SET:-dflt}", "x"),
        ("${SET:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET:+alt}", ""),
        ("${UNSET:-$SET}", "x"),
        ("\\$SET", "$SET"),
        ("'$SET'", "$SET"),
        ('"$SET"', "x"),
        ('"\\$SET"', "$SET"),
        ('"a\\b"', "a\\b"),
        ("$", "$"),
        ("a$", "a$"),
        ("$1", ""),
        ("${SET:?must_be_set}", "x"),
    ],
)
def test_substitution(word: str, value: str) -> None:
    label = steps(f"FROM a\nENV SET=x EMPTY=\nLABEL v={word}\n")[-1]
    assert label == Label(3, f"LABEL v={word}", (("v", value),))


@pytest.mark.parametrize(
    ("word", "words"),
    [
        ("${UNSET:?is required}", "UNSET: is required"),
        ("${UNSET?}", "UNSET: is not set"),
        ("${SET#x}", "unsupported substitution"),
        ("${SET/x/y}", "unsupported substitution"),
        ("${SET", "missing '}'"),
        ("${}", "bad substitution"),
        ("'open", "unterminated single quote"),
        ('"open', "unterminated double quote"),
    ],
)
def test_substitution_errors(word: str, words: str) -> None:
    assert_error(f"FROM a\nENV SET=x\nWORKDIR {word}\n", 3, words)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "COPY $V/src /$V",
            Copy(3, "COPY $V/src /$V", ("v/src",), "/v", None, None, None, False, None),
        ),
        ("ENV X=$V", Env(3, "ENV X=$V", (("X", "v"),))),
        ("EXPOSE $V", None),
        ("LABEL $V=$V", Label(3, "LABEL $V=$V", (("v", "v"),))),
        ("USER $V", User(3, "USER $V", "v")),
        ("VOLUME /$V", Volume(3, "VOLUME /$V", ("/v",))),
        ("WORKDIR /$V", Workdir(3, "WORKDIR /$V", "/v")),
        ("ARG X=$V", Arg(3, "ARG X=$V", "X", "v")),
        ("CMD echo $V", Cmd(3, "CMD echo $V", (*DEFAULT_SHELL, "echo $V"), True)),
        ('ENTRYPOINT ["$V"]', Entrypoint(3, 'ENTRYPOINT ["$V"]', ("$V",), False)),
    ],
)
def test_which_instructions_substitute(body: str, expected: Step | None) -> None:
    if expected is None:
        expose = steps(f"FROM a\nARG P=8080\n{body.replace('$V', '$P')}\n")[-1]
        assert isinstance(expose, Expose) and expose.ports == ("8080",)
        return
    assert steps(f"FROM a\nARG V=v\n{body}\n")[-1] == expected


def test_stopsignal_is_substituted() -> None:
    step = steps("FROM a\nARG S=SIGINT\nSTOPSIGNAL $S\n")[-1]
    assert step == StopSignal(3, "STOPSIGNAL $S", "SIGINT")


def test_healthcheck_command_is_not_substituted() -> None:
    step = steps("FROM a\nARG V=v\nHEALTHCHECK CMD curl $V\n")[-1]
    assert isinstance(step, Healthcheck)
    assert step.command == (*DEFAULT_SHELL, "curl $V")


def test_global_arg_is_used_in_from() -> None:
    (stage,) = parse("ARG TAG=12\nFROM debian:${TAG}\n")
    assert stage.base == "debian:12"
    assert stage.from_step.image == "debian:12"


def test_build_args_override_a_global_default() -> None:
    assert parse("ARG TAG=12\nFROM debian:$TAG\n", {"TAG": "13"})[0].base == "debian:13"


def test_global_arg_is_not_visible_in_a_stage_until_redeclared() -> None:
    text = "ARG V=g\nFROM a\nENV BEFORE=$V\nARG V\nENV AFTER=$V\n"
    before, arg, after = steps(text)
    assert before == Env(3, "ENV BEFORE=$V", (("BEFORE", ""),))
    assert arg == Arg(4, "ARG V", "V", "g")
    assert after == Env(5, "ENV AFTER=$V", (("AFTER", "g"),))


def test_stage_arg_default_and_build_arg_override() -> None:
    assert one("ARG V=dflt") == Arg(2, "ARG V=dflt", "V", "dflt")
    assert one("ARG V=dflt", {"V": "given"}) == Arg(2, "ARG V=dflt", "V", "given")
    assert one("ARG V", {"V": "given"}) == Arg(2, "ARG V", "V", "given")


def test_stage_arg_default_wins_over_the_global_default() -> None:
    step = steps("ARG V=global\nFROM a\nARG V=stage\n")[0]
    assert step == Arg(3, "ARG V=stage", "V", "stage")


def test_arg_without_value_is_unset() -> None:
    arg, run = steps("FROM a\nARG V\nRUN x\n")
    assert arg == Arg(2, "ARG V", "V", None)
    assert isinstance(run, Run) and run.env == ()


def test_several_args_on_one_line() -> None:
    a, b = steps("FROM a\nARG A=1 B=$A\n")
    assert a == Arg(2, "ARG A=1 B=$A", "A", "1")
    assert b == Arg(2, "ARG A=1 B=$A", "B", "1")


def test_args_are_the_run_environment_unless_env_shadows_them() -> None:
    text = "FROM a\nARG A=1\nARG B=2\nENV B=env\nRUN x\n"
    run = steps(text, {"A": "one"})[-1]
    assert isinstance(run, Run)
    assert run.env == (("A", "one"),)


def test_env_wins_over_arg_for_substitution() -> None:
    env = steps("FROM a\nENV V=env\nARG V=arg\nENV W=$V\n")[-1]
    assert env == Env(4, "ENV W=$V", (("W", "env"),))


def test_args_do_not_cross_stages() -> None:
    text = "FROM a\nARG V=1\nFROM b\nRUN x\nENV W=${V:-none}\n"
    run, env = parse(text)[1].steps
    assert isinstance(run, Run) and run.env == ()
    assert env == Env(5, "ENV W=${V:-none}", (("W", "none"),))


def test_from_sees_only_global_args() -> None:
    text = "ARG IMG=a\nFROM $IMG\nARG IMG=b\nENV IMG=c\nFROM $IMG\n"
    assert [s.base for s in parse(text)] == ["a", "a"]


def test_platform_args_are_predefined() -> None:
    text = "FROM img-$TARGETARCH\nARG TARGETARCH\nARG TARGETPLATFORM\nRUN x\n"
    (stage,) = parse(text)
    assert stage.base == "img-amd64"
    run = stage.steps[-1]
    assert isinstance(run, Run)
    assert run.env == (("TARGETARCH", "amd64"), ("TARGETPLATFORM", "linux/amd64"))


def test_arg_needs_a_name() -> None:
    assert_error("FROM a\nARG\n", 2, "ARG needs a name")
    assert_error("FROM a\nARG =x\n", 2, "name is empty")


def test_base_image_config_feeds_substitution_and_workdir() -> None:
    base = BaseImage(env=(("PATH", "/usr/bin:/bin"),), workdir="/srv")
    text = "FROM py\nENV PATH=/venv/bin:$PATH\nWORKDIR app\nRUN x\nFROM other\nENV P=$PATH\n"
    first, second = parse(text, bases={"py": base})
    env, workdir, _ = first.steps
    assert env == Env(2, "ENV PATH=/venv/bin:$PATH", (("PATH", "/venv/bin:/usr/bin:/bin"),))
    assert workdir == Workdir(3, "WORKDIR app", "/srv/app")
    assert second.steps == (Env(6, "ENV P=$PATH", (("P", ""),)),)


def test_base_image_shell_is_used() -> None:
    (stage,) = parse("FROM b\nRUN x\n", bases={"b": BaseImage(shell=("/bin/ash", "-c"))})
    run = stage.steps[0]
    assert isinstance(run, Run) and run.command == ("/bin/ash", "-c", "x")


# --- WORKDIR / USER / EXPOSE / VOLUME / STOPSIGNAL / HEALTHCHECK ----------------------------


def test_workdir_resolution() -> None:
    paths = [
        s.path
        for s in steps("FROM a\nWORKDIR rel\nWORKDIR ../up/./x/\nWORKDIR /abs//y\nWORKDIR ..\n")
        if isinstance(s, Workdir)
    ]
    assert paths == ["/rel", "/up/x", "/abs/y", "/abs"]


def test_workdir_with_spaces_is_one_path() -> None:
    assert one("WORKDIR /my dir") == Workdir(2, "WORKDIR /my dir", "/my dir")


def test_workdir_needs_a_path() -> None:
    assert_error("FROM a\nWORKDIR\n", 2, "WORKDIR needs a path")


def test_user() -> None:
    assert one("USER app:app") == User(2, "USER app:app", "app:app")
    assert_error("FROM a\nUSER\n", 2, "USER takes one")
    assert_error("FROM a\nUSER a b\n", 2, "USER takes one")


def test_expose() -> None:
    step = one("EXPOSE 80 443/udp 8000-8010/TCP")
    assert step == Expose(2, "EXPOSE 80 443/udp 8000-8010/TCP", ("80", "443/udp", "8000-8010/TCP"))
    assert_error("FROM a\nEXPOSE\n", 2, "EXPOSE needs a port")
    assert_error("FROM a\nEXPOSE http\n", 2, "EXPOSE http")


def test_volume_forms() -> None:
    assert one("VOLUME /a /b") == Volume(2, "VOLUME /a /b", ("/a", "/b"))
    assert one('VOLUME ["/a b"]') == Volume(2, 'VOLUME ["/a b"]', ("/a b",))
    assert_error("FROM a\nVOLUME\n", 2, "VOLUME needs a path")
    assert_error("FROM a\nVOLUME []\n", 2, "VOLUME needs a path")


@pytest.mark.parametrize("sig", ["SIGTERM", "sigint", "QUIT", "9", "SIGRTMIN+3"])
def test_stopsignal_valid(sig: str) -> None:
    assert one(f"STOPSIGNAL {sig}") == StopSignal(2, f"STOPSIGNAL {sig}", sig)


@pytest.mark.parametrize("sig", ["", "SIGNOPE", "0", "99"])
def test_stopsignal_invalid(sig: str) -> None:
    assert_error(f"FROM a\nSTOPSIGNAL {sig}\n", 2, "is not a signal")


def test_healthcheck_defaults_and_exec_form() -> None:
    step = one('HEALTHCHECK CMD ["curl", "-f", "localhost"]')
    assert step == Healthcheck(
        2,
        'HEALTHCHECK CMD ["curl", "-f", "localhost"]',
        ("curl", "-f", "localhost"),
        30.0,
        30.0,
        0.0,
        3,
        5.0,
    )


def test_healthcheck_flags_and_shell_form() -> None:
    text = (
        'FROM a\nSHELL ["/bin/bash", "-c"]\nHEALTHCHECK --interval=1m30s --timeout=500ms '
        "--start-period=2s --start-interval=1.5s --retries=5 \\\n  cmd curl -sf localhost\n"
    )
    step = steps(text)[-1]
    assert isinstance(step, Healthcheck)
    assert step.line == 3
    assert step.command == ("/bin/bash", "-c", "curl -sf localhost")
    assert (step.interval, step.timeout, step.start_period) == (90.0, 0.5, 2.0)
    assert (step.retries, step.start_interval) == (5, 1.5)


def test_healthcheck_zero_means_default() -> None:
    step = one("HEALTHCHECK --interval=0 --retries=0 CMD x")
    assert isinstance(step, Healthcheck)
    assert (step.interval, step.retries) == (30.0, 3)


def test_healthcheck_none() -> None:
    assert one("HEALTHCHECK NONE") == Healthcheck(2, "HEALTHCHECK NONE", None)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("HEALTHCHECK", "needs CMD or NONE"),
        ("HEALTHCHECK PING x", "needs CMD or NONE"),
        ("HEALTHCHECK NONE x", "takes no arguments"),
        ("HEALTHCHECK --retries=2 NONE", "takes no arguments"),
        ("HEALTHCHECK CMD", "needs a command"),
        ("HEALTHCHECK --interval=30 CMD x", "expected a duration"),
        ("HEALTHCHECK --interval=-5s CMD x", "expected a duration"),
        ("HEALTHCHECK --timeout=10ns CMD x", "at least 1ms"),
        ("HEALTHCHECK --retries=-1 CMD x", "whole number"),
        ("HEALTHCHECK --port=1 CMD x", "unknown flag --port"),
    ],
)
def test_healthcheck_errors(body: str, words: str) -> None:
    assert_error(f"FROM a\n{body}\n", 2, words)


# --- unsupported and misplaced instructions -------------------------------------------------


def test_maintainer_is_ignored() -> None:
    assert steps("FROM a\nMAINTAINER someone <a@b.c>\nRUN x\n")[0].line == 3


def test_onbuild_is_unsupported() -> None:
    assert_error("FROM a\nRUN x\nONBUILD RUN make\n", 3, "unsupported instruction ONBUILD")


def test_unknown_instruction_is_unsupported() -> None:
    assert_error("FROM a\nFETCH x\n", 2, "unsupported instruction FETCH")


def test_unknown_flag_on_an_instruction_without_flags() -> None:
    assert_error("FROM a\nENV --x=1 A=b\n", 2, "unknown flag --x for ENV")


def test_errors_on_continued_lines_name_the_first_line() -> None:
    assert_error("FROM a\nRUN true\nCOPY \\\n  only \\\n  \n", 3, "needs at least one source")
    assert_error("FROM a\nRUN \\\n  --mount=type=cache,target=/x \\\n  make\n", 2, "--mount")


def test_steps_are_immutable() -> None:
    step = one("RUN x")
    with pytest.raises(AttributeError):
        step.line = 5  # type: ignore[misc]


def test_a_realistic_multi_stage_dockerfile() -> None:
    text = """\
# syntax=docker/dockerfile:1
ARG PY=3.12

FROM python:${PY}-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR 1
COPY requirements.txt .
RUN python -m venv /venv && \\
    /venv/bin/pip install -r requirements.txt
COPY . .

FROM python:${PY}-slim
LABEL org.opencontainers.image.source="https://example.com/app"
ENV PATH=/venv/bin:$PATH
COPY --from=build /venv /venv
COPY --from=build --chown=1000:1000 /src /app
WORKDIR /app
USER 1000
EXPOSE 8000
HEALTHCHECK --interval=10s CMD curl -sf localhost:8000/health
CMD ["python", "-m", "app"]
"""
    base = BaseImage(env=(("PATH", "/usr/local/bin:/usr/bin:/bin"),))
    build, final = parse(text, {"PY": "3.11"}, bases={"python:3.11-slim": base})
    assert (build.name, build.base, final.base) == ("build", "python:3.11-slim", "python:3.11-slim")
    assert [type(s).__name__ for s in build.steps] == ["Workdir", "Env", "Copy", "Run", "Copy"]
    copy_reqs, run = build.steps[2], build.steps[3]
    assert isinstance(copy_reqs, Copy) and copy_reqs.dest == "/src/"
    assert isinstance(run, Run) and run.line == 8
    assert final.steps[1] == Env(
        14, "ENV PATH=/venv/bin:$PATH", (("PATH", "/venv/bin:/usr/local/bin:/usr/bin:/bin"),)
    )
    copy_app = final.steps[3]
    assert isinstance(copy_app, Copy)
    assert (copy_app.from_index, copy_app.chown, copy_app.dest) == (0, "1000:1000", "/app")
    health, cmd = final.steps[-2:]
    assert isinstance(health, Healthcheck) and health.interval == 10.0
    assert cmd == Cmd(21, 'CMD ["python", "-m", "app"]', ("python", "-m", "app"), False)
