"""Local mode's seccomp program is well-formed BPF and, run in an interpreter, does what its policy says."""

from __future__ import annotations

import errno
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import RuntimeFailure
from corral.local import seccomp
from corral.local.seccomp import (
    ARCHES,
    AUDIT_ARCH,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    local_filter,
    syscall_numbers,
)
from tests.unit.bpf import LD_W_ABS, RET_K, check_program, decode, run, seccomp_data

POLICY_PATH = Path(seccomp.__file__).resolve().parent.parent / "resources" / "local-seccomp.json"
POLICY: dict[str, Any] = json.loads(POLICY_PATH.read_text())

AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028
MASK32 = 0xFFFFFFFF


def deny(code: int) -> int:
    return SECCOMP_RET_ERRNO | code


EPERM, ENOSYS, EAFNOSUPPORT = deny(errno.EPERM), deny(errno.ENOSYS), deny(errno.EAFNOSUPPORT)
ALLOW, KILL = SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS


def call(arch: str, name: str, *args: int) -> int:
    return run(
        local_filter(arch), seccomp_data(syscall_numbers(arch)[name], AUDIT_ARCH[arch], args)
    )


@pytest.fixture(params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ------------------------------------------------------------------ a reference reading of the JSON
# A second, straightforward implementation of the policy's documented semantics, to compare the
# compiled program with on many inputs.


def _value(raw: Any) -> int:
    raw = POLICY["constants"].get(raw, raw) if isinstance(raw, str) else raw
    return int(raw, 0) if isinstance(raw, str) else int(raw)


def _holds(cond: dict[str, Any], args: tuple[int, ...]) -> bool:
    arg = args[cond["index"]] & MASK32  # the policy compares low 32 bits only
    values = [
        _value(v) for v in (cond["value"] if isinstance(cond["value"], list) else [cond["value"]])
    ]
    mask = 0
    for v in values:
        mask |= v
    return {
        "eq": arg == values[0],
        "one_of": arg in values,
        "any_bits": bool(arg & mask),
        "bits_outside": bool(arg & ~mask & MASK32),
    }[cond["op"]]


def _ret(action: str) -> int:
    if action == "allow":
        return ALLOW
    if action == "kill":
        return KILL
    return deny(getattr(errno, action))


NEWEST = 471


def reference(arch: str, nr: int, audit_arch: int, args: tuple[int, ...]) -> int:
    if audit_arch != AUDIT_ARCH[arch]:
        return _ret(POLICY["architectures"]["action"])
    unsigned = nr & MASK32
    if unsigned == MASK32:
        return ALLOW
    if arch == "x86_64" and unsigned & 0x40000000:
        return _ret(POLICY["x32"]["action"])
    if unsigned > NEWEST:
        return _ret(POLICY["newerSyscalls"]["action"])
    numbers = syscall_numbers(arch)
    for rule in POLICY["rules"]:
        if any(numbers.get(n) == unsigned for n in rule["names"]) and all(
            _holds(c, args) for c in rule.get("args", [])
        ):
            return _ret(rule["action"])
    return ALLOW


# ------------------------------------------------------------------ structure


def test_program_is_well_formed(arch: str) -> None:
    program = local_filter(arch)
    check_program(program)
    insns = decode(program)
    # First thing: is this the native ABI? (ld arch; jeq AUDIT_ARCH)
    assert insns[0] == (LD_W_ABS, 0, 0, 4)
    assert insns[1][0] == 0x15 and insns[1][3] == AUDIT_ARCH[arch]
    assert insns[-1] == (RET_K, 0, 0, ALLOW)


def test_default_arch_and_aliases() -> None:
    assert local_filter("amd64") == local_filter("x86_64")
    assert local_filter("arm64") == local_filter("aarch64")
    assert local_filter() in (local_filter("x86_64"), local_filter("aarch64"))
    with pytest.raises(RuntimeFailure, match="no seccomp filter for architecture 'riscv64'"):
        local_filter("riscv64")


def test_programs_differ_per_arch() -> None:
    assert local_filter("x86_64") != local_filter("aarch64")


def test_syscall_numbers_anchor() -> None:
    # A few numbers known by heart, so a shuffled table cannot pass the header check by absence.
    x86, arm = syscall_numbers("x86_64"), syscall_numbers("aarch64")
    assert (x86["unshare"], x86["clone"], x86["socket"], x86["ioctl"], x86["mount"]) == (
        272,
        56,
        41,
        16,
        165,
    )
    assert (arm["unshare"], arm["clone"], arm["socket"], arm["ioctl"], arm["mount"]) == (
        97,
        220,
        198,
        29,
        40,
    )
    assert x86["io_uring_setup"] == arm["io_uring_setup"] == 425
    assert x86["clone3"] == arm["clone3"] == 435


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


def test_syscall_numbers_match_kernel_headers(arch: str) -> None:
    header = HEADERS[arch]
    if not header.exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    defined = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read_text(), re.M)
    }
    ours = syscall_numbers(arch)
    checked = [n for n in ours if n in defined]
    # Headers older than the newest syscalls skip those; the bulk must still be compared.
    assert len(checked) >= 45, checked
    assert {n: ours[n] for n in checked} == {n: defined[n] for n in checked}


def test_every_entry_has_a_reason() -> None:
    for section in ("architectures", "x32", "newerSyscalls"):
        assert POLICY[section]["reason"].strip()
    for entry in [*POLICY["rules"], *POLICY["allowed"]]:
        assert len(entry["reason"].strip()) > 20, entry


# ------------------------------------------------------------------ the ABI gate


def test_other_abis_are_killed(arch: str) -> None:
    program = local_filter(arch)
    for audit in {AUDIT_ARCH_I386, AUDIT_ARCH_ARM, *AUDIT_ARCH.values()} - {AUDIT_ARCH[arch]}:
        for nr in (0, 1, 20, 39, 172, 272):
            assert run(program, seccomp_data(nr, audit)) == KILL, (hex(audit), nr)


def test_x32_is_killed() -> None:
    program = local_filter("x86_64")
    for nr in (0, 39, 272, 512, 0x3FFFFFFF, -2):  # -2: bit 30 set too, unlike -1
        assert run(program, seccomp_data(0x40000000 | nr, AUDIT_ARCH["x86_64"])) == KILL
    # The same numbers without the x32 bit go through the usual rules.
    assert call("x86_64", "unshare", 0) == ALLOW


def test_skipped_syscall_is_allowed(arch: str) -> None:
    # nr -1: a tracer skipping the call; an errno from the filter would clobber its result.
    assert run(local_filter(arch), seccomp_data(-1, AUDIT_ARCH[arch])) == ALLOW


def test_syscalls_newer_than_the_tables_get_enosys(arch: str) -> None:
    program = local_filter(arch)
    for nr in (NEWEST + 1, 500, 600, 1000, 0x3FFFFFFF):
        assert run(program, seccomp_data(nr, AUDIT_ARCH[arch])) == ENOSYS, nr
    assert run(program, seccomp_data(NEWEST, AUDIT_ARCH[arch])) == ALLOW


def test_unlisted_syscalls_are_allowed(arch: str) -> None:
    listed = set(syscall_numbers(arch).values())
    program = local_filter(arch)
    for nr in range(NEWEST + 1):
        if nr not in listed:
            assert run(program, seccomp_data(nr, AUDIT_ARCH[arch], (1, 2, 3))) == ALLOW, nr


# ------------------------------------------------------------------ the rules, one by one


def test_new_user_namespaces_are_refused(arch: str) -> None:
    newuser, sigchld = 0x10000000, 17
    assert call(arch, "unshare", newuser) == EPERM
    assert call(arch, "unshare", newuser | 0x20000) == EPERM
    assert call(arch, "clone", newuser | sigchld) == EPERM
    # High bits the kernel drops (lower_32_bits) do not hide the flag.
    assert call(arch, "clone", (1 << 40) | newuser | sigchld) == EPERM
    assert call(arch, "clone3", 0, 88) == ENOSYS
    assert call(arch, "setns", 3, 0) == EPERM
    assert call(arch, "setns", 3, newuser) == EPERM


@pytest.mark.parametrize(
    "flag", [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x20000000, 0x40000000]
)
def test_other_namespaces_are_refused(arch: str, flag: int) -> None:
    assert call(arch, "unshare", flag) == EPERM
    assert call(arch, "clone", flag | 17) == EPERM


def test_time_namespace_only_matters_to_unshare(arch: str) -> None:
    assert call(arch, "unshare", 0x80) == EPERM
    # clone's low byte is the exit signal: signal 0x80|x is not a time namespace.
    assert call(arch, "clone", 0x80 | 17) == ALLOW


def test_fork_threads_and_plain_unshare_are_allowed(arch: str) -> None:
    thread_flags = 0x003D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|*_SETTID
    assert call(arch, "clone", 17) == ALLOW
    assert call(arch, "clone", thread_flags) == ALLOW
    assert call(arch, "clone", 0x4111) == ALLOW  # vfork-style CLONE_VM|CLONE_VFORK|SIGCHLD
    for flags in (0, 0x200, 0x400, 0x40000, 0x600):  # CLONE_FS, CLONE_FILES, CLONE_SYSVSEM
        assert call(arch, "unshare", flags) == ALLOW


@pytest.mark.parametrize(
    "name",
    [
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "open_tree",
        "open_tree_attr",
        "move_mount",
        "mount_setattr",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "kexec_load",
        "kexec_file_load",
        "reboot",
        "init_module",
        "finit_module",
        "delete_module",
        "swapon",
        "swapoff",
        "acct",
        "quotactl",
        "quotactl_fd",
        "lookup_dcookie",
        "syslog",
        "open_by_handle_at",
    ],
)
def test_refused_outright_with_eperm(arch: str, name: str) -> None:
    assert call(arch, name) == EPERM
    assert call(arch, name, 1, 2, 3, 4, 5, 6) == EPERM


def test_io_ports_refused_where_they_exist() -> None:
    assert call("x86_64", "iopl", 3) == EPERM
    assert call("x86_64", "ioperm", 0, 1024, 1) == EPERM
    assert "iopl" not in syscall_numbers("aarch64")


def test_mount_and_namespace_introspection_gets_enosys(arch: str) -> None:
    for name in ("statmount", "listmount", "listns"):
        assert call(arch, name) == ENOSYS


def test_ptrace_only_of_consenting_tracees(arch: str) -> None:
    attach, seize = 16, 0x4206
    assert call(arch, "ptrace", attach, 1) == EPERM
    assert call(arch, "ptrace", seize, 1) == EPERM
    assert call(arch, "ptrace", (1 << 33) | attach, 1) == EPERM
    for request in (0, 1, 2, 5, 7, 9, 12, 13, 17, 0x4200, 0x4207):  # TRACEME, PEEK*, POKE*, ...
        assert call(arch, "ptrace", request, 1) == ALLOW, request


@pytest.mark.parametrize("name", ["socket", "socketpair"])
def test_socket_families(arch: str, name: str) -> None:
    for family in (1, 2, 10, 16):  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
        assert call(arch, name, family, 1, 0) == ALLOW, family
    for family in (0, 3, 4, 15, 17, 21, 30, 31, 38, 40, 41, 43, 44, 45, 46, 255, MASK32):
        assert call(arch, name, family, 5, 0) == EAFNOSUPPORT, family
    # The kernel reads the family as an int: high bits neither hide AF_ALG nor block AF_INET.
    assert call(arch, name, (1 << 32) | 38, 5, 0) == EAFNOSUPPORT
    assert call(arch, name, (7 << 32) | 2, 1, 0) == ALLOW


def test_terminal_injection_ioctls(arch: str) -> None:
    tiocsti, tioclinux = 0x5412, 0x541C
    assert call(arch, "ioctl", 0, tiocsti, 0) == EPERM
    assert call(arch, "ioctl", 0, tioclinux, 0) == EPERM
    # CVE-2019-10063: the kernel truncates the request to 32 bits, so must the filter.
    assert call(arch, "ioctl", 0, (1 << 32) | tiocsti, 0) == EPERM
    assert call(arch, "ioctl", 0, (0xFFFFFFFF << 32) | tioclinux, 0) == EPERM
    for request in (0x5401, 0x5413, 0x5414, 0x541B, 0x540E, 0x80045430, 0xC0185879):
        # TCGETS, TIOCGWINSZ, TIOCSWINSZ, FIONREAD, TIOCSCTTY, TIOCGPTN, a driver ioctl
        assert call(arch, "ioctl", 0, request, 0) == ALLOW, hex(request)


def test_personality(arch: str) -> None:
    for persona in (0, 0x0008, 0x0020000, 0x0040000, 0x0060008, 0xFFFFFFFF):
        assert call(arch, "personality", persona) == ALLOW, hex(persona)
    for persona in (0x0100000, 0x0400000, 0x0001, 0x4100001, 0x0200000, 0x8000000, 0xFFFFFFFE):
        # MMAP_PAGE_ZERO, READ_IMPLIES_EXEC, PER_SVR4 (+flags), ADDR_COMPAT_LAYOUT, ADDR_LIMIT_3GB
        assert call(arch, "personality", persona) == EPERM, hex(persona)


def test_decisions_to_allow(arch: str) -> None:
    for name in ("kcmp", "vmsplice", "name_to_handle_at", "process_madvise", "seccomp"):
        assert call(arch, name, 1, 2, 3, 4, 5) == ALLOW, name


# ------------------------------------------------------------------ every rule, both ways


def _matching_args(rule: dict[str, Any]) -> Iterator[tuple[int, ...]]:
    """Argument vectors that satisfy every condition of ``rule``."""
    conds = rule.get("args", [])
    if not conds:
        yield (0, 0, 0, 0, 0, 0)
        yield (1, 2, 3, 4, 5, 6)
        return
    cond = conds[0]  # the policy's rules have at most one condition
    assert len(conds) == 1
    raw = cond["value"] if isinstance(cond["value"], list) else [cond["value"]]
    values = [_value(v) for v in raw]
    if cond["op"] in ("eq", "one_of"):
        candidates = values
    else:
        mask = 0
        for v in values:
            mask |= v
        if cond["op"] == "bits_outside":
            mask = ~mask & MASK32
        candidates = [1 << b for b in range(32) if mask >> b & 1]
    for c in candidates:
        for high in (0, 1 << 32):
            args = [0] * 6
            args[cond["index"]] = c | high
            yield tuple(args)


def _lookalike_args(rule: dict[str, Any]) -> tuple[int, ...]:
    """Same call, arguments that satisfy no condition of ``rule``."""
    (cond,) = rule["args"]
    args = [0] * 6
    if cond["op"] == "bits_outside":
        args[cond["index"]] = 0  # the plain persona
    elif cond["op"] in ("eq", "one_of"):
        raw = cond["value"] if isinstance(cond["value"], list) else [cond["value"]]
        taken = {_value(v) for v in raw}
        args[cond["index"]] = next(v for v in range(1, 100) if v not in taken) if 0 in taken else 0
    return tuple(args)


@pytest.mark.parametrize("index", range(len(POLICY["rules"])))
def test_every_rule_both_ways(arch: str, index: int) -> None:
    rule = POLICY["rules"][index]
    numbers = syscall_numbers(arch)
    program = local_filter(arch)
    expected = _ret(rule["action"])
    names = [n for n in rule["names"] if n in numbers]
    assert names, "a rule must apply to at least one syscall on every architecture"
    for name in names:
        nr = numbers[name]
        # Every argument vector matching this rule gets its action unless an earlier rule for
        # the same syscall claims it; and at least one reaches this rule (no dead rules).
        reached = False
        for args in _matching_args(rule):
            got = run(program, seccomp_data(nr, AUDIT_ARCH[arch], args))
            assert got == reference(arch, nr, AUDIT_ARCH[arch], args), (name, args)
            reached |= got == expected
        assert reached, f"rule {index} never decides {name}"
        if rule["action"] != "allow" and rule.get("args"):
            # A denied call's harmless look-alike is allowed.
            args = _lookalike_args(rule)
            assert run(program, seccomp_data(nr, AUDIT_ARCH[arch], args)) == ALLOW, (name, args)
        if rule["action"] != "allow" and not rule.get("args"):
            # Denied outright: the same arguments on an ordinary syscall (read) pass.
            read = {"x86_64": 0, "aarch64": 63}[arch]
            assert run(program, seccomp_data(read, AUDIT_ARCH[arch], (1, 2, 3))) == ALLOW


def test_compiled_program_agrees_with_the_policy(arch: str) -> None:
    """Differential check: the program and a plain reading of the JSON agree on many inputs."""
    program = local_filter(arch)
    rng = random.Random(9)
    interesting: set[int] = {0, 1, 2, 17, 0x80, MASK32, 1 << 32, (1 << 64) - 1}
    for rule in POLICY["rules"]:
        for cond in rule.get("args", []):
            raw = cond["value"] if isinstance(cond["value"], list) else [cond["value"]]
            for v in map(_value, raw):
                interesting |= {v, v ^ 1, v | (1 << 32), v - 1 if v else 0, v + 1}
    numbers = sorted(set(syscall_numbers(arch).values()))
    # An argument equal to another listed syscall's number catches a rule block that falls
    # through into the next syscall test with an argument, not nr, in the accumulator.
    interesting |= set(numbers)
    for nr in numbers:
        for value in interesting:
            for index in range(6):
                args = [rng.getrandbits(64) if rng.random() < 0.2 else 0 for _ in range(6)]
                args[index] = value
                data = seccomp_data(nr, AUDIT_ARCH[arch], tuple(args))
                assert run(program, data) == reference(arch, nr, AUDIT_ARCH[arch], tuple(args))
    for _ in range(2000):
        nr = rng.choice([*numbers, rng.randrange(0, 1 << 32)])
        audit = rng.choice([AUDIT_ARCH[arch], AUDIT_ARCH[arch], AUDIT_ARCH_I386])
        args = tuple(rng.getrandbits(64) for _ in range(6))
        signed = nr - (1 << 32) if nr >= 1 << 31 else nr
        data = seccomp_data(signed, audit, args)
        assert run(program, data) == reference(arch, nr, audit, args)


# ------------------------------------------------------------------ a malformed policy is refused


def _doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(POLICY_PATH.read_text())
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"action": "EPERM", "names": ["mount"]}, "needs a reason"),
        ({"reason": " ", "action": "EPERM", "names": ["mount"]}, "needs a reason"),
        ({"reason": "r" * 30, "action": "EPERM", "names": ["mountt"]}, "not in the tables"),
        ({"reason": "r" * 30, "action": "EPRM", "names": ["mount"]}, "errno name"),
        (
            {
                "reason": "r" * 30,
                "action": "EPERM",
                "names": ["ioctl"],
                "args": [{"index": 1, "op": "eq", "value": "TIOCSTX"}],
            },
            "unknown constant",
        ),
        (
            {
                "reason": "r" * 30,
                "action": "EPERM",
                "names": ["ioctl"],
                "args": [{"index": 1, "op": "eq", "value": 1 << 32}],
            },
            "not a 32-bit",
        ),
        (
            {
                "reason": "r" * 30,
                "action": "EPERM",
                "names": ["ioctl"],
                "args": [{"index": 6, "op": "eq", "value": 1}],
            },
            "index must be 0..5",
        ),
        (
            {
                "reason": "r" * 30,
                "action": "EPERM",
                "names": ["ioctl"],
                "args": [{"index": 1, "op": "lt", "value": 1}],
            },
            "op must be",
        ),
    ],
)
def test_malformed_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    doc = _doc()
    doc["rules"] = [*doc["rules"], rule]
    with pytest.raises(RuntimeFailure, match=message):
        seccomp._parse(doc)


def test_a_shadowed_rule_is_refused() -> None:
    doc = _doc()
    # socket already ends in an unconditional rule; anything after it could never apply.
    doc["rules"].append(
        {
            "reason": "r" * 30,
            "action": "EPERM",
            "names": ["socket"],
            "args": [{"index": 0, "op": "eq", "value": 2}],
        }
    )
    with pytest.raises(RuntimeFailure, match="comes after one that always matches"):
        seccomp._compile(seccomp._parse(doc), seccomp._ARCHES["x86_64"])


def test_default_must_be_allow() -> None:
    with pytest.raises(RuntimeFailure, match="defaultAction"):
        seccomp._parse(_doc(defaultAction="EPERM"))
