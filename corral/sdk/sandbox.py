"""The blocking client: ``Sandbox`` and the handles hanging off it.

``corral.sdk.async_sandbox`` mirrors this module method for method; both build their requests
and parse their answers through ``_wire`` so the two surfaces cannot drift apart.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import closing, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

import websockets.exceptions
import websockets.sync.client

from corral.errors import (
    CorralError,
    InvalidRequestError,
    NotFoundError,
    TimeoutError,
)
from corral.sdk._config import resolve_config
from corral.sdk._context import build_context, check_file, file_chunks
from corral.sdk._http import SyncHttp, WriteData, sync_body
from corral.sdk._tar import ChunkReader, extract_tar, iter_tar
from corral.sdk._wire import (
    CONNECT_TIMEOUT,
    USER_AGENT,
    WS_MAX_SIZE,
    BuildEventCallback,
    BuildWatcher,
    Call,
    ExecCollector,
    Names,
    OnIdle,
    OnTimeout,
    PolicyLike,
    PtyState,
    SecretBindingLike,
    SnapshotRef,
    TextCallback,
    calls,
    error_from_ws_open,
    ingress_token,
    ingress_url,
    network_document,
    parse_exists,
    parse_file_count,
    parse_introspection,
    parse_list,
    parse_pid,
    parse_secret_list,
    pty_params,
    pty_path,
    resize_message,
    ws_headers,
    ws_url,
)
from corral.sdk.models import (
    EgressEvent,
    ExecEvent,
    ExecResult,
    FileInfo,
    IdentityToken,
    NetworkInfo,
    PoolInfo,
    ProcessInfo,
    SandboxInfo,
    SecretInfo,
    Snapshot,
    TemplateGcResult,
    TemplateInfo,
)

__all__ = ["Client", "Files", "Network", "Process", "Processes", "Pty", "Sandbox"]

DataCallback = Callable[[bytes], object]


def _dispatch(
    out: tuple[str, str], on_stdout: TextCallback | None, on_stderr: TextCallback | None
) -> None:
    callback = on_stdout if out[0] == "stdout" else on_stderr
    if callback is not None:
        callback(out[1])


def _collect(
    events: Generator[ExecEvent, None, None],
    on_stdout: TextCallback | None,
    on_stderr: TextCallback | None,
    pid: int | None = None,
) -> ExecResult:
    collector = ExecCollector(pid)
    # closing(): leaving early (a callback raised) must drop the connection, which the
    # server takes as the signal to kill a foreground command.
    with closing(events):
        for event in events:
            if (out := collector.add(event)) is not None:
                _dispatch(out, on_stdout, on_stderr)
    for out in collector.flush():
        _dispatch(out, on_stdout, on_stderr)
    return collector.result()


class Process:
    """A process started with ``exec(..., background=True)`` or found by ``processes.connect``."""

    def __init__(self, http: SyncHttp, sandbox_id: str, pid: int) -> None:
        self._http = http
        self._sandbox_id = sandbox_id
        self.pid = pid

    def __repr__(self) -> str:
        return f"Process(sandbox={self._sandbox_id!r}, pid={self.pid})"

    def wait(
        self,
        *,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        replay: bool = True,
    ) -> ExecResult:
        """Follow the output until the process exits; ``replay`` first delivers what it printed
        before (the server keeps the last 1 MiB of each stream)."""
        events = self._http.events(calls.process_output(self._sandbox_id, self.pid, replay))
        return _collect(events, on_stdout, on_stderr, self.pid)

    def send_stdin(self, data: str | bytes) -> None:
        self._http.send(calls.process_stdin(self._sandbox_id, self.pid, data, eof=False))

    def close_stdin(self) -> None:
        self._http.send(calls.process_stdin(self._sandbox_id, self.pid, b"", eof=True))

    def signal(self, signum: int) -> None:
        self._http.send(calls.process_signal(self._sandbox_id, self.pid, signum))

    def kill(self) -> None:
        self._http.send(calls.kill_process(self._sandbox_id, self.pid))

    def info(self) -> ProcessInfo:
        return Processes(self._http, self._sandbox_id).get(self.pid)


class Processes:
    def __init__(self, http: SyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    def list(self) -> builtins.list[ProcessInfo]:
        obj = self._http.json(calls.list_processes(self._sandbox_id))
        return [ProcessInfo.from_json(p) for p in parse_list(obj, "process")]

    def get(self, pid: int) -> ProcessInfo:
        for proc in self.list():
            if proc.pid == pid:
                return proc
        raise NotFoundError(f"no process {pid} in sandbox {self._sandbox_id}")

    def connect(self, pid: int) -> Process:
        """A handle on a process that is running (or has run) in the sandbox."""
        self.get(pid)
        return Process(self._http, self._sandbox_id, pid)


class Files:
    """Files inside the sandbox; every path is absolute inside the sandbox."""

    def __init__(self, http: SyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    def read(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8", errors="replace")

    def read_bytes(self, path: str) -> bytes:
        return self._http.send(calls.read_file(self._sandbox_id, path)).content

    def read_stream(self, path: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The file's bytes chunk by chunk; the request is made on the first iteration."""
        with self._http.stream(calls.read_file(self._sandbox_id, path)) as resp:
            yield from self._http.iter_bytes(resp, chunk_size)

    def write(
        self, path: str, data: WriteData, *, mode: int | None = None, user: str | None = None
    ) -> FileInfo:
        """Create or replace a file (parents are created); file objects and iterators stream."""
        call = calls.write_file(self._sandbox_id, path, mode, user)
        return FileInfo.from_json(self._http.json(call, sync_body(data)))

    def list(self, path: str = "/", depth: int = 1) -> builtins.list[FileInfo]:
        obj = self._http.json(calls.list_files(self._sandbox_id, path, depth))
        return [FileInfo.from_json(f) for f in parse_list(obj, "file")]

    def stat(self, path: str) -> FileInfo:
        return FileInfo.from_json(self._http.json(calls.stat(self._sandbox_id, path)))

    def exists(self, path: str) -> bool:
        return parse_exists(self._http.json(calls.exists(self._sandbox_id, path)))

    def remove(self, path: str, recursive: bool = False) -> None:
        self._http.send(calls.remove(self._sandbox_id, path, recursive))

    def rename(self, src: str, dst: str) -> FileInfo:
        return FileInfo.from_json(self._http.json(calls.rename(self._sandbox_id, src, dst)))

    def mkdir(self, path: str, *, parents: bool = True, user: str | None = None) -> FileInfo:
        return FileInfo.from_json(
            self._http.json(calls.mkdir(self._sandbox_id, path, parents, user))
        )

    def upload_dir(
        self, local_dir: str | os.PathLike[str], remote_dir: str, *, user: str | None = None
    ) -> int:
        """Copy a local directory's contents into ``remote_dir`` as one streamed tar; answer the
        number of entries the server wrote."""
        if not Path(local_dir).is_dir():
            raise InvalidRequestError(f"{local_dir} is not a local directory")
        call = calls.put_tar(self._sandbox_id, remote_dir, user)
        return parse_file_count(self._http.json(call, iter_tar(local_dir)))

    def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> int:
        """Copy ``remote_dir``'s contents into ``local_dir`` (created if missing); nothing in the
        archive can land outside it. Answers the number of entries written."""
        with self._http.stream(calls.get_tar(self._sandbox_id, remote_dir)) as resp:
            return extract_tar(ChunkReader(self._http.iter_bytes(resp)), local_dir)


class Network:
    """The sandbox's network policy and egress log (``sbx.network``)."""

    def __init__(self, http: SyncHttp, sandbox_id: str) -> None:
        self._http = http
        self._sandbox_id = sandbox_id

    def info(self) -> NetworkInfo:
        """The sandbox's address, the policy in force and the explicit proxy URL."""
        return NetworkInfo.from_json(self._http.json(calls.get_network(self._sandbox_id)))

    def update(
        self,
        policy: PolicyLike | None = None,
        *,
        preset: str | None = None,
        allow_domains: Names | None = None,
        allow_cidrs: Names | None = None,
        deny_domains: Names | None = None,
        deny_cidrs: Names | None = None,
        ports: int | str | Sequence[int | str] | None = None,
        egress_mbit: float | None = None,
    ) -> NetworkInfo:
        """Replace the whole policy (nothing given: deny all); new connections follow it.

        A bad rule raises ``InvalidRequestError`` naming it, and the old policy stays in force.
        """
        doc = network_document(
            policy,
            preset=preset,
            allow_domains=allow_domains,
            allow_cidrs=allow_cidrs,
            deny_domains=deny_domains,
            deny_cidrs=deny_cidrs,
            ports=ports,
            egress_mbit=egress_mbit,
        )
        call = calls.update_network(self._sandbox_id, doc or {})
        return NetworkInfo.from_json(self._http.json(call))

    def log(self, after: int = 0, limit: int = 1000) -> builtins.list[EgressEvent]:
        """Egress decisions oldest first, those with an id above ``after`` (at most ``limit``)."""
        obj = self._http.json(calls.network_log(self._sandbox_id, after, limit))
        return [EgressEvent.from_json(e) for e in parse_list(obj, "egress event")]


class Pty:
    """An interactive terminal in the sandbox; output goes to ``on_data`` from a reader thread."""

    def __init__(
        self,
        http: SyncHttp,
        sandbox_id: str,
        ws: websockets.sync.client.ClientConnection,
        on_data: DataCallback | None,
    ) -> None:
        self._http = http
        self._sandbox_id = sandbox_id
        self._ws = ws
        self._on_data = on_data
        self._state = PtyState()
        self._failure: BaseException | None = None
        self._done = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def _open(
        cls,
        http: SyncHttp,
        sandbox_id: str,
        *,
        cmd: str | None,
        rows: int,
        cols: int,
        user: str | None,
        cwd: str | None,
        on_data: DataCallback | None,
    ) -> Pty:
        params = pty_params(cmd, rows, cols, user, cwd)
        url = ws_url(http.config.base_url, pty_path(sandbox_id), params)
        try:
            # Entered by hand: websockets >= 17 deprecates using the connection outside a
            # ``with``, and this handle's close() is where the block would end.
            ws = websockets.sync.client.connect(
                url,
                additional_headers=ws_headers(http.config.api_key),
                user_agent_header=USER_AGENT,
                open_timeout=CONNECT_TIMEOUT,
                max_size=WS_MAX_SIZE,
                compression=None,
            ).__enter__()
        except (OSError, builtins.TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise error_from_ws_open(exc, url) from exc
        pty = cls(http, sandbox_id, ws, on_data)
        try:
            pty._await_start()
        except BaseException:
            ws.close()
            raise
        pty._reader = threading.Thread(target=pty._read_loop, name="corral-pty", daemon=True)
        pty._reader.start()
        return pty

    @property
    def pid(self) -> int | None:
        return self._state.pid

    @property
    def exit_code(self) -> int | None:
        return self._state.exit_code

    @property
    def running(self) -> bool:
        """Whether the connection is still open (the process has not been seen to exit)."""
        return not self._done.is_set()

    def _await_start(self) -> None:
        # The start event carries the pid that kill() needs; wait for it before returning.
        try:
            while not self._state.started:
                self._handle(self._ws.recv(timeout=CONNECT_TIMEOUT))
        except (builtins.TimeoutError, websockets.exceptions.ConnectionClosed) as exc:
            raise CorralError(
                f"the terminal in sandbox {self._sandbox_id} did not start: {exc}"
            ) from exc
        if self._state.error is not None:
            raise self._state.error

    def _handle(self, msg: str | bytes) -> None:
        if isinstance(msg, str):
            self._state.on_text(msg)
        elif self._on_data is not None:
            self._on_data(msg)

    def _read_loop(self) -> None:
        try:
            for msg in self._ws:
                self._handle(msg)
        except websockets.exceptions.ConnectionClosed:
            pass
        except BaseException as exc:  # handed to the caller by wait()
            self._failure = exc
            self._ws.close()
        finally:
            self._done.set()

    def send(self, data: str | bytes) -> None:
        """Type into the terminal (keystrokes, pasted text, control characters)."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            self._ws.send(raw)
        except websockets.exceptions.ConnectionClosed as exc:
            raise CorralError("the terminal is closed") from exc

    def resize(self, rows: int, cols: int) -> None:
        try:
            self._ws.send(resize_message(rows, cols))
        except websockets.exceptions.ConnectionClosed as exc:
            raise CorralError("the terminal is closed") from exc

    def wait(self, timeout: float | None = None) -> int:
        """Block until the terminal's process exits; answer its exit code."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the terminal was still running after {timeout} s")
        if self._failure is not None:
            raise self._failure
        return self._state.result()

    def kill(self) -> None:
        """SIGKILL the terminal's process; ``wait()`` then answers its exit code."""
        if self._state.pid is None:
            self.close()
            return
        with suppress(NotFoundError):
            self._http.send(calls.kill_process(self._sandbox_id, self._state.pid))

    def close(self) -> None:
        """Close the connection, which kills the process if it still runs."""
        self._ws.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join()

    def __enter__(self) -> Pty:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Sandbox:
    """One sandbox. Make one with ``Sandbox.create()`` or ``Sandbox.connect(id)``.

    As a context manager it kills the sandbox on exit.
    """

    def __init__(self, sandbox_id: str, http: SyncHttp, info: SandboxInfo | None = None) -> None:
        self._id = sandbox_id
        self._http = http
        self._info = info
        self.files = Files(http, sandbox_id)
        self.processes = Processes(http, sandbox_id)
        self.network = Network(http, sandbox_id)

    @classmethod
    def create(
        cls,
        template: str | None = None,
        *,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        timeout: int | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        network: PolicyLike | None = None,
        allow_domains: Names | None = None,
        allow_cidrs: Names | None = None,
        preset: str | None = None,
        public_ports: bool = False,
        on_timeout: OnTimeout | None = None,
        idle_timeout: int | None = None,
        on_idle: OnIdle | None = None,
        auto_resume: bool = True,
        snapshot: SnapshotRef | None = None,
        isolation: str | None = None,
        vcpus: int | None = None,
        scopes: Sequence[str] | None = None,
        secrets: Sequence[SecretBindingLike] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> Sandbox:
        """Start a sandbox; it is running and answering when this returns.

        ``template`` defaults to ``"base"``; with ``snapshot`` (a ``Snapshot`` or its id) the
        sandbox starts from that snapshot's files instead, and the settings not given here
        default to those of the sandbox the snapshot was taken from.
        ``timeout`` is its lifetime in seconds (the server's default when None). Egress is
        denied unless ``network`` (a policy document, see ``corral.network_policy``) or the
        ``allow_domains``/``allow_cidrs``/``preset`` shortcuts allow it. ``public_ports`` lets
        anyone reach its ports through the server without the access token.

        ``on_timeout="pause"`` pauses it at the timeout instead of killing it (a resume then
        grants a fresh ``timeout``). ``idle_timeout`` seconds without API use, attached
        streams or CPU use make it ``on_idle`` (``"pause"``, the default, or ``"kill"``).
        ``auto_resume=False`` makes calls on a paused sandbox raise
        ``SandboxNotRunningError`` instead of resuming it.

        ``isolation="microvm"`` runs it in a QEMU guest with its own kernel (``vcpus`` whole
        virtual CPUs) instead of a container (see docs/microvm.md for what that tier has yet).
        ``scopes`` go into its identity tokens (``identity_token``, docs/identity.md).
        ``secrets`` binds tenant secrets (``corral.secrets.set``) to it: each a
        ``corral.SecretBinding`` (or its dict form) naming the secret and the hosts it may go
        to; inside, the sandbox only sees a placeholder (docs/secrets.md).
        """
        doc = network_document(
            network, preset=preset, allow_domains=allow_domains, allow_cidrs=allow_cidrs
        )
        http = SyncHttp(resolve_config(api_key, base_url))
        try:
            call = calls.create_sandbox(
                template,
                cpu,
                memory_mb,
                disk_mb,
                timeout,
                env,
                metadata,
                network=doc,
                public_ports=public_ports,
                on_timeout=on_timeout,
                idle_timeout=idle_timeout,
                on_idle=on_idle,
                auto_resume=auto_resume,
                snapshot=snapshot,
                isolation=isolation,
                vcpus=vcpus,
                scopes=scopes,
                secrets=secrets,
            )
            info = SandboxInfo.from_json(http.json(call))
        except BaseException:
            http.close()
            raise
        return cls(info.id, http, info)

    @classmethod
    def connect(
        cls, sandbox_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> Sandbox:
        """Attach to an existing sandbox (``NotFoundError`` if this key cannot see it)."""
        http = SyncHttp(resolve_config(api_key, base_url))
        try:
            info = SandboxInfo.from_json(http.json(calls.get_sandbox(sandbox_id)))
        except BaseException:
            http.close()
            raise
        return cls(info.id, http, info)

    @classmethod
    def list(
        cls,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """This key's sandboxes, newest first; every ``metadata`` pair must match."""
        with closing(SyncHttp(resolve_config(api_key, base_url))) as http:
            obj = http.json(calls.list_sandboxes(state, metadata))
        return [SandboxInfo.from_json(s) for s in parse_list(obj, "sandbox")]

    @classmethod
    def fork(
        cls,
        snapshot: SnapshotRef,
        count: int = 1,
        *,
        timeout: int | None = None,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[Sandbox]:
        """Start ``count`` independent sandboxes, each with a copy of ``snapshot``'s files.

        They take the settings of the sandbox the snapshot was taken from (template, limits,
        network policy, env, metadata, timeouts); ``timeout``, ``metadata`` and ``env`` replace
        those. All or nothing: over the quota (``QuotaExceededError``) none is started.
        """
        config = resolve_config(api_key, base_url)
        with closing(SyncHttp(config)) as http:
            obj = http.json(calls.fork_snapshot(snapshot, count, timeout, metadata, env))
        infos = [SandboxInfo.from_json(s) for s in parse_list(obj, "sandbox")]
        # One client each: closing one sandbox must not cut off its siblings.
        return [cls(info.id, SyncHttp(config), info) for info in infos]

    @classmethod
    def list_snapshots(
        cls,
        sandbox_id: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> builtins.list[Snapshot]:
        """This key's snapshots, or those taken from ``sandbox_id`` (alive or not)."""
        with closing(SyncHttp(resolve_config(api_key, base_url))) as http:
            obj = http.json(calls.list_snapshots(sandbox_id))
        return [Snapshot.from_json(s) for s in parse_list(obj, "snapshot")]

    @classmethod
    def get_snapshot(
        cls, snapshot_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> Snapshot:
        with closing(SyncHttp(resolve_config(api_key, base_url))) as http:
            return Snapshot.from_json(http.json(calls.get_snapshot(snapshot_id)))

    @classmethod
    def delete_snapshot(
        cls, snapshot: SnapshotRef, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        """Delete a snapshot; sandboxes restored or forked from it are not affected."""
        with closing(SyncHttp(resolve_config(api_key, base_url))) as http:
            http.send(calls.delete_snapshot(snapshot))

    @classmethod
    def introspect_token(
        cls,
        token: str,
        *,
        audience: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> dict[str, Any]:
        """Ask the server whether a sandbox identity token holds now (RFC 7662): ``{"active":
        False}`` when its signature, issuer, times or ``audience`` (when given) do not check
        out, or its sandbox is gone (tokens are revoked at kill); else ``active`` True and the
        token's claims (``sub``, ``tenant``, ``labels``, ...). Any tenant's key may ask."""
        with closing(SyncHttp(resolve_config(api_key, base_url))) as http:
            return parse_introspection(http.json(calls.introspect_token(token, audience)))

    @property
    def id(self) -> str:
        return self._id

    def __repr__(self) -> str:
        return f"Sandbox(id={self._id!r})"

    def info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(self._http.json(calls.get_sandbox(self._id)))
        return self._info

    def _known(self) -> SandboxInfo:
        # The token and ingress domain never change, so the answer of create/connect will do.
        return self._info if self._info is not None else self.info()

    @property
    def pool(self) -> str | None:
        """The warm pool this sandbox was taken from (None: started on demand), as create
        answered: no request."""
        return self._info.pool if self._info is not None else None

    @property
    def access_token(self) -> str | None:
        """What ``get_url`` appends with ``with_token=True`` (send it as the
        ``X-Corral-Access-Token`` header instead where you can); None when ports are public."""
        return ingress_token(self._known())

    def get_url(self, port: int, path: str = "/", *, with_token: bool = False) -> str:
        """The URL of ``port`` inside the sandbox, served through the corral server.

        The host form ``{port}-{id}.{domain}`` when the server has an ingress domain, else the
        path form ``{base_url}/sandboxes/{id}/ports/{port}/``. Unless the sandbox was created
        with ``public_ports``, requests need ``access_token``; ``with_token`` puts it in the URL
        (as ``corral_token``), which is handy for browsers but lands in logs and history.
        """
        info = self._known()
        return ingress_url(
            self._http.config.base_url,
            self._id,
            port,
            path,
            ingress_domain=info.ingress_domain,
            token=ingress_token(info) if with_token else None,
        )

    def identity_token(self, audience: str, *, ttl: int | None = None) -> IdentityToken:
        """A signed token saying "this is sandbox ``id``" to ``audience`` (one service, its
        ``aud``), valid ``ttl`` seconds (default: the server's, 900 s; at most an hour). The
        service verifies it with the server's public keys alone (docs/identity.md).

        ``InvalidRequestError`` for a bad audience or ttl, ``SandboxNotRunningError`` once the
        sandbox has stopped.
        """
        call = calls.mint_token(self._id, audience, ttl)
        return IdentityToken.from_json(self._http.json(call))

    @overload
    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        background: Literal[False] = False,
        tag: str | None = None,
    ) -> ExecResult: ...

    @overload
    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        background: Literal[True],
        tag: str | None = None,
    ) -> Process: ...

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        background: bool = False,
        tag: str | None = None,
    ) -> ExecResult | Process:
        """Run a command: a string goes through ``/bin/sh -c``, a list is executed directly.

        Output reaches ``on_stdout``/``on_stderr`` as it is produced. A command that outlives
        ``timeout`` seconds is killed and ``corral.errors.TimeoutError`` raised. With
        ``background=True`` answer a ``Process`` at once instead.
        """
        if background:
            if on_stdout is not None or on_stderr is not None:
                raise InvalidRequestError(
                    "on_stdout/on_stderr belong to Process.wait() for a background command"
                )
            call = calls.exec(
                self._id,
                cmd,
                cwd=cwd,
                env=env,
                user=user,
                timeout=timeout,
                stdin=stdin,
                background=True,
                tag=tag,
            )
            return Process(self._http, self._id, parse_pid(self._http.json(call)))
        events = self.exec_stream(
            cmd, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin, tag=tag
        )
        return _collect(events, on_stdout, on_stderr)

    def exec_stream(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        tag: str | None = None,
    ) -> Generator[ExecEvent, None, None]:
        """The raw events of a foreground command (``ExecStart``, ``ExecOutput`` with bytes,
        ``ExecExit``) as they arrive. Closing the generator early kills the command."""
        call = calls.exec(
            self._id,
            cmd,
            cwd=cwd,
            env=env,
            user=user,
            timeout=timeout,
            stdin=stdin,
            background=False,
            tag=tag,
        )
        return self._http.events(call)

    def pty(
        self,
        cmd: str | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        on_data: DataCallback | None = None,
        user: str | None = None,
        cwd: str | None = None,
    ) -> Pty:
        """Open an interactive terminal running ``cmd`` (default: the user's login shell)."""
        return Pty._open(
            self._http, self._id, cmd=cmd, rows=rows, cols=cols, user=user, cwd=cwd, on_data=on_data
        )

    def set_timeout(self, seconds: int) -> SandboxInfo:
        """Let the sandbox live ``seconds`` more from now."""
        self._info = SandboxInfo.from_json(self._http.json(calls.set_timeout(self._id, seconds)))
        return self._info

    def pause(self) -> SandboxInfo:
        """Freeze every process (no CPU, memory kept); the timeout clock stops until resumed.

        ``ConflictError`` if already paused, ``SandboxNotRunningError`` if it has stopped.
        """
        self._info = SandboxInfo.from_json(self._http.json(calls.pause_sandbox(self._id)))
        return self._info

    def hibernate(self) -> SandboxInfo:
        """Stop the sandbox and free its memory, keeping its disk (survives a host reboot);
        ``resume`` wakes it with its files as they were. A container's processes start afresh;
        a microvm's memory is saved too, so its processes carry on where they were.

        ``ConflictError`` if already hibernated, ``SandboxNotRunningError`` if it has stopped.
        """
        self._info = SandboxInfo.from_json(self._http.json(calls.hibernate_sandbox(self._id)))
        return self._info

    def resume(self) -> SandboxInfo:
        """Thaw a paused sandbox where it stopped, or wake a hibernated one, with the lifetime
        it had left (a fresh ``timeout`` if its timeout put it to sleep); a running one is
        answered as it is."""
        self._info = SandboxInfo.from_json(self._http.json(calls.resume_sandbox(self._id)))
        return self._info

    def snapshot(self, name: str | None = None) -> Snapshot:
        """Save the sandbox's files as they are now (processes keep running; a microvm's
        snapshot holds its memory and processes too, and it stops for the save); the snapshot
        outlives the sandbox until ``delete_snapshot``. ``name`` (default: the snapshot's id)
        must be unique among this sandbox's snapshots, else ``ConflictError``."""
        return Snapshot.from_json(self._http.json(calls.create_snapshot(self._id, name)))

    def snapshots(self) -> builtins.list[Snapshot]:
        """The snapshots taken of this sandbox, newest first."""
        obj = self._http.json(calls.sandbox_snapshots(self._id))
        return [Snapshot.from_json(s) for s in parse_list(obj, "snapshot")]

    def restore(self, snapshot: SnapshotRef) -> None:
        """Roll the sandbox's files back to ``snapshot`` (a ``Snapshot``, its id, or its name
        among this sandbox's snapshots). A container's processes stop and start afresh; a
        microvm carries on from the snapshot's processes. The id stays, the address may
        change."""
        call = calls.restore_sandbox(self._id, snapshot)
        self._info = SandboxInfo.from_json(self._http.json(call))

    def kill(self) -> None:
        """Stop the sandbox and discard it; a second kill is harmless."""
        self._http.send(calls.delete_sandbox(self._id))

    def close(self) -> None:
        """Release the HTTP connections; the sandbox itself keeps running."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        except NotFoundError:
            pass
        except CorralError:
            # Do not hide the error that ended the block behind a failed cleanup.
            if exc is None:
                raise
        finally:
            self.close()


class Client:
    """Calls that are not about one sandbox: templates, warm pools, health, who the key
    belongs to."""

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None) -> None:
        self._http = SyncHttp(resolve_config(api_key, base_url))

    @property
    def base_url(self) -> str:
        return self._http.config.base_url

    def health(self) -> dict[str, Any]:
        obj = self._http.json(calls.health())
        return dict(obj) if isinstance(obj, dict) else {}

    def me(self) -> dict[str, Any]:
        obj = self._http.json(calls.me())
        return dict(obj) if isinstance(obj, dict) else {}

    def list_templates(self) -> builtins.list[TemplateInfo]:
        obj = self._http.json(calls.list_templates())
        return [TemplateInfo.from_json(t) for t in parse_list(obj, "template")]

    def build_template(self, name: str, *, force: bool = False) -> TemplateInfo:
        """Build (or with ``force`` rebuild) a built-in template (``minimal``, ``base``; admin
        key only); blocks until the build is done."""
        return TemplateInfo.from_json(self._http.json(calls.build_template(name, force)))

    def get_template(self, ref: str) -> TemplateInfo:
        """A template version by ``NAME`` (its ``latest``), ``NAME:TAG`` or ``NAME@N``."""
        return TemplateInfo.from_json(self._http.json(calls.get_template(ref)))

    def list_template_versions(self, name: str) -> builtins.list[TemplateInfo]:
        """Every version of template ``name``, oldest first."""
        obj = self._http.json(calls.template_versions(name))
        return [TemplateInfo.from_json(t) for t in parse_list(obj, "template")]

    def build_template_from_dockerfile(
        self,
        name: str,
        context: str | os.PathLike[str] = ".",
        *,
        dockerfile: str | os.PathLike[str] = "Dockerfile",
        dockerfile_text: str | None = None,
        tag: str | None = None,
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        network: str | None = None,
        ready_cmd: str | None = None,
        ready_timeout: float | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """Build a new version of template ``name`` from a Dockerfile; see ``Template.build``."""
        ctx = build_context(context, dockerfile, dockerfile_text)
        call = calls.build_template_dockerfile(
            name,
            ctx.dockerfile,
            tag=tag,
            build_args=build_args,
            no_cache=no_cache,
            network=network,
            ready_cmd=ready_cmd,
            ready_timeout=ready_timeout,
        )
        return self._follow(call, ctx.chunks(), on_event, "build")

    def import_template_image(
        self,
        name: str,
        image: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """Add a version of template ``name`` from a registry image; see
        ``Template.import_image``."""
        call = calls.import_template_image(name, image, username, password, tag)
        return self._follow(call, None, on_event, "import")

    def import_template_archive(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        tag: str | None = None,
        on_event: BuildEventCallback | None = None,
    ) -> TemplateInfo:
        """Add a version of template ``name`` from a ``docker save`` or OCI-layout tarball;
        see ``Template.import_archive``."""
        archive = check_file(path, "image archive")
        call = calls.import_template_archive(name, tag)
        return self._follow(call, file_chunks(archive), on_event, "import")

    def _follow(
        self,
        call: Call,
        content: Iterator[bytes] | None,
        on_event: BuildEventCallback | None,
        what: str,
    ) -> TemplateInfo:
        watcher = BuildWatcher(what)
        lines = self._http.ndjson(call, content)
        # closing(): a callback that raises (or Ctrl-C) drops the connection, which stops the
        # build on the server.
        with closing(lines):
            for obj in lines:
                event = watcher.add(obj)
                if on_event is not None:
                    on_event(event)
                watcher.check(event)
                if watcher.finished:
                    break
        return watcher.result()

    def tag_template(self, name: str, tag: str, version: int) -> TemplateInfo:
        """Point ``name:tag`` at version ``version`` (moving the tag if it exists)."""
        return TemplateInfo.from_json(self._http.json(calls.tag_template(name, tag, version)))

    def untag_template(self, name: str, tag: str) -> None:
        """Remove tag ``tag`` from template ``name``; the version it pointed at stays."""
        self._http.send(calls.untag_template(name, tag))

    def delete_template(self, ref: str) -> None:
        """Delete every version of ``NAME``, or the one version ``NAME@N`` / ``NAME:TAG``
        names. Running sandboxes keep their files; unused layers are freed."""
        self._http.send(calls.delete_template(ref))

    def gc_templates(self) -> TemplateGcResult:
        """Free the layers no template version, snapshot or sandbox uses (admin key only)."""
        return TemplateGcResult.from_json(self._http.json(calls.gc_templates()))

    def set_pool(
        self,
        name: str,
        template: str,
        size: int,
        *,
        isolation: str | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        vcpus: int | None = None,
    ) -> PoolInfo:
        """Keep ``size`` sandboxes of ``template`` and this shape made in advance, so that
        ``Sandbox.create`` with the same template and shape (and no snapshot) takes one at once
        instead of starting a sandbox; the server refills the pool in the background.

        Creates the pool ``name`` or replaces its settings: a smaller size kills what waits
        beyond it, a new shape kills all that waits (no create could take it any more); sandboxes
        already taken are never touched. ``size`` 0 keeps the pool with nothing ready. Shape
        arguments left out take the server's create defaults, as they do at create. Answers the
        pool as it is now (``ready`` counts up while it fills); ``QuotaExceededError`` beyond the
        tenant's pooled limit."""
        call = calls.set_pool(name, template, size, isolation, cpu, memory_mb, disk_mb, vcpus)
        return PoolInfo.from_json(self._http.json(call))

    def list_pools(self) -> builtins.list[PoolInfo]:
        """This key's tenant's pools, with how many sandboxes each has ready now."""
        obj = self._http.json(calls.list_pools())
        return [PoolInfo.from_json(p) for p in parse_list(obj, "pool")]

    def get_pool(self, name: str) -> PoolInfo:
        """One pool (``NotFoundError`` if there is none by that name)."""
        return PoolInfo.from_json(self._http.json(calls.get_pool(name)))

    def delete_pool(self, name: str) -> None:
        """Delete a pool and kill the sandboxes waiting in it; sandboxes already taken from it
        go on (``NotFoundError`` if there is none by that name)."""
        self._http.send(calls.delete_pool(name))

    def set_secret(self, name: str, value: str) -> SecretInfo:
        """Create the tenant secret ``name`` or replace its value; see ``corral.secrets.set``."""
        return SecretInfo.from_json(self._http.json(calls.put_secret(name, value)))

    def list_secrets(self) -> builtins.list[SecretInfo]:
        """The tenant's secrets by name (names and times; values are never answered)."""
        obj = self._http.json(calls.list_secrets())
        return [SecretInfo.from_json(s) for s in parse_secret_list(obj)]

    def get_secret(self, name: str) -> SecretInfo:
        """One secret's name and times (``NotFoundError`` if there is none by that name)."""
        return SecretInfo.from_json(self._http.json(calls.get_secret(name)))

    def delete_secret(self, name: str) -> None:
        """Delete a secret (``NotFoundError`` if there is none by that name)."""
        self._http.send(calls.delete_secret(name))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
