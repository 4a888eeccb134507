"""``corral secret set|ls|get|rm`` end to end, a real binary against a real server: the value (as an argument or on stdin) is never printed by any command, ``ls``/``get`` show names and times (text and ``--json``), ``rm`` deletes, and bad names, unknown secrets and bad ``--secret`` syntax are one ``error:`` line with exit 2, 1 and 2."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from tests.integration.cli_harness import corral, corral_text, one_error

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def name(env: dict[str, str]) -> Iterator[str]:
    """A secret name of this test's own; the secret is deleted afterwards."""
    n = "cli-" + secrets.token_hex(4)
    yield n
    corral(env, "secret", "rm", n, check=False)


def _value() -> str:
    return "sk-cli-" + secrets.token_hex(16)


def _never_printed(value: str, *procs: subprocess.CompletedProcess[str]) -> None:
    for p in procs:
        assert value not in p.stdout and value not in p.stderr, p.args


def test_set_ls_get_rm(env: dict[str, str], name: str) -> None:
    first, second = _value(), _value()
    set1 = corral_text(env, "secret", "set", name, first)
    assert (set1.stdout, set1.stderr) == (f"secret {name} set\n", "")
    piped = corral(env, "secret", "set", name, "--json", input=(second + "\n").encode())
    shown = json.loads(piped.stdout)
    assert set(shown) == {"name", "created_at", "updated_at"} and shown["name"] == name
    assert shown["updated_at"] > shown["created_at"]
    assert second.encode() not in piped.stdout + piped.stderr

    env_wide = {**env, "COLUMNS": "250"}
    ls = corral_text(env_wide, "secret", "ls")
    rows = [line.split() for line in ls.stdout.splitlines()]
    assert rows[0] == ["NAME", "CREATED", "UPDATED"]
    assert name in [r[0] for r in rows[1:]]
    ls_json = json.loads(corral_text(env, "secret", "ls", "--json").stdout)
    (mine,) = [s for s in ls_json if s["name"] == name]
    assert mine == shown

    get = corral_text(env, "secret", "get", name)
    assert get.stdout.splitlines()[0] == f"name: {name}"
    get_json = corral_text(env, "secret", "get", name, "--json")
    assert json.loads(get_json.stdout) == shown
    _never_printed(first, set1, ls, get, get_json)
    _never_printed(second, ls, get, get_json)

    rm = corral_text(env, "secret", "rm", name)
    assert rm.returncode == 0
    gone = corral_text(env, "secret", "get", name, check=False)
    assert f"no secret named '{name}'" in one_error(gone, 1)
    again = corral_text(env, "secret", "rm", name, check=False)
    assert "no secret named" in one_error(again, 1)


def test_the_value_must_be_valid_and_is_not_echoed(env: dict[str, str], name: str) -> None:
    bad = corral(env, "secret", "set", name, input=b"sk-a\nX-Injected: yes\n", check=False)
    text = subprocess.CompletedProcess(
        bad.args, bad.returncode, bad.stdout.decode(), bad.stderr.decode()
    )
    assert "value" in one_error(text, 2)
    assert "X-Injected" not in text.stderr
    empty = corral(env, "secret", "set", name, input=b"", check=False)
    assert empty.returncode == 2 and b"no value for secret" in empty.stderr
    assert corral_text(env, "secret", "get", name, check=False).returncode == 1


@pytest.mark.parametrize("bad", ["a" * 65, "sp ace", "a:b"])
def test_bad_names_are_exit_2(env: dict[str, str], bad: str) -> None:
    res = corral_text(env, "secret", "set", bad, "v", check=False)
    assert "1 to 64 characters of letters, digits" in one_error(res, 2)


def test_bad_secret_flag_is_exit_2(env: dict[str, str]) -> None:
    res = corral_text(env, "create", "--template", "minimal", "--secret", "openai", check=False)
    assert "expected NAME:HOST[,HOST...][:ENV]" in one_error(res, 2)
