"""``corral run``'s command line (docs/local.md).

Parsed with argparse, not the CLI framework the rest of ``corral`` uses: local mode starts on
every agent launch, and typer's import and parsing cost about 0.2 s of a 0.4 s start-up.
``corral/cli/entry.py`` sends ``corral run ...`` here before anything else is imported; the full
CLI's ``run`` command hands its arguments here too, so there is one parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from corral.cli._exit import exit_status, say_error
from corral.errors import InvalidRequestError

__all__ = ["main", "parser"]

DESCRIPTION = """\
Run a command on this machine in a sandbox (docs/local.md).

The project (the git checkout around here) is writable, the rest read-only. Credentials are
hidden; rc files, git hooks and agent settings stay read-only, and cannot be created either.
API keys bound as secrets stay outside (the command holds placeholders). No network but the
allowed domains. Exits with the command's exit code."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InvalidRequestError(f"{message} (see 'corral run --help')")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="corral run",
        usage="corral run [OPTIONS] -- CMD [ARGS...]",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", help="settings profile (built in: claude-code, codex)")
    for flag, metavar, text in (
        (
            "--allow-domain",
            "DOMAIN",
            "let the command reach this domain through corral's proxy (name, *.suffix, either "
            "with :PORT)",
        ),
        ("--allow-write", "PATH", "also make this path writable"),
        ("--deny-read", "PATH", "also hide this path"),
        ("--allow-read", "PATH", "show a path a default hides (a .env file outside the project)"),
        (
            "--secret",
            "ENV:HOST[,HOST]",
            "keep the value of the variable ENV outside: the command gets a placeholder, and "
            "corral's proxy puts the value into HTTPS requests to HOST (which must be allowed)",
        ),
    ):
        p.add_argument(
            flag, metavar=metavar, action="append", default=[], help=f"{text}; repeatable"
        )
    p.add_argument(
        "--trust-project",
        action="store_true",
        help="apply what the project's .corral/local.toml widens (domains, writable paths, "
        "variables, secrets); without it only its restrictions apply",
    )
    p.add_argument(
        "--as-root",
        action="store_true",
        help="run as root, keep root inside (without capabilities) instead of dropping to the "
        "invoking user",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the plan, every refusal and network decision as it happens; also report "
        "reads of hidden paths (every open then goes through the guard)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return p


def main(argv: Sequence[str]) -> int:
    """``corral run ARGV...``: the command's exit status, or corral's (2: bad usage, 1: the
    sandbox could not be set up)."""
    try:
        ns = parser().parse_args(list(argv))
        cmd = list(ns.cmd)
        if cmd[:1] == ["--"]:
            cmd = cmd[1:]
        if not cmd:
            raise InvalidRequestError("no command given: corral run [OPTIONS] -- CMD [ARGS...]")
        # Imported after parsing: `corral run --help` and usage errors stay instant.
        from corral.local.jail import run_local
        from corral.local.settings import Flags

        flags = Flags(
            profile=ns.profile,
            allow_domains=ns.allow_domain,
            allow_write=ns.allow_write,
            allow_read=ns.allow_read,
            deny_read=ns.deny_read,
            secrets=ns.secret,
            trust_project=ns.trust_project,
        )
        return run_local(flags, cmd, as_root=ns.as_root, verbose=ns.verbose)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:
        code = exit_status(exc)
        if code is None:
            say_error(f"unexpected {type(exc).__name__}: {exc}")
            return 1
        return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
