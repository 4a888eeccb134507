"""`corral run`'s own parser: flags become Flags, usage errors exit 2 with one line, and the executable reaches it without importing the CLI framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral.local import cli, jail
from corral.local.settings import Flags


def test_flags_and_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Flags, list[str], bool, bool]] = []

    def fake_run(flags: Flags, cmd: list[str], *, as_root: bool, verbose: bool) -> int:
        seen.append((flags, cmd, as_root, verbose))
        return 7

    monkeypatch.setattr(jail, "run_local", fake_run)
    argv = [
        "--profile", "claude-code", "--allow-domain", "a.example", "--allow-domain", "b.example",
        "--allow-write", "/w", "--deny-read", "/d", "--allow-read", "/r",
        "--secret", "K:a.example", "--trust-project", "--as-root", "-v",
        "--", "sh", "-c", "exit 3", "--not-an-option",
    ]  # fmt: skip
    assert cli.main(argv) == 7
    flags, cmd, as_root, verbose = seen[0]
    assert cmd == ["sh", "-c", "exit 3", "--not-an-option"]
    assert flags == Flags(
        profile="claude-code",
        allow_domains=["a.example", "b.example"],
        allow_write=["/w"],
        allow_read=["/r"],
        deny_read=["/d"],
        secrets=["K:a.example"],
        trust_project=True,
    )
    assert as_root and verbose
    # Without "--" the first word that is not an option starts the command.
    assert cli.main(["ls", "-la"]) == 7 and seen[1][1] == ["ls", "-la"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ([], "no command given"),
        (["--"], "no command given"),
        (["--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["--allow-domain"], "expected one argument"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: corral run [OPTIONS] -- CMD [ARGS...]")
    for flag in ("--allow-domain", "--secret", "--trust-project", "--as-root", "--verbose"):
        assert flag in out


def test_the_executable_skips_the_cli_framework() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['corral', 'run', '--help']\n"
        "from corral.cli.entry import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('typer', 'click', 'corral.cli.main') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
