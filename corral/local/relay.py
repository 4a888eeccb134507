"""The in-sandbox end of local mode's network (docs/local.md).

``relay.py --dir /run/corral-net -- CMD...`` (``LocalNetwork.wrap`` runs the copy it puts in that
directory; ``python -m corral.local.relay`` works as well) is the first process the jail starts
in the sandbox's network namespace, where the only interface is ``lo``. It listens on
``127.0.0.1:3128`` (and ``[::1]:3128`` when the namespace has IPv6), then execs CMD, so CMD
keeps the relay's process id, exit status and terminal. A forked child stays behind and copies
every accepted connection, byte for byte, to the unix socket ``<dir>/proxy.sock``: the host-side
egress proxy (``corral.local.net``), which speaks HTTP proxy protocol and checks each request
against the allowed domains. CMD finds the relay through the ``HTTP(S)_PROXY`` variables.

The relay holds no authority. The sandbox can reach ``proxy.sock`` directly, and everything
arriving there is that sandbox's traffic, checked by the proxy; the relay only turns TCP on
loopback (what proxy-aware programs speak) into that. Killing it just ends networking (fail
closed), and a program ignoring the proxy variables has no route anywhere.

Lifetime: the child sets ``PR_SET_PDEATHSIG`` (SIGKILL) so it dies with CMD, even without a
pid namespace; with one (the jail always makes one) the kernel also kills it when the
namespace's init exits. It leaves CMD's session (``setsid``), so terminal signals such as
Ctrl-C reach CMD and not the relay, and it drops every inherited descriptor, so it never
keeps CMD's terminal or pipes open.

No DNS inside: answering on ``127.0.0.1:53`` needs CAP_NET_BIND_SERVICE in the namespace's
user namespace (the jail drops every capability) or a lower ``ip_unprivileged_port_start``
(writable only with CAP_NET_ADMIN there), and resolv.conf cannot name another port. So
``getaddrinfo`` fails at once (the nameserver it tries has no route, or is a loopback address
where nothing answers), no query leaves the sandbox at all, and HTTP clients never need it: through a proxy they send the name, which the
proxy resolves itself.

Only the standard library, and little of it before the exec: this runs on every start.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import threading
    from collections.abc import Callable, Sequence
    from typing import NoReturn

__all__ = ["PORT", "SOCKET_NAME", "main"]

PORT = 3128
SOCKET_NAME = "proxy.sock"
_USAGE = "usage: python -m corral.local.relay --dir DIR [--port PORT] -- CMD [ARG...]"
# Exit status when the relay itself cannot start (as env(1) and chroot(1) use 125).
_SETUP_FAILED = 125
_MAX_CONNECTIONS = 1024
_BUFFER = 64 * 1024
_THREAD_STACK = 256 * 1024
_CONNECT_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9


def _fail(message: str, status: int = _SETUP_FAILED) -> NoReturn:
    sys.stderr.write(f"corral relay: {message}\n")
    sys.stderr.flush()
    os._exit(status)


def parse_args(argv: Sequence[str]) -> tuple[str, int, list[str]]:
    """(socket directory, port, command) from ``--dir DIR [--port PORT] -- CMD...``."""
    directory: str | None = None
    port = PORT
    args = list(argv)
    while args and args[0] != "--":
        flag = args.pop(0)
        if flag not in ("--dir", "--port") or not args:
            raise ValueError(_USAGE)
        value = args.pop(0)
        if flag == "--dir":
            directory = value
        elif value.isdigit() and 0 < int(value) < 65536:
            port = int(value)
        else:
            raise ValueError(f"bad port {value!r}")
    if directory is None or len(args) < 2:
        raise ValueError(_USAGE)
    return directory, port, args[1:]


def _listen(port: int) -> list[_socket.socket]:
    """Listeners on loopback: IPv4 is required, IPv6 only when the namespace has ``::1``.

    ``_socket`` rather than ``socket``: importing the latter costs ~10 ms before the exec.
    """
    found: list[_socket.socket] = []
    for family, address in ((_socket.AF_INET, "127.0.0.1"), (_socket.AF_INET6, "::1")):
        sock = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            if family == _socket.AF_INET6:
                sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if family == _socket.AF_INET:
                for other in found:
                    other.close()
                _fail(f"cannot listen on {address}:{port}: {exc.strerror or exc}")
            continue
        found.append(sock)
    return found


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        directory, port, command = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _fail(str(exc), 2)
    listeners = _listen(port)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        _fail(f"cannot fork: {exc.strerror or exc}")
    if pid == 0:
        try:
            _relay(listeners, os.path.join(directory, SOCKET_NAME), parent)
        finally:
            os._exit(0)
    for sock in listeners:
        sock.close()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        # As shells report it: 127 when there is no such command, 126 when it cannot run.
        missing = isinstance(exc, FileNotFoundError)
        _fail(f"{command[0]}: {exc.strerror or exc}", 127 if missing else 126)


# --------------------------------------------------------------------------- the child


def _relay(listeners: list[_socket.socket], target: str, parent: int) -> None:
    """The relay proper; runs until killed (with CMD, or by the sandbox)."""
    _detach(parent, keep=[s.fileno() for s in listeners])
    import socket
    import threading

    threading.stack_size(_THREAD_STACK)
    slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
    accepting = []
    for raw in listeners:
        listener = socket.socket(fileno=raw.detach())
        thread = threading.Thread(target=_accept, args=(listener, target, slots), daemon=True)
        thread.start()
        accepting.append(thread)
    for thread in accepting:
        thread.join()


def _detach(parent: int, keep: list[int]) -> None:
    """Die with ``parent``, leave its session and terminal, hold none of its descriptors."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(0)  # cannot be tied to CMD, or CMD is already gone: nothing to serve
    os.setsid()
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        null = -1
    for fd in (0, 1, 2):
        if null >= 0:
            os.dup2(null, fd)
        else:
            os.close(fd)
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)  # close_range(2) underneath: cheap however large


def _accept(listener: socket.socket, target: str, slots: threading.BoundedSemaphore) -> None:
    import errno
    import threading
    import time

    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)  # the sandbox's own limits: wait for descriptors to free up
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                continue
            return
        if not slots.acquire(blocking=False):
            _reset(client)  # over the limit: refuse at once rather than queue
            continue
        try:
            threading.Thread(target=_serve, args=(client, target, slots), daemon=True).start()
        except RuntimeError:  # no thread to be had
            slots.release()
            _reset(client)


def _serve(client: socket.socket, target: str, slots: threading.BoundedSemaphore) -> None:
    import socket

    try:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        _reset(client)
        slots.release()
        return
    try:
        upstream.settimeout(_CONNECT_TIMEOUT)
        upstream.connect(target)
        upstream.settimeout(None)
    except OSError:
        # The proxy is gone (local mode is ending): the client fails now, not after a timeout.
        upstream.close()
        _reset(client)
        slots.release()
        return
    _Splice(client, upstream, slots.release).run()


class _Splice:
    """Both directions of one relayed connection, a thread each (blocking reads and writes)."""

    def __init__(
        self, client: socket.socket, upstream: socket.socket, done: Callable[[], None]
    ) -> None:
        import threading

        self.client = client
        self.upstream = upstream
        self.done = done
        self.lock = threading.Lock()
        self.left = 2
        self.failed = False

    def run(self) -> None:
        import threading

        back = threading.Thread(target=self._copy, args=(self.upstream, self.client), daemon=True)
        try:
            back.start()
        except RuntimeError:  # no thread to be had
            self.left = 1
            self.failed = True
            self._end(failed=True)
            return
        self._copy(self.client, self.upstream)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        import contextlib
        import socket

        failed = False
        try:
            while data := src.recv(_BUFFER):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        except OSError:
            failed = True
            # Wake the other direction: its blocking recv returns once both are shut down.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._end(failed)

    def _end(self, failed: bool) -> None:
        with self.lock:
            self.failed = self.failed or failed
            self.left -= 1
            if self.left:
                return
        self.upstream.close()
        if self.failed:
            _reset(self.client)  # a broken side reaches the client as a reset
        else:
            self.client.close()
        self.done()


def _reset(sock: socket.socket) -> None:
    """Close with RST, so the client fails at once instead of waiting."""
    import contextlib
    import socket
    import struct

    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


if __name__ == "__main__":
    main()
