"""The sandbox worker: one process running one grader's `grade(sample, item)` for the trainer or the operator.

Started by local.py as `python -I -S -B -X utf8 worker.py CONFIG` (a clean interpreter: no site-packages,
no PYTHON* variables, an empty environment), with its scratch folder as the working directory and only
stdin/stdout/stderr open. Standard library only; it cannot import whetstone_graders.

Protocol (frames are a 4-byte big-endian length and UTF-8 JSON), on stdin (requests) and stdout (answers):

    -> {"op": "init", "source": "<python>"}
    <- {"ok": true, "layers": [...], "missing": {"layer": "why"}}   (confined; or {"ok": false, ...})
    <- {"ok": true}   or   {"ok": false, "error": "invalid_source", "message": "..."}   (the source loaded)
    -> {"op": "grade", "calls": [[sample, item], ...]}
    <- {"i": 0, "score": 0.5, "seconds": ...}  or  {"i": 0, "error": "exception", "message": "..."}
       (one answer per call, as soon as it is done)

Order of the start: read the init frame, confine (confine.py: namespaces, uid, rlimits, Landlock, seccomp),
install the audit hook, forget ctypes, then compile and run the user's source. Descriptors 0, 1 and 2 point at
/dev/null once the protocol has its own copies, and sys.stdout / sys.stderr count what user code prints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
import time
import traceback

MAX_FRAME = 64 * 1024 * 1024
BLOCKED_MODULES = ("ctypes", "_ctypes", "cffi", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                   "_testinternalcapi", "_testbuffer", "_testimportmultiple", "_testmultiphase")  # fmt: skip
PROCESS_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                  "subprocess.Popen", "pty.spawn", "os.startfile")  # fmt: skip
WRITE_EVENTS = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chflags", "os.mkfifo",
                "os.mknod", "os.setxattr", "os.removexattr")  # fmt: skip
READ_EVENTS = ("os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.listxattr", "os.getxattr")
INTROSPECTION = ("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                 "sys._current_exceptions", "resource.setrlimit", "resource.prlimit")  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# --- the protocol -------------------------------------------------------------------------------------------


class Channel:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def _read_exactly(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = os.read(self.rfd, min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict | None:
        head = self._read_exactly(4)
        if head is None:
            return None
        (length,) = struct.unpack(">I", head)
        if length > MAX_FRAME:
            return None
        body = self._read_exactly(length)
        return None if body is None else json.loads(body)

    def send(self, message: dict) -> None:
        data = json.dumps(message, allow_nan=False).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            data = data[os.write(self.wfd, data) :]


class Printed:
    """sys.stdout / sys.stderr of user code: keeps nothing, counts characters."""

    def __init__(self) -> None:
        self.count = 0
        self.limit = 0

    def write(self, text: str) -> int:
        self.count += len(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# --- the audit hook ----------------------------------------------------------------------------------------


def install_guard(
    read_roots: list[str], write_roots: list[str], allow_network: bool
) -> list[tuple[str, str]]:
    """Install the audit hook; returns the list it appends refused actions to, as (reason, what).

    In-process, so it is a second line behind the kernel layers (CPython's audit hooks are not a security
    boundary on their own); it also gives a refused action its reason code (network or forbidden). Its
    settings and every function it calls are captured here, in closure cells no frame or global refers to,
    so user code cannot reach them, and it looks up no global or builtin name at call time (user code could
    rebind those)."""
    import pathlib

    violations: list[tuple[str, str]] = []
    reads = tuple(r.rstrip("/") or "/" for r in read_roots)
    writes = tuple(r.rstrip("/") or "/" for r in write_roots)
    pid, getcwd, isinstance_, type_, str_, bytes_, int_, tuple_ = (
        os.getpid(), os.getcwd, isinstance, type, str, bytes, int, tuple
    )  # fmt: skip
    permission_error, getattr_, any_ = PermissionError, getattr, any
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    path_str, path_fspath = pathlib.PurePath.__str__, pathlib.PurePath.__fspath__
    write_flags, worker_file = WRITE_FLAGS, __file__
    blocked_modules, process_events, write_events = BLOCKED_MODULES, PROCESS_EVENTS, WRITE_EVENTS
    read_events, introspection = READ_EVENTS, INTROSPECTION

    def refuse(reason: str, what: str) -> None:
        violations.append((reason, what))
        raise permission_error(f"sandbox: {what} is not allowed")

    def normal(path: object) -> str | None:
        if isinstance_(path, int_):
            return None  # an already open descriptor
        if type_(path) is bytes_:
            path = bytes_.decode(path, "utf-8", "surrogateescape")
        elif (
            type_(path) in path_types
            and type_(path).__fspath__ is path_fspath
            and type_(path).__str__ is path_str
        ):
            path = path_str(path)
        if type_(path) is not str_:
            refuse("forbidden", f"opening a path given as {type_(path).__name__}")
        if not str_.startswith(path, "/"):
            path = getcwd() + "/" + path
        parts: list[str] = []
        for part in str_.split(path, "/"):
            if part == ".." and parts:
                parts.pop()
            elif part not in ("", ".", ".."):
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path: str, roots: tuple) -> bool:
        return any_(r == "/" or path == r or str_.startswith(path, r + "/") for r in roots)

    def check(path: object, write: bool, what: str) -> None:
        resolved = normal(path)
        if resolved is not None and not under(resolved, writes if write else reads + writes):
            refuse("forbidden", f"{what} {resolved}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            write = (type_(mode) is str_ and any_(c in mode for c in "wax+")) or (flags & write_flags) != 0
            check(path, write, "opening")
        elif event in read_events:
            if args and args[0] is not None:
                check(args[0], False, event)
        elif event in write_events:
            for arg in args[:2]:
                if not isinstance_(arg, (int_, tuple_)) and arg is not None:
                    check(arg, True, event)
        elif event in ("os.symlink", "os.link"):
            refuse("forbidden", event)
        elif event in process_events or str_.startswith(event, ("os.exec", "os.spawn", "os.posix_spawn")):
            refuse("forbidden", f"starting a process ({event})")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event != "os.kill" or args[0] != pid:
                refuse("forbidden", f"signalling another process ({event})")
        elif str_.startswith(event, "socket.") and not allow_network:
            refuse("network", f"using the network ({event})")
        elif event == "import" and str_.split(args[0], ".")[0] in blocked_modules:
            refuse("forbidden", f"importing {args[0]}")
        elif str_.startswith(event, "ctypes.") or event in introspection:
            refuse("forbidden", event)
        elif event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
            code = getattr_(args[0], "__code__", None)
            if code is not None and code.co_filename == worker_file:
                refuse("forbidden", "changing the sandbox")

    sys.addaudithook(hook)
    return violations


# --- one call -----------------------------------------------------------------------------------------------


def as_score(value: object) -> tuple[float | None, str | None, str | None]:
    if type(value) not in (int, float, bool):
        return None, "not_a_number", f"grade() returned {type(value).__name__}, not a number"
    try:
        score = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None, "not_a_number", "grade() returned an integer too large for a float"
    if math.isnan(score):
        return None, "nan", "grade() returned NaN"
    if math.isinf(score):
        return None, "infinite", f"grade() returned {score}"
    return score, None, None


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def run_call(grade, sample: dict, item: dict, violations: list, printed: Printed) -> dict:
    violations.clear()
    printed.count = 0
    started = time.perf_counter()
    score = error = message = None
    try:
        score, error, message = as_score(grade(sample, item))
    except MemoryError:
        error, message = "memory", "MemoryError: the grader ran out of its memory limit"
    except RecursionError as e:
        error, message = "exception", first_line(e)
    except PermissionError as e:  # refused by a kernel layer (Landlock, seccomp) when no audit hook named it
        error, message = "forbidden", first_line(e)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: user code must not end the worker
        error, message = "exception", first_line(e)
    seconds = time.perf_counter() - started
    if violations:
        error, what = violations[0]
        message = f"sandbox refused {what}"
    elif printed.count > printed.limit:
        error, message = "output_too_large", f"printed {printed.count} characters, more than {printed.limit}"
    if error:
        return {"error": error, "message": message, "seconds": seconds}
    return {"score": score, "seconds": seconds}


# --- start --------------------------------------------------------------------------------------------------


def load_confine(directory: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("whetstone_sandbox_confine", directory + "/confine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def confine(config: dict) -> tuple[list[str], dict[str, str], str, list[str]]:
    """Apply every requested layer that works. Returns (layers in force, missing layers and why, the
    scratch folder as the worker sees it, the read-only roots)."""
    wanted = set(config["layers"])
    limits = config["limits"]
    allow_network = bool(limits["allow_network"])
    scratch = config["scratch"]
    read_roots = [p for p in config["read_roots"] if os.path.exists(p)]
    layers, missing = ["process"], {}
    c = load_confine(os.path.dirname(os.path.abspath(__file__)))
    is_root = os.getuid() == 0

    if "namespaces" in wanted:
        try:
            scratch = c.enter_namespaces(scratch, read_roots, limits["disk_mb"], allow_network)
            layers.append("namespaces")
        except OSError as e:
            missing["namespaces"] = str(e)
    c.set_limits(limits["memory_mb"], config["cpu_cap_seconds"], limits["disk_mb"], 64)
    layers.append("rlimits")
    if "uid" in wanted and is_root:
        # Without a private root the standard library must stay readable for the new uid.
        if "namespaces" in layers or all(c.readable_by_anyone(p) for p in read_roots if os.path.isdir(p)):
            c.drop_uid(config["uid_base"] + os.getpid() % 65536, scratch)
            layers.append("uid")
        else:
            missing["uid"] = "the Python standard library is not readable by an unprivileged uid"
    elif "uid" in wanted:
        missing["uid"] = "not started as root"
    try:
        c.no_new_privs()
    except OSError as e:
        missing["no_new_privs"] = str(e)
    if "landlock" in wanted:
        try:
            read_only = read_roots + [d for d in config["devices"] if d != "/dev/null"]
            abi = c.apply_landlock(read_only, [scratch, "/dev/null"], allow_network)
            layers.append(f"landlock-abi{abi}")
        except OSError as e:
            missing["landlock"] = str(e)
    if "seccomp" in wanted:
        try:
            c.apply_seccomp(allow_network)
            layers.append("seccomp")
        except OSError as e:
            missing["seccomp"] = str(e)
    c.forget_ctypes()
    return layers, missing, scratch, read_roots


def main() -> None:
    config = json.loads(sys.argv[1])
    # A write past RLIMIT_FSIZE fails with EFBIG (an exception in the grader) instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    channel = Channel(os.dup(0), os.dup(1))
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    init = channel.receive()
    if not init or init.get("op") != "init":
        return
    try:
        layers, missing, scratch, read_roots = confine(config)
    except Exception as e:  # a layer that half-applied: refuse to run user code at all
        channel.send({"ok": False, "error": "crashed", "message": f"sandbox setup failed: {first_line(e)}"})
        return
    os.environ.clear()
    os.environ.update({"TMPDIR": scratch, "HOME": scratch})
    os.chdir(scratch)
    sys.path[:] = [p for p in sys.path if any(p == r or p.startswith(r + "/") for r in read_roots)]
    limits = config["limits"]
    violations: list[tuple[str, str]] = []
    if "audit" in config["layers"]:
        violations = install_guard(
            read_roots + config["devices"], [scratch, "/dev/null"], bool(limits["allow_network"])
        )
        layers.append("audit")
    printed = Printed()
    printed.limit = int(limits["max_output_bytes"])
    sys.stdout = sys.stderr = printed  # type: ignore[assignment]
    channel.send({"ok": True, "layers": layers, "missing": missing})

    namespace: dict = {"__name__": "grader", "__builtins__": __builtins__}
    try:
        exec(compile(init["source"], "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no function grade(sample, item)")
    except BaseException as e:
        detail = traceback.format_exception_only(type(e), e)[-1].strip()
        reason = violations[0][0] if violations else "invalid_source"
        channel.send({"ok": False, "error": reason, "message": detail[:300]})
        return
    channel.send({"ok": True})

    while True:
        request = channel.receive()
        if request is None or request.get("op") != "grade":
            return
        for i, (sample, item) in enumerate(request["calls"]):
            result = run_call(grade, sample, item, violations, printed)
            result["i"] = i
            channel.send(result)


if __name__ == "__main__":
    main()
