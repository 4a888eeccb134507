"""Request commands refuse unknown fields, empty commands and paths that are not absolute."""

import pydantic
import pytest

from corral.core.commands import CreateSandbox, ExecCommand, MkdirCommand, RenameCommand


def test_unknown_field_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        CreateSandbox.model_validate({"template": "base", "gpu": 1})


@pytest.mark.parametrize(
    "field,value", [("cpu", 0), ("memory_mb", -1), ("disk_mb", 0), ("timeout", 0)]
)
def test_non_positive_resources_are_refused(field: str, value: int) -> None:
    with pytest.raises(pydantic.ValidationError):
        CreateSandbox.model_validate({field: value})


def test_shell_string_and_argv() -> None:
    assert ExecCommand(cmd="echo hi").argv() == ["/bin/sh", "-c", "echo hi"]
    assert ExecCommand(cmd=["/bin/echo", "hi"]).argv() == ["/bin/echo", "hi"]


@pytest.mark.parametrize("cmd", ["", "   ", [], ["a\0b"]])
def test_empty_or_nul_commands_are_refused(cmd: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        ExecCommand.model_validate({"cmd": cmd})


@pytest.mark.parametrize("path", ["relative/x", "", "/a\0b", "/" + "x" * 5000])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        MkdirCommand(path=path)
    with pytest.raises(pydantic.ValidationError):
        RenameCommand(src="/ok", dst=path)
    with pytest.raises(pydantic.ValidationError):
        ExecCommand(cmd="true", cwd=path)
