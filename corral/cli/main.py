"""Entry point of the ``corral`` command.

Every failure ends as one line on stderr, ``error: <message>``, and exit status 2 for a usage
error or an invalid request, 1 for anything else; never a traceback. Template builds and
imports are the exception: whatever the server refused or failed is printed whole (a failing
RUN's output and exit code) with status 1, local usage errors staying 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from corral.cli._exit import EXIT_FAILURE, EXIT_USAGE, exit_status
from corral.cli._exit import say_error as _say_error
from corral.errors import CorralError, InvalidRequestError

__all__ = ["app", "main"]


def _is_cli_error(exc: BaseException) -> bool:
    """A usage error from the argument parser: typer's own classes (typer >= 0.2x vendors
    click under ``TyperException``) or click's, for older typer releases."""
    return isinstance(exc, typer.TyperException) or type(exc).__module__.startswith("click.")


def _usage_hint(exc: BaseException) -> str:
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return ""
    if type(exc).__name__ == "NoSuchOption" and ctx.command.name == "exec":
        return f" (put the command after --: {ctx.command_path} ID -- CMD ...)"
    return f" (see '{ctx.command_path} --help')"


def _run_guarded(invoke: Callable[[], Any]) -> int:
    """Run the parser and the command; turn whatever escapes into an exit status."""
    try:
        rv = invoke()
    except (CorralError, KeyboardInterrupt, BrokenPipeError) as exc:
        code = exit_status(exc)
        assert code is not None
        return code
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            # typer's rich help prints itself and answers ""; plain click answers the text.
            text = exc.ctx.get_help()  # type: ignore[attr-defined]
            if text.strip():
                sys.stderr.write(text + "\n")
            return EXIT_USAGE
        if _is_cli_error(exc) and hasattr(exc, "format_message"):
            code = int(getattr(exc, "exit_code", EXIT_FAILURE))
            hint = _usage_hint(exc) if code == EXIT_USAGE else ""
            _say_error(exc.format_message() + hint)
            return code
        if type(exc).__name__ == "Abort":
            _say_error("aborted")
            return EXIT_FAILURE
        # A bug: still one line; the type tells where to look.
        _say_error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return rv if isinstance(rv, int) else 0


class _Group(TyperGroup):
    """Root group whose ``main`` owns error reporting (also when run by CliRunner)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def invoke() -> Any:
            return TyperGroup.main(
                self,
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )

        code = _run_guarded(invoke)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Group,
    name="corral",
    help="Self-hosted sandboxes for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
template_app = typer.Typer(
    help="Templates: build from a Dockerfile, import images, list, inspect, tag, delete.",
    no_args_is_help=True,
)
app.add_typer(template_app, name="template")
net_app = typer.Typer(help="A sandbox's network policy and egress log.", no_args_is_help=True)
app.add_typer(net_app, name="net")
pool_app = typer.Typer(
    help="Warm pools: sandboxes made in advance, so a matching create takes one at once.",
    no_args_is_help=True,
)
app.add_typer(pool_app, name="pool")
secret_app = typer.Typer(
    help="Tenant secrets: set, list, inspect, delete. Values are never shown again.",
    no_args_is_help=True,
)
app.add_typer(secret_app, name="secret")


class _Conn:
    """Connection settings from the global options; None lets the SDK discover them."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key


def _conn(ctx: typer.Context) -> _Conn:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, _Conn) else _Conn(None, None)


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="Server URL (default: $CORRAL_URL, else http://127.0.0.1:7700)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="API key (default: $CORRAL_API_KEY, else $CORRAL_DATA_DIR/admin.key).",
        ),
    ] = None,
) -> None:
    ctx.obj = _Conn(url, api_key)


def _status(exit_code: int) -> int:
    """A process killed by signal N reports -N; a shell reports that as 128+N."""
    return 128 - exit_code if exit_code < 0 else exit_code


def _pairs(values: Sequence[str] | None, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key] = value
    return out


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
EnvOpt = Annotated[
    list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.", show_default=False)
]
MetaOpt = Annotated[
    list[str] | None,
    typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable.", show_default=False),
]


class Preset(StrEnum):
    none = "none"
    registries = "registries"
    public = "public"


_NET = "Network"
AllowDomainOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-domain",
        help="Allow a domain (example.com or *.example.com), repeatable.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
AllowCidrOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-cidr",
        help="Allow a network (203.0.113.0/24) or address, repeatable.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
DenyDomainOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--deny-domain",
        help="Deny a domain even if an allow matches, repeatable.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
DenyCidrOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--deny-cidr",
        help="Deny a network even if an allow matches, repeatable.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
PortOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--port",
        help="Limit the --allow-* rules to this port or range (443, 8000-8100), repeatable.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
PresetOpt = Annotated[
    Preset | None,
    typer.Option(
        help="Rules to start from: none, registries (PyPI, npm, Debian, GitHub) or public.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]
EgressOpt = Annotated[
    float | None,
    typer.Option(
        help="Egress rate limit in Mbit/s (default: the server's).",
        show_default=False,
        rich_help_panel=_NET,
    ),
]


class IsolationChoice(StrEnum):
    container = "container"
    microvm = "microvm"


class OnTimeoutChoice(StrEnum):
    kill = "kill"
    pause = "pause"
    hibernate = "hibernate"


class OnIdleChoice(StrEnum):
    pause = "pause"
    hibernate = "hibernate"
    kill = "kill"


_LIFE = "Lifecycle"


PolicyFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="The whole policy as a JSON document ('-': stdin); not with the other flags.",
        show_default=False,
        rich_help_panel=_NET,
    ),
]


_SECRETS = "Secrets"
_SECRET_SYNTAX = "NAME:HOST[,HOST...][:ENV], e.g. openai:api.openai.com:OPENAI_API_KEY"


def parse_secret_flag(text: str) -> dict[str, Any]:
    """One ``--secret NAME:HOST[,HOST...][:ENV]`` as a create body's binding."""
    parts = text.split(":")
    hosts = parts[1].split(",") if len(parts) in (2, 3) else []
    if (
        len(parts) not in (2, 3)
        or not parts[0].strip()
        or not hosts
        or not all(h.strip() for h in hosts)
        or (len(parts) == 3 and not parts[2].strip())
    ):
        raise InvalidRequestError(f"--secret {text!r}: expected {_SECRET_SYNTAX}")
    binding: dict[str, Any] = {"name": parts[0].strip(), "hosts": [h.strip() for h in hosts]}
    if len(parts) == 3:
        binding["env"] = parts[2].strip()
    return binding


def load_secrets_file(path: Path) -> list[dict[str, Any]]:
    """Secret bindings from a JSON file (``-``: stdin): a list of objects, sent as they are;
    the server checks their fields."""
    from corral.cli._input import load_json

    doc = load_json(path)
    if not isinstance(doc, list) or not all(isinstance(b, dict) for b in doc):
        raise InvalidRequestError(
            f'{path}: expected a JSON list of bindings, [{{"name": "openai", "hosts": '
            '["api.openai.com"], "header": "Authorization", "format": "Bearer {value}"}]'
        )
    return doc


def secret_bindings_from_flags(
    flags: Sequence[str] | None, file: Path | None
) -> list[dict[str, Any]]:
    """The create body's ``secrets``: those of ``--secrets-file``, then each ``--secret``."""
    bindings = load_secrets_file(file) if file is not None else []
    return bindings + [parse_secret_flag(f) for f in flags or []]


@app.command()
def server(
    listen: Annotated[
        str | None,
        typer.Option(
            help="Address and port to listen on (default: 127.0.0.1:7700).", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="State, keys and templates (default: /var/lib/corral).",
            envvar="CORRAL_DATA_DIR",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Server settings (TOML or JSON; see docs/network.md).", exists=True),
    ] = None,
) -> None:
    """Run the corral API server in the foreground."""
    try:
        from corral.api.server import run_server
    except ImportError as exc:
        raise CorralError(f"the corral server cannot start: {exc}") from exc
    try:
        run_server(listen, data_dir, config_file=config)
    except ValueError as exc:  # pydantic's ValidationError, a bad TOML/JSON file
        raise CorralError(f"invalid server config: {exc}") from exc


@app.command()
def create(
    ctx: typer.Context,
    template: Annotated[
        str | None,
        typer.Option(
            help="Template to start from (default: base, or the snapshot's).", show_default=False
        ),
    ] = None,
    snapshot: Annotated[
        str | None,
        typer.Option(
            help="Start from this snapshot's files (id); unset settings default to its source's.",
            show_default=False,
        ),
    ] = None,
    isolation: Annotated[
        IsolationChoice,
        typer.Option(help="container (namespaces) or microvm (a QEMU guest, its own kernel)."),
    ] = IsolationChoice.container,
    cpu: Annotated[float | None, typer.Option(help="CPU cores.", show_default=False)] = None,
    vcpus: Annotated[
        int | None, typer.Option(min=1, help="Virtual CPUs (microvm).", show_default=False)
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="Memory limit in MB.", show_default=False)
    ] = None,
    disk_mb: Annotated[
        int | None, typer.Option(help="Disk quota in MB.", show_default=False)
    ] = None,
    timeout: Annotated[
        int | None, typer.Option(help="Lifetime in seconds.", show_default=False)
    ] = None,
    env: EnvOpt = None,
    metadata: MetaOpt = None,
    allow_domain: AllowDomainOpt = None,
    allow_cidr: AllowCidrOpt = None,
    deny_domain: DenyDomainOpt = None,
    deny_cidr: DenyCidrOpt = None,
    port: PortOpt = None,
    preset: PresetOpt = None,
    egress_mbit: EgressOpt = None,
    network_file: PolicyFileOpt = None,
    public_ports: Annotated[
        bool,
        typer.Option(
            "--public-ports",
            help="Serve the sandbox's ports without its access token.",
            rich_help_panel=_NET,
        ),
    ] = False,
    on_timeout: Annotated[
        OnTimeoutChoice | None,
        typer.Option(
            help="At the timeout: kill (the default), pause (memory kept) or hibernate (disk kept).",
            show_default=False,
            rich_help_panel=_LIFE,
        ),
    ] = None,
    idle_timeout: Annotated[
        int | None,
        typer.Option(
            metavar="SECONDS",
            min=1,
            help="After this long unused (no calls, nothing attached, no CPU): --on-idle.",
            show_default=False,
            rich_help_panel=_LIFE,
        ),
    ] = None,
    on_idle: Annotated[
        OnIdleChoice | None,
        typer.Option(
            help="When idle: pause (the default), hibernate or kill; needs --idle-timeout.",
            show_default=False,
            rich_help_panel=_LIFE,
        ),
    ] = None,
    no_auto_resume: Annotated[
        bool,
        typer.Option(
            "--no-auto-resume",
            help="Calls on it while paused fail instead of resuming it.",
            rich_help_panel=_LIFE,
        ),
    ] = False,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="A scope for its identity tokens (`corral token`), repeatable.",
            show_default=False,
        ),
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            metavar="NAME:HOST[,HOST...][:ENV]",
            help="Let the sandbox use secret NAME toward HOSTs; inside, ENV (default: NAME "
            "upper-cased) holds only a placeholder. Repeatable.",
            show_default=False,
            rich_help_panel=_SECRETS,
        ),
    ] = None,
    secrets_file: Annotated[
        Path | None,
        typer.Option(
            help="Secret bindings as a JSON list of {name, hosts, env?, header?, format?} "
            "('-': stdin).",
            show_default=False,
            rich_help_panel=_SECRETS,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a sandbox and print its id. Egress is denied unless the network flags allow it."""
    from corral.cli._net import policy_from_flags
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    if on_idle is not None and idle_timeout is None:
        raise InvalidRequestError("--on-idle needs --idle-timeout (how long idle is)")
    bindings = secret_bindings_from_flags(secret, secrets_file)

    policy = policy_from_flags(
        file=network_file,
        preset=None if preset is None else preset.value,
        allow_domains=allow_domain,
        allow_cidrs=allow_cidr,
        deny_domains=deny_domain,
        deny_cidrs=deny_cidr,
        ports=port,
        egress_mbit=egress_mbit,
    )
    conn = _conn(ctx)
    sbx = Sandbox.create(
        template,
        isolation=None if isolation is IsolationChoice.container else isolation.value,
        vcpus=vcpus,
        cpu=cpu,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        timeout=timeout,
        # None, not {}, when not given: with --snapshot an empty map would replace the source's.
        env=_pairs(env, "--env") or None,
        metadata=_pairs(metadata, "--metadata") or None,
        network=policy,
        public_ports=public_ports,
        on_timeout=None if on_timeout is None else on_timeout.value,
        idle_timeout=idle_timeout,
        on_idle=None if on_idle is None else on_idle.value,
        auto_resume=not no_auto_resume,
        snapshot=snapshot,
        scopes=scope,
        secrets=bindings or None,
        api_key=conn.api_key,
        base_url=conn.url,
    )
    try:
        info = sbx.info() if as_json else None
    finally:
        sbx.close()
    if info is not None:
        print_json(dict(info.raw))
    else:
        typer.echo(sbx.id)


@app.command("ls")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None, typer.Option(help="Only these states, repeatable.", show_default=False)
    ] = None,
    metadata: MetaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List sandboxes, newest first."""
    from corral.cli._output import console, print_json, sandbox_table
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    items = Sandbox.list(
        state=state or None,
        metadata=_pairs(metadata, "--metadata") or None,
        api_key=conn.api_key,
        base_url=conn.url,
    )
    if as_json:
        print_json([dict(s.raw) for s in items])
    elif items:
        console().print(sandbox_table(items))


@app.command()
def info(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Show one sandbox."""
    from rich.text import Text

    from corral.cli._net import network_rows
    from corral.cli._output import console, print_json, sandbox_detail
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        details = sbx.info()
    finally:
        sbx.close()
    if as_json:
        print_json(dict(details.raw))
    else:
        table = sandbox_detail(details)
        for key, value in network_rows(details):
            table.add_row(key, Text(value))
        console().print(table)


def _pause_or_resume(ctx: typer.Context, sandbox_id: str, as_json: bool, verb: str) -> None:
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        after = {"resume": sbx.resume, "pause": sbx.pause, "hibernate": sbx.hibernate}[verb]()
    finally:
        sbx.close()
    if as_json:
        print_json(dict(after.raw))
    else:
        typer.echo(after.state)


@app.command()
def pause(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Freeze a sandbox (no CPU, memory kept, timeout clock stopped); print its new state."""
    _pause_or_resume(ctx, sandbox_id, as_json, "pause")


@app.command()
def resume(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Thaw a paused sandbox where it stopped, or wake a hibernated one; print its new state."""
    _pause_or_resume(ctx, sandbox_id, as_json, "resume")


@app.command()
def hibernate(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Stop a sandbox's processes and free its memory, keeping its disk; print its new state."""
    _pause_or_resume(ctx, sandbox_id, as_json, "hibernate")


@app.command("snapshot")
def snapshot_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[
        str | None,
        typer.Option(
            help="Unique among this sandbox's snapshots (default: the snapshot's id).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Save a sandbox's files as a snapshot (the sandbox keeps running); print its id."""
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        snap = sbx.snapshot(name)
    finally:
        sbx.close()
    if as_json:
        print_json(dict(snap.raw))
    else:
        typer.echo(snap.id)


@app.command()
def snapshots(
    ctx: typer.Context,
    sandbox_id: Annotated[
        str | None,
        typer.Argument(
            metavar="ID", help="Only those taken from this sandbox.", show_default=False
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List snapshots, newest first; they outlive the sandbox they were taken from."""
    from corral.cli._output import console, print_json, snapshot_table
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    items = Sandbox.list_snapshots(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    if as_json:
        print_json([dict(s.raw) for s in items])
    elif items:
        console().print(snapshot_table(items))


@app.command("snapshot-rm")
def snapshot_rm(
    ctx: typer.Context,
    snapshot_ids: Annotated[list[str], typer.Argument(metavar="SNAPSHOT...")],
    as_json: JsonOpt = False,
) -> None:
    """Delete snapshots; sandboxes restored or forked from them are not affected."""
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    _each(
        snapshot_ids,
        lambda sid: Sandbox.delete_snapshot(sid, api_key=conn.api_key, base_url=conn.url),
        "deleted",
        as_json,
    )


def _each(ids: Sequence[str], act: Callable[[str], None], done: str, as_json: bool) -> None:
    """``act`` on every id, going on past failures: report each (``{"id", done: bool}`` with
    ``--json``) and exit 1 at the end if any failed."""
    from corral.cli._output import print_json

    results: list[dict[str, Any]] = []
    failed = False
    for item in ids:
        try:
            act(item)
        except CorralError as exc:
            failed = True
            results.append({"id": item, done: False, "error": exc.message})
            if not as_json:
                _say_error(f"{item}: {exc.message}")
        else:
            results.append({"id": item, done: True})
    if as_json:
        print_json(results)
    if failed:
        raise typer.Exit(EXIT_FAILURE)


@app.command()
def restore(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    snapshot: Annotated[
        str, typer.Argument(metavar="SNAPSHOT", help="Snapshot id, or name among ID's snapshots.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Roll a sandbox back to a snapshot (a microvm's processes too). Print its state."""
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        sbx.restore(snapshot)
        after = sbx.info()
    finally:
        sbx.close()
    if as_json:
        print_json(dict(after.raw))
    else:
        typer.echo(after.state)


@app.command()
def fork(
    ctx: typer.Context,
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Snapshot id.")],
    count: Annotated[int, typer.Option("--count", "-n", help="How many sandboxes to start.")] = 1,
    timeout: Annotated[
        int | None,
        typer.Option(help="Lifetime in seconds (default: the source's).", show_default=False),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            help="KEY=VALUE, repeatable; replaces the source's env.",
            show_default=False,
        ),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(
            "--metadata",
            "-m",
            help="KEY=VALUE, repeatable; replaces the source's metadata.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start sandboxes from a snapshot, each with its own copy of the files; print their ids.

    They take the settings of the sandbox the snapshot was taken from unless overridden.
    """
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    forks = Sandbox.fork(
        snapshot,
        count,
        timeout=timeout,
        metadata=_pairs(metadata, "--metadata") or None,
        env=_pairs(env, "--env") or None,
        api_key=conn.api_key,
        base_url=conn.url,
    )
    try:
        infos = [sbx.info() for sbx in forks] if as_json else []
    finally:
        for sbx in forks:
            sbx.close()
    if as_json:
        print_json([dict(i.raw) for i in infos])
    else:
        for sbx in forks:
            typer.echo(sbx.id)


@app.command()
def url(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    port: Annotated[int, typer.Argument(metavar="PORT", min=1, max=65535)],
    path: Annotated[str, typer.Option(help="Path (and query) inside the port.")] = "/",
    with_token: Annotated[
        bool,
        typer.Option(
            "--with-token",
            help="Put the access token in the URL (it then ends up in logs and history).",
        ),
    ] = False,
) -> None:
    """Print the URL that reaches PORT inside a sandbox through the server."""
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        typer.echo(sbx.get_url(port, path, with_token=with_token))
    finally:
        sbx.close()


@app.command()
def token(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    audience: Annotated[
        str,
        typer.Option(
            help="The service the token is for (its aud), e.g. https://api.example.com.",
            show_default=False,
        ),
    ],
    ttl: Annotated[
        int | None,
        typer.Option(
            metavar="SECONDS",
            help="How long it is valid (default: the server's, 900; at most 3600).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a signed identity token (a JWT) of a sandbox for one service.

    The service verifies it with the server's public keys alone (/.well-known/jwks.json).
    """
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        got = sbx.identity_token(audience, ttl=ttl)
    finally:
        sbx.close()
    if as_json:
        print_json({"token": got.token, "expires_at": got.expires_at.isoformat()})
    else:
        typer.echo(got.token)


@app.command("token-introspect")
def token_introspect(
    ctx: typer.Context,
    token: Annotated[
        str,
        typer.Argument(
            metavar="TOKEN", help="The JWT ('-': read it from stdin, out of the process list)."
        ),
    ],
    audience: Annotated[
        str | None,
        typer.Option(help="Inactive unless the token is for this audience.", show_default=False),
    ] = None,
) -> None:
    """Ask the server whether an identity token holds now; print its JSON answer.

    Exit status 0 when it is active, 1 when not (bad signature, expired, another audience,
    or its sandbox is gone: tokens are revoked when their sandbox is killed).
    """
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Sandbox

    if token == "-":
        token = sys.stdin.read()
    token = token.strip()
    if not token:
        raise InvalidRequestError("no token given (TOKEN, or '-' to read it from stdin)")
    conn = _conn(ctx)
    answer = Sandbox.introspect_token(
        token, audience=audience, api_key=conn.api_key, base_url=conn.url
    )
    print_json(answer)
    if answer.get("active") is not True:
        raise typer.Exit(EXIT_FAILURE)


@app.command("exec")
def exec_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    cmd: Annotated[list[str], typer.Argument(metavar="-- CMD...", show_default=False)],
    cwd: Annotated[str | None, typer.Option(help="Working directory.", show_default=False)] = None,
    env: EnvOpt = None,
    user: Annotated[str | None, typer.Option(help="User name or uid.", show_default=False)] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Kill the command after this many seconds.", show_default=False),
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Send this command's stdin to the process.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command and stream its output; exit with its exit code.

    One argument runs through /bin/sh -c; several are executed directly.
    """
    from corral.cli._output import print_json
    from corral.sdk.models import ExecExit, ExecOutput
    from corral.sdk.sandbox import Sandbox

    command: str | list[str] = cmd[0] if len(cmd) == 1 else list(cmd)
    stdin_text: str | None = None
    if stdin:
        try:
            stdin_text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError("--stdin takes text; this input is not UTF-8") from exc
    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        kwargs: dict[str, Any] = {
            "cwd": cwd,
            "env": _pairs(env, "--env"),
            "user": user,
            "timeout": timeout,
            "stdin": stdin_text,
        }
        if as_json:
            result = sbx.exec(command, **kwargs)
            print_json(
                {
                    "pid": result.pid,
                    "exit_code": result.exit_code,
                    "stdout": result.stdout,
                    "stderr": result.stderr,
                }
            )
            raise typer.Exit(_status(result.exit_code))
        exit_code = 1
        # Raw bytes straight through: the output may be binary and is piped more often than not.
        for event in sbx.exec_stream(command, **kwargs):
            if isinstance(event, ExecOutput):
                stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
                stream.write(event.data)
                stream.flush()
            elif isinstance(event, ExecExit):
                exit_code = event.exit_code
    finally:
        sbx.close()
    raise typer.Exit(_status(exit_code))


@app.command()
def shell(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    user: Annotated[str | None, typer.Option(help="User name or uid.", show_default=False)] = None,
    cmd: Annotated[
        str | None,
        typer.Option(help="Program to run (default: the login shell).", show_default=False),
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory.", show_default=False)] = None,
) -> None:
    """Open an interactive terminal in a sandbox."""
    from corral.cli._terminal import run_shell
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        code = _status(run_shell(sbx, cmd=cmd, user=user, cwd=cwd))
    finally:
        sbx.close()
    raise typer.Exit(code)


@app.command(
    "run",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": [],
    },
    add_help_option=False,
)
def run_(ctx: typer.Context) -> None:
    """Run a command on this machine in a sandbox (docs/local.md; corral run --help).

    The project (the git checkout around here) is writable, the rest read-only.

    Credentials are hidden; rc files, git hooks and agent settings stay read-only; API keys
    bound as secrets stay outside (the command holds placeholders).

    No network but the allowed domains. Exits with the command's exit code.
    """
    # One parser for `corral run`: the lean one the executable goes to directly.
    from corral.local.cli import main as run_main

    raise typer.Exit(run_main(ctx.args))


@app.command()
def cp(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC")],
    dst: Annotated[str, typer.Argument(metavar="DST")],
) -> None:
    """Copy files or directories; one side is ID:/path inside a sandbox."""
    from corral.cli._cp import copy, parse_endpoint

    conn = _conn(ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy(parse_endpoint(src), parse_endpoint(dst), api_key=conn.api_key, base_url=conn.url)
    for w in caught:
        sys.stderr.write(f"warning: {w.message}\n")


@app.command()
def kill(
    ctx: typer.Context,
    sandbox_ids: Annotated[list[str], typer.Argument(metavar="ID...")],
    as_json: JsonOpt = False,
) -> None:
    """Stop and discard sandboxes."""
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)

    def kill_one(sandbox_id: str) -> None:
        sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
        try:
            sbx.kill()
        finally:
            sbx.close()

    _each(sandbox_ids, kill_one, "killed", as_json)


@net_app.command("show")
def net_show(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Show a sandbox's address, policy and proxy."""
    from corral.cli._net import network_table
    from corral.cli._output import console, print_json
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        net = sbx.network.info()
    finally:
        sbx.close()
    if as_json:
        print_json(dict(net.raw))
    else:
        console().print(network_table(net))


@net_app.command("update")
def net_update(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    allow_domain: AllowDomainOpt = None,
    allow_cidr: AllowCidrOpt = None,
    deny_domain: DenyDomainOpt = None,
    deny_cidr: DenyCidrOpt = None,
    port: PortOpt = None,
    preset: PresetOpt = None,
    egress_mbit: EgressOpt = None,
    file: PolicyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a sandbox's whole policy; on a bad rule the old one stays in force.

    '--preset none' alone denies everything.
    """
    from corral.cli._net import network_table, policy_from_flags
    from corral.cli._output import console, print_json
    from corral.sdk.sandbox import Sandbox

    policy = policy_from_flags(
        file=file,
        preset=None if preset is None else preset.value,
        allow_domains=allow_domain,
        allow_cidrs=allow_cidr,
        deny_domains=deny_domain,
        deny_cidrs=deny_cidr,
        ports=port,
        egress_mbit=egress_mbit,
    )
    if policy is None:
        # An empty update would silently cut the sandbox off; make that an explicit choice.
        raise InvalidRequestError(
            "no policy given: use --file or the --allow-*/--deny-*/--preset flags "
            "('--preset none' alone denies everything)"
        )
    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        net = sbx.network.update(policy)
    finally:
        sbx.close()
    if as_json:
        print_json(dict(net.raw))
    else:
        console().print(network_table(net))


@net_app.command("log")
def net_log(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing new events until the sandbox ends."),
    ] = False,
    after: Annotated[int, typer.Option(min=0, help="Only events after this event id.")] = 0,
    limit: Annotated[
        int, typer.Option(min=1, max=10000, help="At most this many events per request.")
    ] = 1000,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between polls with --follow.")
    ] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Print a sandbox's egress decisions (DNS queries and connections), oldest first.

    With --json: a JSON list, or one JSON object a line with --follow.
    """
    import json

    from corral.cli._net import egress_table, follow_log
    from corral.cli._output import console, print_json
    from corral.sdk.models import EgressEvent
    from corral.sdk.sandbox import Sandbox

    conn = _conn(ctx)
    sbx = Sandbox.connect(sandbox_id, api_key=conn.api_key, base_url=conn.url)
    try:
        events = sbx.network.log(after=after, limit=limit)
        if not follow:
            if as_json:
                print_json([dict(e.raw) for e in events])
            elif events:
                console().print(egress_table(events))
            return
        header = True

        def emit(batch: list[EgressEvent]) -> None:
            nonlocal header
            if as_json:
                for e in batch:
                    sys.stdout.write(json.dumps(dict(e.raw), default=str) + "\n")
                sys.stdout.flush()
            else:
                console().print(egress_table(batch, header=header))
                header = False

        follow_log(sbx, events, after=after, limit=limit, interval=interval, emit=emit)
    finally:
        sbx.close()


# Built by the server itself (``corral template build base --force``); a Dockerfile build can
# neither take these names nor start from --force.
BUILTIN_TEMPLATES = ("minimal", "base")
_BUILD = "Dockerfile build"


@template_app.command("list")
def template_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List templates (each at its latest version) and whether they are built."""
    from corral.cli._output import console, print_json, template_table
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        items = client.list_templates()
    if as_json:
        print_json([dict(t.raw) for t in items])
    else:
        console().print(template_table(items))


def _say_build_error(exc: CorralError) -> NoReturn:
    """A build's error in full: a failing RUN's message carries its output and exit code."""
    sys.stderr.write(f"error: {exc.message.rstrip()}\n")
    sys.stderr.flush()
    raise typer.Exit(EXIT_FAILURE)


def _build_args(values: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not key:
            raise typer.BadParameter(
                f"expected KEY=VALUE or KEY, got {item!r}", param_hint="--build-arg"
            )
        if sep:
            out[key] = value
        elif key in os.environ:  # like docker: a bare KEY takes its value from here
            out[key] = os.environ[key]
    return out


def _build_builtin(ctx: typer.Context, name: str, force: bool, as_json: bool) -> None:
    from rich.console import Console

    from corral.cli._output import describe_size, print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    status = Console(stderr=True).status(f"building template {name}…")
    with Client(api_key=conn.api_key, base_url=conn.url) as client, status:
        built = client.build_template(name, force=force)
    if as_json:
        print_json(dict(built.raw))
    else:
        typer.echo(f"built template {built.name} ({describe_size(built.size_bytes)})")


@template_app.command("build")
def template_build(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    context: Annotated[
        Path | None,
        typer.Argument(
            metavar="[CONTEXT]",
            help="Directory sent to the build (COPY/ADD sources); default: the current one. "
            "Its .dockerignore is honoured.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            help="The Dockerfile (default: CONTEXT/Dockerfile; '-': read it from stdin).",
            show_default=False,
            rich_help_panel=_BUILD,
        ),
    ] = None,
    tag: Annotated[
        str | None,
        typer.Option(help="A tag for the new version besides latest.", rich_help_panel=_BUILD),
    ] = None,
    build_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--build-arg",
            help="ARG value as KEY=VALUE (KEY alone: from the environment), repeatable.",
            show_default=False,
            rich_help_panel=_BUILD,
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Run every step again.", rich_help_panel=_BUILD),
    ] = False,
    network: Annotated[
        Preset | None,
        typer.Option(
            help="What RUN steps may reach: none, registries (default) or public.",
            show_default=False,
            rich_help_panel=_BUILD,
        ),
    ] = None,
    ready_cmd: Annotated[
        str | None,
        typer.Option(
            help="Shell command a new sandbox must pass before create returns "
            "(replaces the Dockerfile's HEALTHCHECK).",
            show_default=False,
            rich_help_panel=_BUILD,
        ),
    ] = None,
    ready_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds the ready check may take.",
            show_default=False,
            rich_help_panel=_BUILD,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress; print only NAME@VERSION.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild a built-in template (minimal, base).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the new template as JSON.")
    ] = False,
) -> None:
    """Build a template from a Dockerfile, showing each step and its output.

    Each build adds a version (NAME@1, NAME@2, ...) and moves the latest tag to it. The
    built-in templates (minimal, base) are built by the server instead: 'corral template
    build base --force' (admin key only).
    """
    dockerfile_given = file is not None or context is not None
    options_given = tag, build_arg, network, ready_cmd, ready_timeout
    if name in BUILTIN_TEMPLATES:
        if dockerfile_given or no_cache or any(o is not None for o in options_given):
            raise typer.BadParameter(
                f"{name} is a built-in template: only --force applies to it "
                "(give a Dockerfile build another name)",
                param_hint="NAME",
            )
        _build_builtin(ctx, name, force, as_json)
        return
    if force:
        raise typer.BadParameter(
            "only the built-in templates (minimal, base) are rebuilt with --force; "
            "--no-cache runs every step of a Dockerfile build again",
            param_hint="--force",
        )

    from corral.cli._output import print_json, template_summary
    from corral.cli._progress import BuildView
    from corral.sdk.sandbox import Client

    root = context if context is not None else Path(".")
    if not root.is_dir():
        raise typer.BadParameter(f"{root} is not a directory", param_hint="CONTEXT")
    text: str | None = None
    dockerfile = Path("Dockerfile")
    if file == "-":
        text = sys.stdin.read()
    elif file is not None:
        dockerfile = Path(file).absolute()  # relative to here, like docker's -f
        if not dockerfile.is_file():
            raise typer.BadParameter(f"no Dockerfile at {file}", param_hint="'--file'")
    elif not (root / "Dockerfile").is_file():
        raise typer.BadParameter(
            f"no Dockerfile in {root} (name one with -f)", param_hint="CONTEXT"
        )
    args = _build_args(build_arg)

    from rich.console import Console

    conn = _conn(ctx)
    view = BuildView(Console(stderr=True, highlight=False))
    on_event = None if quiet or as_json else view
    try:
        with Client(api_key=conn.api_key, base_url=conn.url) as client, view:
            built = client.build_template_from_dockerfile(
                name,
                root,
                dockerfile=dockerfile,
                dockerfile_text=text,
                tag=tag,
                build_args=args,
                no_cache=no_cache,
                network=None if network is None else network.value,
                ready_cmd=ready_cmd,
                ready_timeout=ready_timeout,
                on_event=on_event,
            )
    except CorralError as exc:
        _say_build_error(exc)
    if as_json:
        print_json(dict(built.raw))
    elif quiet:
        typer.echo(built.ref)
    else:
        typer.echo(template_summary("built", built, view.seconds))


@template_app.command("import")
def template_import(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    image: Annotated[
        str | None,
        typer.Argument(
            metavar="[IMAGE]",
            help="Registry image, e.g. registry.example:5000/app:1 (or give --archive).",
            show_default=False,
        ),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(
            help="A 'docker save' or OCI-layout tarball to import instead of IMAGE.",
            show_default=False,
        ),
    ] = None,
    username: Annotated[
        str | None, typer.Option(help="Registry user name.", show_default=False)
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the registry password from stdin.")
    ] = False,
    tag: Annotated[
        str | None, typer.Option(help="A tag for the new version besides latest.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress; print only NAME@VERSION.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the new template as JSON.")
    ] = False,
) -> None:
    """Import an OCI/Docker image (linux/amd64) from a registry or a tarball as a new version
    of a template, with a progress bar per layer."""
    if (image is None) == (archive is None):
        raise typer.BadParameter("give either IMAGE or --archive FILE", param_hint="IMAGE")
    if archive is not None and (username is not None or password_stdin):
        raise typer.BadParameter("registry credentials go with IMAGE", param_hint="--username")
    if (username is None) != (not password_stdin):
        raise typer.BadParameter(
            "--username and --password-stdin go together", param_hint="--username"
        )
    if archive is not None and not archive.is_file():
        raise typer.BadParameter(f"{archive} is not a file", param_hint="'--archive'")
    password = sys.stdin.read().rstrip("\r\n") if password_stdin else None

    from rich.console import Console

    from corral.cli._output import print_json, template_summary
    from corral.cli._progress import BuildView
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    view = BuildView(Console(stderr=True, highlight=False))
    on_event = None if quiet or as_json else view
    try:
        with Client(api_key=conn.api_key, base_url=conn.url) as client, view:
            if archive is not None:
                got = client.import_template_archive(name, archive, tag=tag, on_event=on_event)
            else:
                assert image is not None
                got = client.import_template_image(
                    name,
                    image,
                    username=username,
                    password=password,
                    tag=tag,
                    on_event=on_event,
                )
    except CorralError as exc:
        _say_build_error(exc)
    if as_json:
        print_json(dict(got.raw))
    elif quiet:
        typer.echo(got.ref)
    else:
        layers = len(got.layers)
        typer.echo(
            template_summary("imported", got, view.seconds)
            + f", {layers} layer{'' if layers == 1 else 's'}"
        )


@template_app.command("inspect")
def template_inspect(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="NAME, NAME:TAG or NAME@VERSION.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a template version: layers and sizes, start command, ready check, env, workdir,
    user."""
    from corral.cli._output import console, print_json, template_detail, template_layers
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        t = client.get_template(ref)
    if as_json:
        print_json(dict(t.raw))
        return
    out = console()
    out.print(template_detail(t))
    if t.layers:
        out.print()
        out.print(template_layers(t))


@template_app.command("versions")
def template_versions(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOpt = False,
) -> None:
    """List a template's versions, oldest first, with their tags."""
    from corral.cli._output import console, print_json, template_versions_table
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        items = client.list_template_versions(name)
    if as_json:
        print_json([dict(t.raw) for t in items])
    elif items:
        console().print(template_versions_table(items))


@template_app.command("tag")
def template_tag(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(
            metavar="NAME@VERSION", help="The version to tag (NAME:TAG: the one it names now)."
        ),
    ],
    tag: Annotated[str, typer.Argument(metavar="TAG")],
    as_json: JsonOpt = False,
) -> None:
    """Point a tag at a version (moving it if it exists): 'corral template tag web@3 stable'."""
    from corral.cli._output import print_json
    from corral.sdk._wire import parse_template_ref
    from corral.sdk.sandbox import Client

    name, version = parse_template_ref(ref)
    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        if version is None:
            if ":" not in ref:
                raise typer.BadParameter(
                    f"name the version: {ref}@VERSION (or {ref}:TAG)", param_hint="NAME@VERSION"
                )
            current = client.get_template(ref)
            name, version = current.name, current.version
            if version is None:
                raise CorralError(f"the server did not say which version {ref} is")
        t = client.tag_template(name, tag, version)
    if as_json:
        print_json(dict(t.raw))
    else:
        typer.echo(f"tagged {t.ref} as {name}:{tag}")


@template_app.command("untag")
def template_untag(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    tag: Annotated[str, typer.Argument(metavar="TAG")],
) -> None:
    """Remove a tag; the version it named stays."""
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        client.untag_template(name, tag)
    typer.echo(f"removed tag {name}:{tag}")


@template_app.command("rm")
def template_rm(
    ctx: typer.Context,
    refs: Annotated[
        list[str],
        typer.Argument(
            metavar="REF...", help="NAME (every version), NAME@VERSION or NAME:TAG (one version)."
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Delete templates or single versions. Sandboxes made from them go on; their layers are
    freed once nothing uses them."""
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        _each(refs, client.delete_template, "deleted", as_json)


@template_app.command("gc")
def template_gc(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Free the layers no template version, snapshot or sandbox uses (admin key only)."""
    from corral.cli._output import describe_size, print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        gc = client.gc_templates()
    if as_json:
        print_json(dict(gc.raw))
    else:
        n = gc.layers_removed
        typer.echo(
            f"removed {n} layer{'' if n == 1 else 's'}, freed {describe_size(gc.bytes_freed)}"
        )


@pool_app.command("set")
def pool_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    template: Annotated[
        str, typer.Option(help="Template of the pool's sandboxes.", show_default=False)
    ],
    size: Annotated[
        int,
        typer.Option(
            min=0, help="How many to keep ready (0: keep the pool, none ready).", show_default=False
        ),
    ],
    isolation: Annotated[
        IsolationChoice | None,
        typer.Option(
            help="container or microvm (default: the server's, as at create).", show_default=False
        ),
    ] = None,
    cpu: Annotated[float | None, typer.Option(help="CPU cores.", show_default=False)] = None,
    vcpus: Annotated[
        int | None, typer.Option(min=1, help="Virtual CPUs (microvm).", show_default=False)
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="Memory limit in MB.", show_default=False)
    ] = None,
    disk_mb: Annotated[
        int | None, typer.Option(help="Disk quota in MB.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a pool or replace its settings; print it.

    A create with the same template and shape (no snapshot) takes a ready sandbox from it.

    The pool refills in the background. Shape options left out take the create defaults.
    """
    from corral.cli._output import pool_shape, print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        pool = client.set_pool(
            name,
            template,
            size,
            isolation=None if isolation is None else isolation.value,
            cpu=cpu,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            vcpus=vcpus,
        )
    if as_json:
        print_json(dict(pool.raw))
    else:
        typer.echo(
            f"pool {pool.name}: {pool.template} ({pool_shape(pool)}), "
            f"{pool.ready}/{pool.size} ready"
        )


@pool_app.command("ls")
def pool_ls(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List pools with their template, shape and how many are ready of how many kept."""
    from corral.cli._output import console, pool_table, print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        items = client.list_pools()
    if as_json:
        print_json([dict(p.raw) for p in items])
    elif items:
        console().print(pool_table(items))


@pool_app.command("rm")
def pool_rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    as_json: JsonOpt = False,
) -> None:
    """Delete pools and kill what waits in them; sandboxes already taken go on."""
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        _each(names, client.delete_pool, "deleted", as_json)


def _read_secret_value(name: str) -> str:
    """VALUE when left out: typed at a hidden prompt on a terminal, else all of stdin (one
    trailing newline dropped, as ``echo`` or a file adds it)."""
    if sys.stdin.isatty():
        value: str = typer.prompt(
            f"value of secret {name}", hide_input=True, confirmation_prompt=True, err=True
        )
        return value
    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-2] if value.endswith("\r\n") else value[:-1]
    if not value:
        raise InvalidRequestError(
            f"no value for secret {name}: give VALUE, or send it on stdin (not empty)"
        )
    return value


def _secret_json(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


@secret_app.command("set")
def secret_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    value: Annotated[
        str | None,
        typer.Argument(
            metavar="[VALUE]",
            help="Left out: read from stdin, or asked for (hidden) on a terminal. Given here, "
            "it lands in the shell history and the process list.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create secret NAME or replace its value. The value is never printed or shown again."""
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Client

    if value is None:
        value = _read_secret_value(name)
    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        info = client.set_secret(name, value)
    if as_json:
        print_json(_secret_json(info))
    else:
        typer.echo(f"secret {info.name} set")


@secret_app.command("ls")
def secret_ls(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the tenant's secrets (names and times; values are never shown)."""
    from rich.table import Table

    from corral.cli._output import console, print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        items = client.list_secrets()
    if as_json:
        print_json([_secret_json(s) for s in items])
        return
    if not items:
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in ("NAME", "CREATED", "UPDATED"):
        table.add_column(header, no_wrap=True)
    for s in items:
        table.add_row(
            s.name,
            s.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            s.updated_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console().print(table)


@secret_app.command("get")
def secret_get(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOpt = False,
) -> None:
    """Show a secret's name and times (not its value: no command shows that)."""
    from corral.cli._output import print_json
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        info = client.get_secret(name)
    if as_json:
        print_json(_secret_json(info))
        return
    typer.echo(f"name: {info.name}")
    for key, when in (("created", info.created_at), ("updated", info.updated_at)):
        typer.echo(f"{key}: {when.astimezone().strftime('%Y-%m-%d %H:%M:%S')}")


@secret_app.command("rm")
def secret_rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    as_json: JsonOpt = False,
) -> None:
    """Delete secrets; sandboxes bound to one can no longer have it injected."""
    from corral.sdk.sandbox import Client

    conn = _conn(ctx)
    with Client(api_key=conn.api_key, base_url=conn.url) as client:
        _each(names, client.delete_secret, "deleted", as_json)


def main() -> NoReturn:
    warnings.showwarning = _show_warning
    app()
    sys.exit(0)  # pragma: no cover - app() always exits


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"warning: {message}\n")
