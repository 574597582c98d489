"""Starts one container process for e2e/pod_runner.py: namespaces, mounts, hostname, then exec.

Run as ``python -S -E pod_exec.py SPEC.json``. With ``"namespaces": true`` the process gets its own mount and
UTS namespaces (needs root or CAP_SYS_ADMIN): mount propagation is made private so nothing leaks back to the
host, each volume is bind-mounted at its mountPath, the pod's hosts file is bind-mounted over /etc/hosts and
the hostname is set to the pod's hostname. Then it execs the container command with the container's env, in
the container's working directory, so the runner's SIGTERM/SIGKILL reach the command itself.

Stdlib only, and kept small: this runs before every container start.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1

libc = ctypes.CDLL(None, use_errno=True)


def fail(message: str, code: int = 128) -> None:
    print(f"pod-runner: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source else None
    if libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        fail(f"mount {source} -> {target}: {os.strerror(err)}")


def ensure_mountpoint(target: str, is_file: bool, created_log: str) -> None:
    """Create a missing mount point (on the host filesystem: mkdir is not namespaced) and record it."""
    if os.path.lexists(target):
        return
    created: list[str] = []
    parent = os.path.dirname(target)
    missing: list[str] = []
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        os.mkdir(d)
        created.append(d)
    if is_file:
        open(target, "a").close()
    else:
        os.mkdir(target)
    created.append(target)
    with open(created_log, "a") as f:
        f.writelines(p + "\n" for p in created)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Die with the runner thread that started us, even if the runner is SIGKILLed.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec["runner_pid"]:
        fail("the pod runner went away before the container started")
    if spec.get("namespaces"):
        if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS) != 0:
            fail(f"unshare: {os.strerror(ctypes.get_errno())}")
        mount(None, "/", MS_REC | MS_PRIVATE)
        for m in sorted(spec["mounts"], key=lambda m: m["target"].count("/")):
            ensure_mountpoint(m["target"], os.path.isfile(m["source"]), spec["created_log"])
            mount(m["source"], m["target"], MS_BIND | MS_REC)
            if m.get("read_only"):
                mount(None, m["target"], MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        if spec.get("hosts"):
            mount(spec["hosts"], "/etc/hosts", MS_BIND)
        if spec.get("hostname"):
            socket.sethostname(spec["hostname"])
    try:
        os.chdir(spec["cwd"])
    except OSError as e:
        fail(f"working dir {spec['cwd']}: {e.strerror}")
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as e:
        # What a container runtime reports as "executable file not found": exit 127 like a shell.
        fail(f"exec {argv[0]}: {e.strerror}", 127)


if __name__ == "__main__":
    main()
