"""Kernel-level confinement of a sandbox worker, applied to itself before it loads any user code.

Standard library only: the worker runs this file from a clean interpreter (`python -I -S`) that cannot import
whetstone_graders. Each layer is tried in turn; what failed is reported with its reason, never silently
dropped, and the worker goes on with the layers that work:

- namespaces: new network (no interface but a down loopback), mount, IPC and UTS namespaces (a user namespace
  too when not root); the worker pivots into a fresh tmpfs root holding read-only binds of the Python standard
  library and the system libraries, a private tmpfs /tmp (its scratch folder, size-limited) and /dev/null,
  /dev/zero, /dev/urandom, /dev/random. The trainer's files, /proc, /etc, Secrets and the host's /tmp do
  not exist in that view.
- uid: when started as root, setresuid/setresgid to an unprivileged uid of its own, no supplementary groups,
  so RLIMIT_NPROC applies and nothing owned by root is writable.
- landlock: Landlock rules (Linux 5.13+, any uid): read-only beneath the standard library and system
  libraries, read-write beneath the scratch folder; ABI 4+: no TCP bind or connect; ABI 6+: no signals to
  processes outside the sandbox, no abstract unix sockets.
- seccomp: a seccomp filter (any uid): socket() and socketpair() fail unless the network is allowed;
  execve, fork, vfork, clone without CLONE_THREAD, clone3, ptrace, kill/tgkill of another process,
  process_vm_*, mount, pivot_root, chroot, unshare, setns, bpf, perf_event_open, io_uring, userfaultfd,
  keyctl and module loading fail with EPERM.

rlimits (CPU, address space, file size, processes, open files, no core dumps) are always set, soft = hard, so
user code cannot raise them again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bit -> the mount flag that must be kept when remounting a bind (locked in a user namespace)
_STATVFS_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME,
                  2048: MS_NODIRATIME, 4096: MS_RELATIME}  # fmt: skip

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

ARCH = platform.machine()
# Syscall numbers by architecture (asm/unistd_64.h; aarch64 uses the generic table and has no fork/vfork).
_SYSCALLS = {
    "x86_64": {
        "pivot_root": 155, "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58,
        "execve": 59, "kill": 62, "ptrace": 101, "rt_sigqueueinfo": 129, "acct": 163, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "init_module": 175,
        "delete_module": 176, "quotactl": 179, "tkill": 200, "tgkill": 234, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "rt_tgsigqueueinfo": 297,
        "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
        "bpf": 321, "execveat": 322, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "pidfd_open": 434, "clone3": 435,
        "pidfd_getfd": 438, "chroot": 161,
    },
    "aarch64": {
        "pivot_root": 41, "socket": 198, "socketpair": 199, "clone": 220, "execve": 221, "kill": 129,
        "ptrace": 117, "rt_sigqueueinfo": 138, "acct": 89, "mount": 40, "umount2": 39, "swapon": 224,
        "swapoff": 225, "reboot": 142, "init_module": 105, "delete_module": 106, "quotactl": 60,
        "tkill": 130, "tgkill": 131, "kexec_load": 104, "add_key": 217, "request_key": 218, "keyctl": 219,
        "unshare": 97, "rt_tgsigqueueinfo": 240, "perf_event_open": 241, "fanotify_init": 262,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "bpf": 280, "execveat": 281,
        "userfaultfd": 282, "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "chroot": 51,
    },
}  # fmt: skip
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(name: str, *args: int | ctypes.c_void_p | None) -> int:
    number = _SYSCALLS.get(ARCH, {}).get(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown syscall number on {ARCH}")
    return _check(_libc.syscall(ctypes.c_long(number), *args), name)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _locked_flags(path: str) -> int:
    """The mount flags of the filesystem at `path`, which a bind remount inside a user namespace must keep."""
    flags = os.statvfs(path).f_flag
    return sum(ms for bit, ms in _STATVFS_TO_MS.items() if flags & bit)


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


# --- namespaces -------------------------------------------------------------------------------------------


def enter_namespaces(new_root: str, read_only: list[str], scratch_mb: int, allow_network: bool) -> str:
    """Unshare namespaces and pivot into a minimal root at `new_root` (an empty folder). Returns the scratch
    folder as seen from inside ("/tmp")."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if allow_network else CLONE_NEWNET)
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    if uid != 0:
        # Be root in the new user namespace (to mount), mapped to our own uid outside: no privilege gained.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # The scratch folder first: a read-only root under the host's /tmp (a virtual environment or a checkout
    # there) is then bound inside it, instead of its mount point being taken for the scratch folder's.
    os.makedirs(new_root + "/tmp")
    _mount("tmpfs", new_root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_mb}m,mode=0700")
    bound: list[str] = []
    for path in sorted({os.path.normpath(p) for p in read_only}, key=len):
        if not os.path.exists(path) or _covered(path, bound) or _covered("/tmp", [path]):
            continue  # missing, bound already, or / or /tmp itself (it would hide the scratch folder)
        inside = new_root + path
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.symlink(os.readlink(path), inside)
            continue
        if os.path.isdir(path):
            os.makedirs(inside, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            open(inside, "w").close()
        _mount(path, inside, None, MS_BIND | MS_REC)
        locked = _locked_flags(path)
        _mount(None, inside, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | locked)
        bound.append(path)
    os.makedirs(new_root + "/dev")
    for dev in ("null", "zero", "urandom", "random"):
        open(f"{new_root}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{new_root}/dev/{dev}", None, MS_BIND)
    os.makedirs(new_root + "/.old-root")
    os.chdir(new_root)
    _syscall("pivot_root", b".", b".old-root")
    _check(_libc.umount2(b"/.old-root", ctypes.c_int(MNT_DETACH)), "umount old root")
    os.rmdir("/.old-root")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/tmp")
    return "/tmp"


def drop_uid(uid: int, scratch: str) -> None:
    """Become an unprivileged uid and gid (root only)."""
    os.chown(scratch, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def readable_by_anyone(path: str) -> bool:
    """Whether an unprivileged uid can read `path` (every parent searchable by others, the path readable)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


# --- rlimits ------------------------------------------------------------------------------------------------


def set_limits(memory_mb: int, cpu_seconds: int, file_mb: int, max_files: int) -> None:
    """soft = hard everywhere, so user code cannot raise a limit again."""
    import resource

    def both(kind: int, value: int) -> None:
        resource.setrlimit(kind, (value, value))

    both(resource.RLIMIT_CORE, 0)
    both(resource.RLIMIT_CPU, cpu_seconds)
    both(resource.RLIMIT_FSIZE, file_mb * 1024 * 1024)
    both(resource.RLIMIT_NOFILE, max_files)
    # The worker itself is the uid's one process: no fork, no thread (for root it applies after drop_uid).
    both(resource.RLIMIT_NPROC, 1)
    both(resource.RLIMIT_AS, memory_mb * 1024 * 1024)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (set after drop_uid, which clears it)."""
    import signal

    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


# --- landlock -----------------------------------------------------------------------------------------------

_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446  # the same on every architecture
_LL_READ_FILE, _LL_READ_DIR, _LL_WRITE_FILE, _LL_TRUNCATE = 1 << 2, 1 << 3, 1 << 1, 1 << 14
_LL_FILE_ONLY = (1 << 0) | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | (1 << 15)


def landlock_abi() -> int:
    abi = _libc.syscall(ctypes.c_long(_LL_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return int(abi) if abi > 0 else 0


def apply_landlock(read_only: list[str], writable: list[str], allow_network: bool) -> int:
    """Restrict this process's filesystem (and, ABI 4+, TCP; ABI 6+, signals and abstract sockets) access.
    Returns the Landlock ABI used."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not available in this kernel")
    fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        fs |= 1 << 13  # refer
    if abi >= 3:
        fs |= _LL_TRUNCATE
    if abi >= 5:
        fs |= 1 << 15  # ioctl_dev
    net = 0 if allow_network or abi < 4 else 0b11  # bind_tcp | connect_tcp
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(
        _libc.syscall(ctypes.c_long(_LL_CREATE), buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        read = _LL_READ_FILE | _LL_READ_DIR
        rules = [(p, read) for p in read_only] + [(p, fs) for p in writable]
        for path, access in rules:
            if not os.path.exists(path):
                continue
            if not os.path.isdir(path):
                access &= _LL_FILE_ONLY
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
                _check(
                    _libc.syscall(ctypes.c_long(_LL_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1), rule,
                                  ctypes.c_uint32(0)),
                    f"landlock_add_rule {path}",
                )  # fmt: skip
            finally:
                os.close(fd)
        _check(
            _libc.syscall(ctypes.c_long(_LL_RESTRICT), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)
    return abi


# --- seccomp ------------------------------------------------------------------------------------------------

_LD_ABS_W, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_DENIED = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "mount",
    "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "userfaultfd", "keyctl", "add_key", "request_key", "init_module",
    "finit_module", "delete_module", "kexec_load", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "fanotify_init", "name_to_handle_at", "open_by_handle_at",
)  # fmt: skip


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(allow_network: bool, pid: int) -> bytes:
    """The BPF filter: a list of checks of the syscall number (and for clone / kill-like calls, of the first
    argument); anything not listed is allowed."""
    numbers = _SYSCALLS[ARCH]
    eperm = _RET_ERRNO | errno.EPERM
    prog = [
        _insn(_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH[ARCH]),
        _insn(_RET_K, 0, 0, eperm),  # another ABI (e.g. x32, i386): refuse everything
        _insn(_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
    ]
    if ARCH == "x86_64":
        prog += [_insn(0x35, 0, 1, 0x40000000), _insn(_RET_K, 0, 0, eperm)]  # jge: x32 syscalls

    def deny(name: str, ret: int = eperm) -> None:
        if name in numbers:
            prog.extend([_insn(_JEQ_K, 0, 1, numbers[name]), _insn(_RET_K, 0, 0, ret)])

    for name in _DENIED:
        deny(name)
    deny("clone3", _RET_ERRNO | errno.ENOSYS)  # its flags sit in memory, unreadable here: libc falls back
    if not allow_network:
        deny("socket", _RET_ERRNO | errno.EACCES)
        deny("socketpair", _RET_ERRNO | errno.EACCES)
    # clone: threads only (RLIMIT_NPROC decides whether even those may start).
    prog += [
        _insn(_JEQ_K, 0, 5, numbers["clone"]),
        _insn(_LD_ABS_W, 0, 0, 16),  # args[0], low half: the flags
        _insn(_JSET_K, 1, 0, CLONE_THREAD),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_LD_ABS_W, 0, 0, 0),
    ]
    # kill, tkill, tgkill: only this process itself (args[0] is the pid or thread-group id).
    for name in ("kill", "tgkill", "tkill"):
        prog += [
            _insn(_JEQ_K, 0, 5, numbers[name]),
            _insn(_LD_ABS_W, 0, 0, 16),
            _insn(_JEQ_K, 1, 0, pid),
            _insn(_RET_K, 0, 0, eperm),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
            _insn(_LD_ABS_W, 0, 0, 0),
        ]
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(prog)


def apply_seccomp(allow_network: bool) -> None:
    if ARCH not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {ARCH}")
    code = seccomp_program(allow_network, os.getpid())
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.cast(filters, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def forget_ctypes() -> None:
    """Drop ctypes from the interpreter before user code runs (the audit hook refuses to import it again)."""
    global _libc
    _libc = None  # type: ignore[assignment]
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
