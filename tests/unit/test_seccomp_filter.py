"""The compiled seccomp program, run by an independent classic-BPF interpreter written here.

For every rule of ``_seccomp.DENIED`` a syscall whose arguments match it must get its errno, and
the ordinary calls a Python program makes (including the non-matching forms of the same
syscalls: ``prlimit64(0, ...)``, ``clone(SIGCHLD)``, ``kill(pid, ...)``) must be allowed.
The behaviour inside real sandboxes is tested in test_sandbox.py.
"""

from __future__ import annotations

import errno
import platform
import struct

import pytest

from make_deps import needs
from megacredit.envs._seccomp import DENIED, NO_EXEC, _load_library, compile_filter

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_ACTION_MASK = 0xFFFF0000
RET_KILL_ACTIONS = {0x00000000, 0x80000000}  # SECCOMP_RET_KILL_THREAD, SECCOMP_RET_KILL_PROCESS

pytestmark = [
    needs("libseccomp", compile_filter().bpf is not None, compile_filter().reason),
    pytest.mark.skipif(AUDIT_ARCH is None, reason=f"no audit arch constant for {platform.machine()}"),
]


def syscall_number(name: str) -> int:
    """This architecture's number of syscall ``name`` (negative when it has none), by libseccomp."""
    return _load_library().seccomp_syscall_resolve_name(name.encode())


def run_bpf(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int | None = None) -> int:
    """Evaluate a cBPF program on a struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}."""
    full_args = [a & 0xFFFFFFFFFFFFFFFF for a in args] + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, AUDIT_ARCH if arch is None else arch, 0, *full_args)
    instructions = [struct.unpack_from("<HBBI", program, offset) for offset in range(0, len(program), 8)]
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            accumulator &= k
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # BPF_JMP | JEQ / JGT / JGE / JSET, BPF_K
            taken = {0x15: accumulator == k, 0x25: accumulator > k, 0x35: accumulator >= k,
                     0x45: bool(accumulator & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not handled by this interpreter: extend it")


def matching_args(rule) -> tuple[int, ...]:
    args = [0] * 6
    for index, op, datum_a, datum_b in rule.comparisons:
        args[index] = {1: 12345, 7: datum_b}[op]  # SCMP_CMP_NE 0 -> some pid; MASKED_EQ -> the masked value
    return tuple(args)


@pytest.mark.parametrize("rule", DENIED, ids=lambda rule: f"{rule.syscall}{rule.comparisons or ''}")
def test_every_rule_denies_its_syscall(rule):
    number = syscall_number(rule.syscall)
    if number < 0:
        pytest.skip(f"{rule.syscall} is not a syscall of {platform.machine()}")
    assert run_bpf(compile_filter().bpf, number, matching_args(rule)) == RET_ERRNO | rule.errno_value


@pytest.mark.parametrize("name, args", [
    ("read", (0, 0, 10)), ("write", (1, 0, 10)), ("openat", (-100, 0, 0o101)), ("execve", ()),
    ("prlimit64", (0, 0, 0, 0)), ("kill", (4242, 9)), ("kill", (0, 9)), ("kill", (-4242, 9)),
    ("clone", (0x01200011,)),  # fork(): CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    ("clone", (0x003D0F00,)),  # pthread_create's flags (no namespace)
    ("setpriority", (0, 0, 5)), ("sched_setaffinity", (0, 8, 0)), ("ioprio_set", (1, 0, 0)),
    ("socketpair", (1, 1, 0, 0)), ("pidfd_open", (4242, 0)), ("mkdirat", (-100, 0, 0o755)),
    ("mmap", (0, 4096, 3, 0x22, -1, 0)),
])
def test_ordinary_calls_are_allowed(name, args):
    number = syscall_number(name)
    if number < 0:
        pytest.skip(f"{name} is not a syscall of {platform.machine()}")
    assert run_bpf(compile_filter().bpf, number, args) == RET_ALLOW


def test_kill_minus_one_is_denied_however_the_pid_is_extended():
    number = syscall_number("kill")
    for pid in (0xFFFFFFFF, -1):  # zero-extended and sign-extended 32-bit -1
        assert run_bpf(compile_filter().bpf, number, (pid, 9)) == RET_ERRNO | errno.EPERM


def test_syscalls_of_another_abi_are_killed():
    i386 = 0x40000003  # AUDIT_ARCH_I386: `int 0x80` on x86_64 reaches the 32-bit syscall table
    verdict = run_bpf(compile_filter().bpf, 14, (0, 0, 0), arch=i386)  # 14 = mknod on i386
    assert verdict & RET_ACTION_MASK in RET_KILL_ACTIONS
    if platform.machine() == "x86_64":  # x32 ABI: the same arch, syscall numbers with bit 30 set
        assert run_bpf(compile_filter().bpf, 0x40000000 | 133, (0, 0, 0)) != RET_ALLOW  # x32 mknod


def test_the_fallback_filter_also_denies_exec_and_the_shared_one_allows_it():
    fallback = compile_filter(DENIED + NO_EXEC).bpf
    for name in ("execve", "execveat"):
        assert run_bpf(fallback, syscall_number(name)) == RET_ERRNO | errno.EPERM
        assert run_bpf(compile_filter().bpf, syscall_number(name)) == RET_ALLOW
    assert run_bpf(fallback, syscall_number("mknodat")) == RET_ERRNO | errno.EPERM  # the shared rules too
