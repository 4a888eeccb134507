"""A tiny classic-BPF machine for seccomp programs, independent of corral's compiler: it knows the
kernel's instruction encoding and nothing else (tests of local mode's filters run them in it)."""

from __future__ import annotations

import struct

LD_W_ABS, RET_K, JA = 0x20, 0x06, 0x05
JUMPS = {0x15: "jeq", 0x25: "jgt", 0x35: "jge", 0x45: "jset"}
SECCOMP_DATA_SIZE = 64


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    assert len(program) % 8 == 0, "not a whole number of struct sock_filter"
    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]


def check_program(program: bytes) -> None:
    """The checks the kernel makes (bpf_check_classic, seccomp_check_filter) that matter here."""
    insns = decode(program)
    assert 1 <= len(insns) <= 4096
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code == LD_W_ABS:
            assert k % 4 == 0 and k < SECCOMP_DATA_SIZE, f"bad load offset {k} at {pc}"
        elif code in JUMPS:
            assert pc + 1 + jt < len(insns) and pc + 1 + jf < len(insns), f"jump out at {pc}"
        elif code == JA:
            assert pc + 1 + k < len(insns), f"jump out at {pc}"
        else:
            assert code == RET_K, f"unexpected opcode {code:#x} at {pc}"
    assert insns[-1][0] == RET_K, "the program must end in a return"


def run(program: bytes, data: bytes) -> int:
    """Run ``program`` on one ``struct seccomp_data``; the filter's return value."""
    insns = decode(program)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == RET_K:
            return k
        elif code == JA:
            pc += k
        else:
            op = JUMPS[code]
            taken = {
                "jeq": acc == k,
                "jgt": acc > k,
                "jge": acc >= k,
                "jset": bool(acc & k),
            }[op]
            pc += jt if taken else jf


def seccomp_data(nr: int, arch: int, args: tuple[int, ...] = ()) -> bytes:
    full = (*args, *([0] * (6 - len(args))))
    return struct.pack("<iIQ6Q", nr, arch, 0x7F0000001000, *full)
