"""What E2B's in-sandbox daemon (envd) does, done by corral's agent from the host.

The E2B-compatible API (``corral.api.e2b``) speaks envd's wire format; this service holds the
rules behind it: the per-sandbox access token and signed file URLs, which user and directory a
request runs as, the processes started through it (so that they can be listed with their
configuration and found by tag), and directory watchers that are polled rather than streamed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent import AgentClient, FileInfo, WatchEvent
from corral.core.lifecycle import SandboxState
from corral.core.sandboxes import Sandbox, SandboxService
from corral.core.tenants import Principal
from corral.errors import (
    AuthenticationError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
    SandboxNotRunningError,
)

__all__ = ["EnvdService", "StartedProcess", "User", "Watcher"]

_KEY_FILE = "envd-token.key"
_USERS_TTL = 5.0  # seconds a sandbox's /etc/passwd and /etc/group are trusted
_WATCHER_IDLE = 600.0  # a polled watcher nobody asked for this long is dropped
_MAX_WATCHERS = 64  # per sandbox
_MAX_PENDING_EVENTS = 10_000  # per polled watcher; beyond, the watcher fails


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class StartedProcess:
    """What a process was started with, as envd reports it back in ``List``."""

    cmd: str
    args: tuple[str, ...]
    envs: Mapping[str, str]
    cwd: str | None
    tag: str | None


@dataclass
class Watcher:
    """A watch polled with ``GetWatcherEvents``: events wait here between polls."""

    id: str
    sandbox_id: str
    root: str = "/"  # the watched directory
    include_entry: bool = False  # events carry the entry's info (envd 0.6.3)
    events: deque[WatchEvent] = field(default_factory=deque)
    error: CorralError | None = None
    last_poll: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None


@dataclass
class _Accounts:
    at: float
    users: dict[str, User]
    by_uid: dict[int, str]
    groups: dict[int, str]


def _parse_passwd(text: str) -> tuple[dict[str, User], dict[int, str]]:
    users: dict[str, User] = {}
    by_uid: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 7 or not parts[0]:
            continue
        try:
            uid, gid = int(parts[2]), int(parts[3])
        except ValueError:
            continue
        users.setdefault(parts[0], User(parts[0], uid, gid, parts[5] or "/"))
        by_uid.setdefault(uid, parts[0])
    return users, by_uid


def _parse_group(text: str) -> dict[int, str]:
    groups: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0]:
            with contextlib.suppress(ValueError):
                groups.setdefault(int(parts[2]), parts[0])
    return groups


class EnvdService:
    def __init__(self, data_dir: Path, sandboxes: SandboxService) -> None:
        self._key_path = data_dir / _KEY_FILE
        self._key = b""
        self._sandboxes = sandboxes
        self._accounts: dict[str, _Accounts] = {}
        self._started: dict[tuple[str, int], StartedProcess] = {}
        self._watchers: dict[str, Watcher] = {}
        self._prune_at = 64

    def start(self) -> None:
        """Load (or make, on first start) the key every sandbox's access token derives from,
        so that tokens survive restarts without being stored."""
        try:
            self._key = self._key_path.read_bytes()
        except FileNotFoundError:
            key = secrets.token_bytes(32)
            fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            self._key = key
        if len(self._key) < 32:
            raise InvalidRequestError(f"{self._key_path} is shorter than 32 bytes")

    async def stop(self) -> None:
        for w in list(self._watchers.values()):
            await self._drop_watcher(w)

    # --- credentials --------------------------------------------------------------------
    def token(self, sandbox_id: str) -> str:
        """The sandbox's envd access token: whoever holds it can run anything in the sandbox,
        and nothing else. Derived, not stored: it dies with the key file."""
        mac = hmac.new(self._key, b"envd:" + sandbox_id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def owner(self, sandbox_id: str, token: str | None) -> Principal:
        """Who acts for a request that carries this sandbox's access token."""
        sb = self._sandboxes.live_sandbox(sandbox_id)
        if sb is None or sb.state is SandboxState.POOLED:
            raise SandboxNotRunningError(f"The sandbox {sandbox_id} was not found")
        if token is None or not hmac.compare_digest(token, self.token(sandbox_id)):
            raise AuthenticationError("missing or wrong X-Access-Token for this sandbox")
        return Principal(tenant_id=sb.tenant_id, admin=False, key_id=f"envd:{sandbox_id}")

    def signature(
        self, sandbox_id: str, path: str, operation: str, user: str, expiration: int | None
    ) -> str:
        """A signed file URL's signature, computed as E2B's SDKs compute it."""
        raw = f"{path}:{operation}:{user}:{self.token(sandbox_id)}"
        if expiration is not None:
            raw += f":{expiration}"
        digest = hashlib.sha256(raw.encode()).digest()
        return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()

    def signed_owner(
        self,
        sandbox_id: str | None,
        path: str,
        operation: str,
        user: str,
        signature: str,
        expiration: int | None,
    ) -> tuple[str, Principal]:
        """The sandbox (and its owner) a signed file URL is for.

        A URL made against ``E2B_SANDBOX_URL`` names no sandbox; the signature does, since only
        one sandbox's token produces it, so without ``sandbox_id`` every live one is tried.
        """
        if expiration is not None and expiration < time.time():
            raise AuthenticationError("the signed URL has expired")
        candidates: list[Sandbox]
        if sandbox_id is not None:
            sb = self._sandboxes.live_sandbox(sandbox_id)
            candidates = [sb] if sb is not None else []
        else:
            candidates = self._sandboxes.live_sandboxes()
        for sb in candidates:
            want = self.signature(sb.id, path, operation, user, expiration)
            if hmac.compare_digest(want, signature):
                return sb.id, Principal(sb.tenant_id, admin=False, key_id=f"envd:{sb.id}")
        raise AuthenticationError("the file URL's signature matches no sandbox")

    # --- users --------------------------------------------------------------------------
    async def _accounts_of(self, agent: AgentClient, sandbox_id: str) -> _Accounts:
        got = self._accounts.get(sandbox_id)
        if got is not None and time.monotonic() - got.at < _USERS_TTL:
            return got

        async def read(path: str) -> str:
            try:
                return b"".join([c async for c in agent.read_file(path)]).decode(errors="replace")
            except NotFoundError:
                return ""

        self._prune()
        users, by_uid = _parse_passwd(await read("/etc/passwd"))
        got = _Accounts(time.monotonic(), users, by_uid, _parse_group(await read("/etc/group")))
        self._accounts[sandbox_id] = got
        return got

    async def user(self, agent: AgentClient, sandbox_id: str, name: str | None) -> User:
        """The user a request runs as: the one it names, else the template's USER, else
        ``user`` (E2B's default account) when the image has it, else root."""
        accounts = await self._accounts_of(agent, sandbox_id)
        if name is None:
            _, template_user = self._sandboxes.exec_defaults(sandbox_id)
            name = template_user or ("user" if "user" in accounts.users else "root")
        found = accounts.users.get(name)
        if found is None and name.isdigit():
            uid = int(name)
            found = User(accounts.by_uid.get(uid, name), uid, uid, "/")
        if found is None:
            if name == "root":
                return User("root", 0, 0, "/root")
            raise InvalidRequestError(f"no user {name!r} in the sandbox")
        return found

    def workdir(self, sandbox_id: str, user: User) -> str:
        """Where a command runs when it names no directory: the template's WORKDIR, else the
        user's home (as envd does)."""
        cwd, _ = self._sandboxes.exec_defaults(sandbox_id)
        return cwd or user.home

    @staticmethod
    def resolve(path: str, user: User) -> str:
        """envd's paths: relative ones (and ``~``) are below the user's home."""
        if path == "~" or path.startswith("~/"):
            path = user.home.rstrip("/") + path[1:]
        elif not path.startswith("/"):
            path = user.home.rstrip("/") + "/" + path
        if "\0" in path:
            raise InvalidRequestError("path must not contain NUL bytes")
        return path

    async def names(self, agent: AgentClient, sandbox_id: str, info: FileInfo) -> tuple[str, str]:
        """The owner and group names of a file, as ``ls -l`` would show them."""
        accounts = await self._accounts_of(agent, sandbox_id)
        return (
            accounts.by_uid.get(info.uid, str(info.uid)),
            accounts.groups.get(info.gid, str(info.gid)),
        )

    # --- processes ----------------------------------------------------------------------
    def remember(self, sandbox_id: str, pid: int, started: StartedProcess) -> None:
        self._prune()
        self._started[(sandbox_id, pid)] = started

    def _prune(self) -> None:
        """Forget sandboxes that ended however they ended (a timeout, a kill elsewhere); run
        when the tables have doubled since the last time, so it costs O(1) per call overall."""
        size = len(self._started) + len(self._accounts) + len(self._watchers)
        if size < self._prune_at:
            return
        self._expire_watchers()
        for sid in {sid for sid, _ in self._started} | set(self._accounts):
            if self._sandboxes.live_sandbox(sid) is None:
                self.forget(sid)
        self._prune_at = 2 * (len(self._started) + len(self._accounts) + len(self._watchers)) + 64

    def started(self, sandbox_id: str, pid: int) -> StartedProcess | None:
        return self._started.get((sandbox_id, pid))

    def forget_exited(self, sandbox_id: str, running: set[int]) -> None:
        for key in [k for k in self._started if k[0] == sandbox_id and k[1] not in running]:
            del self._started[key]

    def forget(self, sandbox_id: str) -> None:
        """Drop what is known of a sandbox that is gone, its watchers included."""
        self._accounts.pop(sandbox_id, None)
        for key in [k for k in self._started if k[0] == sandbox_id]:
            del self._started[key]
        for w in [w for w in self._watchers.values() if w.sandbox_id == sandbox_id]:
            self._watchers.pop(w.id, None)
            if w.task is not None:
                w.task.cancel()

    # --- polled watchers ----------------------------------------------------------------
    def add_watcher(
        self,
        sandbox_id: str,
        events: AsyncIterator[WatchEvent],
        *,
        root: str,
        include_entry: bool = False,
    ) -> Watcher:
        """Keep following ``events`` (an armed watch) until the watcher is removed, left
        unpolled, or its sandbox goes away."""
        self._prune()
        self._expire_watchers()
        if sum(1 for w in self._watchers.values() if w.sandbox_id == sandbox_id) >= _MAX_WATCHERS:
            raise QuotaExceededError(f"a sandbox may have at most {_MAX_WATCHERS} watchers")
        w = Watcher(
            id="w_" + secrets.token_urlsafe(12),
            sandbox_id=sandbox_id,
            root=root,
            include_entry=include_entry,
        )
        w.task = asyncio.create_task(self._follow(w, events), name=f"watcher-{w.id}")
        self._watchers[w.id] = w
        return w

    async def _follow(self, w: Watcher, events: AsyncIterator[WatchEvent]) -> None:
        try:
            async for ev in events:
                if len(w.events) >= _MAX_PENDING_EVENTS:
                    raise QuotaExceededError(
                        f"more than {_MAX_PENDING_EVENTS} events waited unpolled; watch again"
                    )
                w.events.append(ev)
            w.error = SandboxNotRunningError(f"The sandbox {w.sandbox_id} was not found")
        except CorralError as e:
            w.error = e
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def watcher(self, sandbox_id: str, watcher_id: str) -> Watcher:
        w = self._watchers.get(watcher_id)
        if w is None or w.sandbox_id != sandbox_id:
            raise NotFoundError(f"no watcher {watcher_id!r}")
        return w

    def poll(self, sandbox_id: str, watcher_id: str) -> list[WatchEvent]:
        w = self.watcher(sandbox_id, watcher_id)
        w.last_poll = time.monotonic()
        out = list(w.events)
        w.events.clear()
        if not out and w.error is not None:
            self._watchers.pop(w.id, None)
            raise w.error
        return out

    async def remove_watcher(self, sandbox_id: str, watcher_id: str) -> None:
        w = self._watchers.get(watcher_id)
        if w is None or w.sandbox_id != sandbox_id:
            raise NotFoundError(f"no watcher {watcher_id!r}")
        await self._drop_watcher(w)

    async def _drop_watcher(self, w: Watcher) -> None:
        self._watchers.pop(w.id, None)
        if w.task is not None:
            w.task.cancel()
            with contextlib.suppress(BaseException):
                await w.task

    def _expire_watchers(self) -> None:
        now = time.monotonic()
        for w in list(self._watchers.values()):
            gone = self._sandboxes.live_sandbox(w.sandbox_id) is None
            if gone or now - w.last_poll > _WATCHER_IDLE:
                self._watchers.pop(w.id, None)
                if w.task is not None:
                    w.task.cancel()
