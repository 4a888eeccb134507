"""Under real ``bwrap --seccomp``, local mode's filter refuses every forbidden call, with or without capabilities, while ordinary work goes on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from corral.local.seccomp import local_filter, syscall_numbers
from tests.conftest import LeakWatch

BWRAP = shutil.which("bwrap")
# The system interpreter: readable by an unprivileged user, unlike a pyenv under /root.
PYTHON = "/usr/bin/python3"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = [
    pytest.mark.security,
    pytest.mark.skipif(BWRAP is None, reason="needs bubblewrap (apt-get install bubblewrap)"),
    pytest.mark.skipif(not Path(PYTHON).exists(), reason=f"needs {PYTHON}"),
    pytest.mark.skipif(
        platform.machine() not in ("x86_64", "aarch64"), reason="local mode: x86_64, aarch64"
    ),
]

# Runs inside the sandbox. Every probe runs in a child of its own (a probe that succeeds may
# change the process: a new namespace, a persona) and reports "ok", an errno name, or the
# signal that killed it. Prints one JSON object; decides nothing.
PROBES = r"""
import ctypes, errno, fcntl, json, mmap, os, platform, signal, socket, struct, subprocess, sys
import tempfile, threading, time

NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X86 = platform.machine() == "x86_64"
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_FS = 0x20000, 0x10000000, 0x40000000, 0x200
SIGCHLD, TIOCSTI, TIOCSCTTY, TIOCGWINSZ = 17, 0x5412, 0x540E, 0x5413


def arg(a):
    if isinstance(a, int):
        return ctypes.c_ulong(a & (2**64 - 1))
    return a


def sc(name_or_nr, *args):
    nr = NR[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
    ret = libc.syscall(ctypes.c_long(nr), *map(arg, args))
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def probe(fn):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


def fork_with_clone(flags):
    pid = sc("clone", flags | SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def controlling_pty():
    os.setsid()
    master, slave = os.openpty()
    fcntl.ioctl(slave, TIOCSCTTY, 0)
    return slave


def tiocsti():
    fcntl.ioctl(controlling_pty(), TIOCSTI, b"x")


def tiocsti_high_bits():
    # CVE-2019-10063: the kernel uses only the low 32 bits of the request.
    sc("ioctl", controlling_pty(), (1 << 32) | TIOCSTI, ctypes.c_char_p(b"x"))


def int80_getpid():
    # A 64-bit process entering the i386 ABI: mov eax, 20 (getpid); int 0x80; ret
    code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ret = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
    if ret < 0:
        raise OSError(-ret, "int 0x80")


def x32_getpid():
    sc(0x40000000 | 39)


def io_uring():
    params = ctypes.create_string_buffer(120)
    os.close(sc("io_uring_setup", 1, params))


def thread():
    out = []
    t = threading.Thread(target=lambda: out.append(1))
    t.start()
    t.join()
    assert out == [1]


def shell():
    subprocess.run(["sh", "-c", "test $((1 + 1)) = 2"], check=True)


def git_init():
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["git", "init", "-q", d], check=True, env={**os.environ, "HOME": d})


def inet():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as c:
            conn, _ = srv.accept()
            c.sendall(b"hi")
            assert conn.recv(2) == b"hi"
            conn.close()


def inet6():
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()


def unix_pair():
    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall(b"hi")
    assert b.recv(2) == b"hi"


def netlink():
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()


def winsize():
    master, slave = os.openpty()
    fcntl.ioctl(slave, TIOCGWINSZ, b"\0" * 8)


def strace():
    subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], check=True)


def status(pid="self"):
    lines = open(f"/proc/{pid}/status").read().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {k: fields[k].strip() for k in ("Seccomp", "NoNewPrivs", "CapEff")}


victim = os.fork()
if victim == 0:
    time.sleep(120)
    os._exit(0)

forbidden = {
    "unshare_user": lambda: sc("unshare", CLONE_NEWUSER),
    "unshare_mount": lambda: sc("unshare", CLONE_NEWNS),
    "unshare_net": lambda: sc("unshare", CLONE_NEWNET),
    "clone_newuser": lambda: fork_with_clone(CLONE_NEWUSER),
    "clone_newns": lambda: fork_with_clone(CLONE_NEWNS),
    "clone3": lambda: sc("clone3", 0, 0),
    "setns": lambda: sc("setns", os.open("/proc/self/ns/uts", os.O_RDONLY), 0),
    "mount": lambda: sc("mount", b"none", b"/mnt", b"tmpfs", 0, None),
    "umount2": lambda: sc("umount2", b"/etc", 2),
    "pivot_root": lambda: sc("pivot_root", b"/", b"/"),
    "fsopen": lambda: sc("fsopen", b"tmpfs", 0),
    "open_tree": lambda: sc("open_tree", -100, b"/", 0),
    "move_mount": lambda: sc("move_mount", -1, b"", -1, b"", 0),
    "mount_setattr": lambda: sc("mount_setattr", -1, b"", 0, None, 0),
    "io_uring_setup": io_uring,
    "socket_alg": lambda: socket.socket(38, 5).close(),
    "socket_vsock": lambda: socket.socket(40, socket.SOCK_STREAM).close(),
    "socket_packet": lambda: socket.socket(17, socket.SOCK_RAW, 0).close(),
    "tiocsti": tiocsti,
    "tiocsti_high_bits": tiocsti_high_bits,
    "keyctl": lambda: sc("keyctl", 0, 2**64 - 3, 0),
    "add_key": lambda: sc("add_key", b"user", b"k", b"v", 1, 2**64 - 3),
    "bpf": lambda: sc("bpf", 0, None, 0),
    "perf_event_open": lambda: sc("perf_event_open", None, 0, -1, -1, 0),
    "userfaultfd": lambda: sc("userfaultfd", 0),
    "open_by_handle_at": lambda: sc("open_by_handle_at", -1, None, 0),
    "init_module": lambda: sc("init_module", None, 0, b""),
    "kexec_load": lambda: sc("kexec_load", 0, 0, None, 0),
    "reboot": lambda: sc("reboot", 0, 0, 0, None),
    "swapon": lambda: sc("swapon", b"/nonexistent", 0),
    "syslog": lambda: sc("syslog", 10, None, 0),
    "ptrace_attach": lambda: sc("ptrace", 16, victim, 0, 0),
    "ptrace_seize": lambda: sc("ptrace", 0x4206, victim, 0, 0),
    "process_vm_readv": lambda: sc("process_vm_readv", victim, None, 0, None, 0, 0),
    "pidfd_getfd": lambda: sc("pidfd_getfd", -1, 0, 0),
    "personality_page_zero": lambda: sc("personality", 0x0100000),
    "x32": x32_getpid if X86 else (lambda: None),
    "int80": int80_getpid if X86 else (lambda: None),
    "newer_syscall": lambda: sc(1000),
}
allowed = {
    "thread": thread,
    "shell": shell,
    "git_init": git_init,
    "socket_inet": inet,
    "socket_inet6": inet6,
    "socketpair_unix": unix_pair,
    "socket_netlink": netlink,
    "unshare_fs": lambda: sc("unshare", CLONE_FS),
    "personality_query": lambda: sc("personality", 0xFFFFFFFF),
    "personality_no_aslr": lambda: sc("personality", 0x0040000),
    "tiocgwinsz": winsize,
    "strace": strace,
}
results = {name: probe(fn) for name, fn in {**forbidden, **allowed}.items()}
os.kill(victim, signal.SIGKILL)
os.waitpid(victim, 0)
print(json.dumps({"results": results, "status": status(), "init": status(1)}))
"""

FORBIDDEN = {
    "unshare_user": "EPERM",
    "unshare_mount": "EPERM",
    "unshare_net": "EPERM",
    "clone_newuser": "EPERM",
    "clone_newns": "EPERM",
    "clone3": "ENOSYS",
    "setns": "EPERM",
    "mount": "EPERM",
    "umount2": "EPERM",
    "pivot_root": "EPERM",
    "fsopen": "EPERM",
    "open_tree": "EPERM",
    "move_mount": "EPERM",
    "mount_setattr": "EPERM",
    "io_uring_setup": "EPERM",
    "socket_alg": "EAFNOSUPPORT",
    "socket_vsock": "EAFNOSUPPORT",
    "socket_packet": "EAFNOSUPPORT",
    "tiocsti": "EPERM",
    "tiocsti_high_bits": "EPERM",
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "bpf": "EPERM",
    "perf_event_open": "EPERM",
    "userfaultfd": "EPERM",
    "open_by_handle_at": "EPERM",
    "init_module": "EPERM",
    "kexec_load": "EPERM",
    "reboot": "EPERM",
    "swapon": "EPERM",
    "syslog": "EPERM",
    "ptrace_attach": "EPERM",
    "ptrace_seize": "EPERM",
    "process_vm_readv": "EPERM",
    "pidfd_getfd": "EPERM",
    "personality_page_zero": "EPERM",
    "newer_syscall": "ENOSYS",
}
X86_ONLY = {"x32": "SIGSYS", "int80": "SIGSYS"}
ALLOWED = [
    "thread",
    "shell",
    "git_init",
    "socket_inet",
    "socket_inet6",
    "socketpair_unix",
    "socket_netlink",
    "unshare_fs",
    "personality_query",
    "personality_no_aslr",
    "tiocgwinsz",
    # gdb ./prog and strace CMD: tracing one's own children (PTRACE_TRACEME) still works.
    *(["strace"] if shutil.which("strace") else []),
]


@pytest.fixture(params=["root", "user"])
def as_user(request: pytest.FixtureRequest) -> list[str]:
    """Prefix that runs bwrap as root (bwrap then keeps every capability inside its user
    namespace) or as an unprivileged user (no capabilities at all)."""
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("needs root")
        return []
    return NOBODY if os.geteuid() == 0 else []


def jailed(
    prefix: Sequence[str], argv: Sequence[str], *, seccomp: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a bwrap sandbox shaped like local mode's (new user, pid, net, ipc and
    uts namespaces; read-only root; fresh /tmp), with or without the filter."""
    assert BWRAP is not None
    cmd = [*prefix, BWRAP, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc"]
    cmd += ["--unshare-uts", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc"]
    cmd += ["--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp", "--setenv", "HOME", "/tmp"]
    read_fd = None
    if seccomp:
        # bwrap reads the program from the fd to its end: a pipe holds it whole (< 64 KiB).
        read_fd, write_fd = os.pipe()
        program = local_filter()
        assert len(program) < 65536
        os.write(write_fd, program)
        os.close(write_fd)
        cmd += ["--seccomp", str(read_fd)]
    try:
        return subprocess.run(
            [*cmd, "--", *argv],
            pass_fds=[read_fd] if read_fd is not None else [],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        if read_fd is not None:
            os.close(read_fd)


def run_probes(prefix: Sequence[str], *, seccomp: bool) -> dict[str, object]:
    numbers = json.dumps(dict(syscall_numbers()))
    proc = jailed(prefix, [PYTHON, "-c", PROBES, numbers], seccomp=seccomp)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_forbidden_calls_fail_and_ordinary_work_goes_on(
    as_user: list[str], no_leaks: LeakWatch
) -> None:
    out = run_probes(as_user, seccomp=True)
    results = out["results"]
    assert isinstance(results, dict)
    status = out["status"]
    assert isinstance(status, dict)
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    # bwrap's own pid-1 init runs under the filter too: no unfiltered process in the pid
    # namespace that a ptrace or /proc/1/mem write could turn into a way around it.
    init = out["init"]
    assert isinstance(init, dict)
    assert init["Seccomp"] == "2"
    expected = dict(FORBIDDEN)
    if platform.machine() == "x86_64":
        expected.update(X86_ONLY)
    assert {k: results[k] for k in expected} == expected
    assert {k: results[k] for k in ALLOWED} == dict.fromkeys(ALLOWED, "ok")


def test_without_the_filter_the_probes_would_succeed(
    as_user: list[str], no_leaks: LeakWatch
) -> None:
    """The control run: the same sandbox without the filter lets through what the filtered one
    refuses, so the refusals above are the filter's doing and not the namespaces'."""
    with_filter = run_probes(as_user, seccomp=True)["results"]
    without = run_probes(as_user, seccomp=False)["results"]
    assert isinstance(with_filter, dict) and isinstance(without, dict)
    assert {k: without[k] for k in ALLOWED} == dict.fromkeys(ALLOWED, "ok")
    succeeded = {k for k in FORBIDDEN if without[k] == "ok"}
    # A nested user namespace, TIOCSTI on the controlling tty (dev.tty.legacy_tiocsti=1 here or
    # EIO), attaching to a sibling: possible for anyone unless this filter refuses them.
    must = {"unshare_user", "clone_newuser", "ptrace_attach", "ptrace_seize", "process_vm_readv"}
    if Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() == "0":
        must.add("io_uring_setup")
    if Path("/proc/sys/dev/tty/legacy_tiocsti").read_text().strip() == "1":
        must |= {"tiocsti", "tiocsti_high_bits"}
    if not as_user:
        # bwrap run by root keeps every capability inside: mounts and namespaces just work.
        must |= {"unshare_mount", "unshare_net", "clone_newns", "mount", "fsopen", "open_tree"}
    assert must <= succeeded, sorted(must - succeeded)
    if platform.machine() == "x86_64" and without["int80"] == "ok":
        assert with_filter["int80"] == "SIGSYS"


@pytest.mark.parametrize("argv", [["unshare", "-U", "true"], ["unshare", "-m", "true"]])
def test_unshare_command_fails(as_user: list[str], argv: list[str], no_leaks: LeakWatch) -> None:
    proc = jailed(as_user, argv)
    assert proc.returncode != 0
    assert "Operation not permitted" in proc.stderr


def test_shell_pipeline_python_and_git_work(as_user: list[str], no_leaks: LeakWatch) -> None:
    script = (
        "set -e; echo hello | tr h H; "
        f"{PYTHON} -c 'import threading, socket; t = threading.Thread(target=print); t.start(); "
        "t.join(); socket.socket(socket.AF_INET).close(); socket.socketpair()'; "
        "git init -q /tmp/repo && git -C /tmp/repo status --short && echo done"
    )
    proc = jailed(as_user, ["sh", "-c", script])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "Hello"
    assert proc.stdout.splitlines()[-1] == "done"
