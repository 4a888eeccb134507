"""Local mode's seccomp filter: ``local_filter()`` compiles ``resources/local-seccomp.json`` into
the classic-BPF program that ``bwrap --seccomp FD`` loads (an array of ``struct sock_filter``).

The policy, with a reason on every entry, is the JSON file; this module holds the plumbing: the
syscall numbers of each architecture and a small compiler. No libseccomp: the program is a short
chain of syscall-number tests, each followed by that syscall's rules, and
tests/unit/test_local_seccomp.py runs it in a BPF interpreter against every rule.

Program layout (jumps in classic BPF only go forward, at most 255 instructions):

    ld arch;  jeq AUDIT_ARCH_<native> else -> foreign     other ABIs of this kernel (i386, arm32)
    ld nr;    jeq -1 -> allow                             a tracer skipping a syscall
              jset X32_SYSCALL_BIT -> x32                 (x86_64 only)
              jgt NEWEST -> newer else -> rules           syscalls newer than our tables
    foreign: ret KILL_PROCESS;  x32: ret KILL_PROCESS;  allow: ret ALLOW;  newer: ret ERRNO(ENOSYS)
    rules: for each syscall with rules: jeq NR else -> next syscall
               for each rule: ld arg (low 32 bits); test else -> next rule; ret ACTION
               ret ALLOW                                   (no rule matched)
    ret ALLOW                                              (default)

Syscalls without rules end in ALLOW having looked at nothing but arch and nr, so the kernel's
seccomp action cache (Linux 5.11+) skips the filter for them altogether.
"""

from __future__ import annotations

import errno
import json
import platform
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from corral.errors import RuntimeFailure

__all__ = [
    "ARCHES",
    "AUDIT_ARCH",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS",
    "SECCOMP_RET_USER_NOTIF",
    "X32_SYSCALL_BIT",
    "guard_filter",
    "guard_syscalls",
    "local_filter",
    "normalize_arch",
    "syscall_numbers",
]

_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
_POLICY = _RESOURCES / "local-seccomp.json"
# Which calls go to the in-sandbox guard (corral/local/guard.py) instead of the kernel.
_GUARD_POLICY = _RESOURCES / "local-guard.json"

# <linux/seccomp.h>: return values of a filter (action in the high 16 bits, data in the low).
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000  # ask the listener (the guard) what to answer
# <linux/audit.h>: seccomp_data.arch of each ABI the filter can be entered through.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# <linux/filter.h> opcodes, only the ones this compiler emits (all on the kernel's seccomp list).
_LD_W_ABS = 0x20  # A = 32-bit word of seccomp_data at offset k
_JMP_JEQ_K = 0x15
_JMP_JGT_K = 0x25
_JMP_JSET_K = 0x45
_RET_K = 0x06
_MAX_INSNS = 4096  # BPF_MAXINSNS

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARGS = 16

# --------------------------------------------------------------------------- syscall numbers
# Only the syscalls the policy names. x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64:
# include/uapi/asm-generic/unistd.h. From 424 on every architecture shares one numbering.
_UNIFIED = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "openat2": 437,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "landlock_create_ruleset": 444,
    "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    "statmount": 457,
    "listmount": 458,
    "open_tree_attr": 467,
    "listns": 470,
}
# The newest syscall number the tables know (rseq_slice_yield); anything above answers ENOSYS.
_NEWEST = 471

_X86_64 = {
    "open": 2,
    "ioctl": 16,
    "socket": 41,
    "bind": 49,
    "socketpair": 53,
    "clone": 56,
    "rename": 82,
    "mkdir": 83,
    "creat": 85,
    "link": 86,
    "symlink": 88,
    "ptrace": 101,
    "syslog": 103,
    "mknod": 133,
    "personality": 135,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "openat": 257,
    "mkdirat": 258,
    "mknodat": 259,
    "renameat": 264,
    "linkat": 265,
    "symlinkat": 266,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "vmsplice": 278,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "renameat2": 316,
    "seccomp": 317,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    **_UNIFIED,
}

_AARCH64 = {
    "lookup_dcookie": 18,
    "ioctl": 29,
    "mknodat": 33,
    "mkdirat": 34,
    "symlinkat": 36,
    "linkat": 37,
    "renameat": 38,
    "umount2": 39,
    "mount": 40,
    "pivot_root": 41,
    "quotactl": 60,
    "vmsplice": 75,
    "openat": 56,
    "acct": 89,
    "personality": 92,
    "unshare": 97,
    "kexec_load": 104,
    "init_module": 105,
    "delete_module": 106,
    "syslog": 116,
    "ptrace": 117,
    "reboot": 142,
    "socket": 198,
    "socketpair": 199,
    "bind": 200,
    "add_key": 217,
    "request_key": 218,
    "keyctl": 219,
    "clone": 220,
    "swapon": 224,
    "swapoff": 225,
    "perf_event_open": 241,
    "name_to_handle_at": 264,
    "open_by_handle_at": 265,
    "setns": 268,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "kcmp": 272,
    "finit_module": 273,
    "renameat2": 276,
    "seccomp": 277,
    "bpf": 280,
    "userfaultfd": 282,
    "kexec_file_load": 294,
    **_UNIFIED,
}


@dataclass(frozen=True)
class _Arch:
    audit_arch: int
    syscalls: Mapping[str, int]
    # Names the policy uses that this architecture does not have: listed so a typo in the
    # policy is an error rather than a silently skipped rule.
    absent: frozenset[str] = field(default_factory=frozenset)
    x32_bit: int | None = None


_ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch(AUDIT_ARCH["x86_64"], _X86_64, x32_bit=X32_SYSCALL_BIT),
    "aarch64": _Arch(
        AUDIT_ARCH["aarch64"],
        _AARCH64,
        absent=frozenset(
            # The pre-*at calls: aarch64 has only the *at forms.
            {"iopl", "ioperm", "open", "creat", "mkdir", "mknod", "symlink", "link", "rename"}
        ),
    ),
}
ARCHES = tuple(_ARCHES)
_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalize_arch(arch: str | None = None) -> str:
    """The architecture name this module uses for ``arch`` (default: this machine's)."""
    name = (arch or platform.machine()).lower()
    name = _ALIASES.get(name, name)
    if name not in _ARCHES:
        raise RuntimeFailure(
            f"local mode has no seccomp filter for architecture {name!r} "
            f"(supported: {', '.join(ARCHES)})"
        )
    return name


def syscall_numbers(arch: str | None = None) -> Mapping[str, int]:
    """Number of every syscall the policy names, on ``arch`` (missing: not on that arch)."""
    return dict(_ARCHES[normalize_arch(arch)].syscalls)


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class _Cond:
    index: int
    # "eq": the argument equals one of ``values``; "bits": it has a bit of ``values[0]`` set.
    kind: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class _Rule:
    names: tuple[str, ...]
    conds: tuple[_Cond, ...]
    ret: int


@dataclass(frozen=True)
class _Policy:
    rules: tuple[_Rule, ...]
    foreign_ret: int
    x32_ret: int
    newer_ret: int


class _PolicyError(RuntimeFailure):
    """A policy file is wrong; the loader adds the file's name."""


def _fail(message: str) -> RuntimeFailure:
    return _PolicyError(message)


def _action(name: Any, where: str) -> int:
    if name == "allow":
        return SECCOMP_RET_ALLOW
    if name == "kill":
        return SECCOMP_RET_KILL_PROCESS
    if name == "notify":
        return SECCOMP_RET_USER_NOTIF
    value = getattr(errno, name, None) if isinstance(name, str) and name.startswith("E") else None
    if not isinstance(value, int):
        raise _fail(
            f"{where}: action must be 'allow', 'kill', 'notify' or an errno name, not {name!r}"
        )
    return SECCOMP_RET_ERRNO | value


def _number(value: Any, constants: Mapping[str, int], where: str) -> int:
    if isinstance(value, str):
        if value in constants:
            return constants[value]
        try:
            value = int(value, 0)
        except ValueError:
            raise _fail(f"{where}: unknown constant {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        # Only the low 32 bits are ever compared (see the policy's "about").
        raise _fail(f"{where}: {value!r} is not a 32-bit unsigned value")
    return value


def _cond(raw: Any, constants: Mapping[str, int], where: str) -> _Cond:
    if not isinstance(raw, dict) or set(raw) != {"index", "op", "value"}:
        raise _fail(f"{where}: a condition is {{index, op, value}}, got {raw!r}")
    index = raw["index"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
        raise _fail(f"{where}: argument index must be 0..5, not {index!r}")
    value = raw["value"]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(f"{where}: empty value list")
    numbers = [_number(v, constants, where) for v in items]
    op = raw["op"]
    if op == "eq" and not isinstance(value, list):
        return _Cond(index, "eq", (numbers[0],))
    if op == "one_of" and isinstance(value, list):
        return _Cond(index, "eq", tuple(numbers))
    if op in ("any_bits", "bits_outside"):
        mask = 0
        for n in numbers:
            mask |= n
        if op == "bits_outside":
            mask ^= 0xFFFFFFFF
        if mask == 0:
            raise _fail(f"{where}: empty bit mask")
        return _Cond(index, "bits", (mask,))
    raise _fail(f"{where}: op must be eq (one value), one_of (a list), any_bits or bits_outside")


def _known(name: Any, where: str) -> str:
    if not isinstance(name, str) or not all(
        name in arch.syscalls or name in arch.absent for arch in _ARCHES.values()
    ):
        raise _fail(f"{where}: syscall {name!r} is not in the tables of corral/local/seccomp.py")
    return name


def _reason(raw: Mapping[str, Any], where: str) -> None:
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise _fail(f"{where}: every entry needs a reason")


def _parse(doc: Any) -> _Policy:
    if not isinstance(doc, dict):
        raise _fail("not a JSON object")
    if doc.get("defaultAction") != "allow":
        # The compiler's layout (fall through to ALLOW) assumes it; see the policy's "about".
        raise _fail("defaultAction must be 'allow'")
    for key in ("architectures", "x32", "newerSyscalls"):
        if not isinstance(doc.get(key), dict):
            raise _fail(f"missing {key}")
        _reason(doc[key], key)
    constants = {
        str(k): _number(v, {}, f"constants.{k}") for k, v in dict(doc.get("constants", {})).items()
    }
    rules: list[_Rule] = []
    for i, raw in enumerate(doc.get("rules", [])):
        where = f"rules[{i}]"
        if not isinstance(raw, dict) or not set(raw) <= {"reason", "action", "names", "args"}:
            raise _fail(f"{where}: a rule has reason, action, names and optional args")
        _reason(raw, where)
        names = raw.get("names")
        if not isinstance(names, list) or not names:
            raise _fail(f"{where}: names must be a non-empty list")
        args = raw.get("args", [])
        if not isinstance(args, list):
            raise _fail(f"{where}: args must be a list")
        rules.append(
            _Rule(
                names=tuple(_known(n, where) for n in names),
                conds=tuple(_cond(c, constants, where) for c in args),
                ret=_action(raw.get("action"), where),
            )
        )
    for i, raw in enumerate(doc.get("allowed", [])):
        # Decisions NOT to refuse something, kept next to the refusals with their reasons;
        # nothing to compile (default allow), but the names must exist.
        where = f"allowed[{i}]"
        if not isinstance(raw, dict):
            raise _fail(f"{where}: not an object")
        _reason(raw, where)
        for n in raw.get("names") or []:
            _known(n, where)
    return _Policy(
        rules=tuple(rules),
        foreign_ret=_action(doc["architectures"].get("action"), "architectures"),
        x32_ret=_action(doc["x32"].get("action"), "x32"),
        newer_ret=_action(doc["newerSyscalls"].get("action"), "newerSyscalls"),
    )


@cache
def _policy(path: Path = _POLICY) -> _Policy:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"cannot load {path.name}: {exc}") from exc
    try:
        return _parse(doc)
    except _PolicyError as exc:
        raise RuntimeFailure(f"{path.name}: {exc}") from None


# --------------------------------------------------------------------------- the compiler

_Target = str | None  # a label, or None for the next instruction


class _Asm:
    """Instructions with symbolic forward jump targets, resolved by ``assemble``."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, _Target, _Target, int]] = []
        self._labels: dict[str, int] = {}
        self._count = 0

    def new_label(self) -> str:
        self._count += 1
        return f"L{self._count}"

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self._insns.append((_LD_W_ABS, None, None, offset))

    def jump(self, code: int, k: int, jt: _Target, jf: _Target) -> None:
        self._insns.append((code, jt, jf, k))

    def ret(self, value: int) -> None:
        self._insns.append((_RET_K, None, None, value))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self._insns):
            offsets = [self._offset(pc, t) for t in (jt, jf)]
            out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
        if len(self._insns) > _MAX_INSNS:
            raise RuntimeFailure(f"seccomp program too long: {len(self._insns)} instructions")
        return bytes(out)

    def _offset(self, pc: int, target: _Target) -> int:
        if target is None:
            return 0
        offset = self._labels[target] - pc - 1
        if not 0 <= offset <= 255:
            # A block grew past what an 8-bit conditional jump reaches; the policy would need
            # a jump table. Far from today's sizes, so an error instead of trampolines.
            raise RuntimeFailure(f"seccomp jump out of range ({offset}) at instruction {pc}")
        return offset


def _compile(policy: _Policy, arch: _Arch) -> bytes:
    by_nr: dict[int, list[_Rule]] = {}
    for rule in policy.rules:
        for name in rule.names:
            if name in arch.absent:
                continue
            rules = by_nr.setdefault(arch.syscalls[name], [])
            if rules and not rules[-1].conds:
                raise _fail(f"a rule for {name} comes after one that always matches")
            rules.append(rule)

    asm = _Asm()
    foreign, x32, allow, newer, body = "foreign", "x32", "allow", "newer", "body"
    asm.load(_OFF_ARCH)
    asm.jump(_JMP_JEQ_K, arch.audit_arch, None, foreign)
    asm.load(_OFF_NR)
    asm.jump(_JMP_JEQ_K, 0xFFFFFFFF, allow, None)
    if arch.x32_bit is not None:
        asm.jump(_JMP_JSET_K, arch.x32_bit, x32, None)
    asm.jump(_JMP_JGT_K, _NEWEST, newer, body)
    asm.label(foreign)
    asm.ret(policy.foreign_ret)
    if arch.x32_bit is not None:
        asm.label(x32)
        asm.ret(policy.x32_ret)
    asm.label(allow)
    asm.ret(SECCOMP_RET_ALLOW)
    asm.label(newer)
    asm.ret(policy.newer_ret)
    asm.label(body)
    for nr in sorted(by_nr):
        next_syscall = asm.new_label()
        asm.jump(_JMP_JEQ_K, nr, None, next_syscall)
        rules = by_nr[nr]
        for rule in rules:
            next_rule = asm.new_label()
            for cond in rule.conds:
                # Low word of the 64-bit argument (little-endian): see the policy's "about".
                asm.load(_OFF_ARGS + 8 * cond.index)
                if cond.kind == "bits":
                    asm.jump(_JMP_JSET_K, cond.values[0], None, next_rule)
                else:
                    matched = asm.new_label()
                    for value in cond.values[:-1]:
                        asm.jump(_JMP_JEQ_K, value, matched, None)
                    asm.jump(_JMP_JEQ_K, cond.values[-1], None, next_rule)
                    asm.label(matched)
            asm.ret(rule.ret)
            asm.label(next_rule)
        if rules[-1].conds:
            # A now holds an argument, not nr: stop here rather than fall into the next test.
            asm.ret(SECCOMP_RET_ALLOW)
        asm.label(next_syscall)
    asm.ret(SECCOMP_RET_ALLOW)
    return asm.assemble()


def local_filter(arch: str | None = None) -> bytes:
    """The seccomp program of local mode for ``arch`` (default: this machine), as the raw
    ``struct sock_filter[]`` bytes ``bwrap --seccomp FD`` reads from its fd."""
    return _filter_for(normalize_arch(arch))


def guard_filter(arch: str | None = None, *, audit_reads: bool = False) -> bytes:
    """The program the guard's child loads (``resources/local-guard.json``): the calls that
    create names go to the guard (SECCOMP_RET_USER_NOTIF), everything else to the kernel.
    ``audit_reads``: every open goes to the guard too (its ``auditReads`` entry), which logs
    opens of hidden paths and lets the kernel carry on."""
    name = normalize_arch(arch)
    return _compile(_guard_policy(audit_reads), _ARCHES[name])


def guard_syscalls(arch: str | None = None) -> dict[str, int]:
    """Number of each call the guard's policy can send it, on ``arch``: how the guard tells
    which call a notification is about."""
    a = _ARCHES[normalize_arch(arch)]
    names = {n for rule in _guard_policy(True).rules for n in rule.names}
    return {n: a.syscalls[n] for n in sorted(names) if n not in a.absent}


@cache
def _guard_policy(audit_reads: bool) -> _Policy:
    policy = _policy(_GUARD_POLICY)
    if not audit_reads:
        return policy
    raw = json.loads(_GUARD_POLICY.read_text()).get("auditReads")
    if not isinstance(raw, dict) or not isinstance(raw.get("names"), list):
        raise RuntimeFailure(f"{_GUARD_POLICY.name}: auditReads must name the open calls")
    try:
        _reason(raw, "auditReads")
        names = tuple(_known(n, "auditReads") for n in raw["names"])
        audit = _Rule(names=names, conds=(), ret=_action(raw.get("action"), "auditReads"))
    except _PolicyError as exc:
        raise RuntimeFailure(f"{_GUARD_POLICY.name}: {exc}") from None
    # Every open now goes to the guard: the O_CREAT-only rules for the same calls are covered.
    kept = tuple(r for r in policy.rules if not set(r.names) <= set(names))
    return replace(policy, rules=(audit, *kept))


@cache
def _filter_for(arch: str, path: Path = _POLICY) -> bytes:
    # Little-endian program and argument layout: both supported architectures are.
    try:
        return _compile(_policy(path), _ARCHES[arch])
    except _PolicyError as exc:
        raise RuntimeFailure(f"{path.name}: {exc}") from None
