"""The sandbox catalogue: user grader code that misbehaves in every way we could think of is contained,
counted by grader and reason, scored per onError, and the caller (the trainer's side, this test process)
goes on.

Every attack is one RewardGrader of one GraderSet graded on one batch, as an RFT step would; each test then
checks its grader's outcome. A second set of probes runs with only the kernel layers (no in-process audit
hook) and reports from inside whether the attack worked, so the kernel's part is shown on its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from whetstone_api.rewardgrader import RewardGraderSpec
from whetstone_graders import GraderFailed, GraderSet, Reward, Sample
from whetstone_graders.sandbox import LocalSandbox

ROOT = Path(__file__).resolve().parent.parent

FAKE_KEY = "sk-whetstone-test-fake-key-0123456789"
LIMITS = {"timeoutSeconds": 1.5, "cpuSeconds": 30, "memoryMb": 256, "diskMb": 4, "maxOutputBytes": 65536}
# A busy loop ends at whichever limit comes first; these make that deterministic on a loaded machine.
LIMITS_OF = {"burns-cpu": {"cpuSeconds": 0.5, "timeoutSeconds": 30}, "allocates": {"timeoutSeconds": 30}}


def attacks(secret: Path, outside: Path, port: int) -> dict[str, tuple[str, str | None]]:
    """name -> (source, the reason it must be counted under; None: it must score normally)."""
    return {
        "raises": ("def grade(s, i):\n    raise ValueError('boom')", "exception"),
        "infinite-loop": ("def grade(s, i):\n    while True:\n        pass", "timeout"),
        "burns-cpu": ("def grade(s, i):\n    while True:\n        pass", "cpu_time"),
        "sleeps": ("import time\ndef grade(s, i):\n    time.sleep(60)", "timeout"),
        "nan": ("def grade(s, i):\n    return float('nan')", "nan"),
        "inf": ("def grade(s, i):\n    return float('-inf')", "infinite"),
        "string": ("def grade(s, i):\n    return '1.0'", "not_a_number"),
        "none": ("def grade(s, i):\n    return None", "not_a_number"),
        "huge-int": ("def grade(s, i):\n    return 10 ** 400", "not_a_number"),
        "float-subclass": (
            "class F(float):\n    pass\ndef grade(s, i):\n    return F(1.0)",
            "not_a_number",
        ),
        "prints-megabytes": (
            "def grade(s, i):\n    print('x' * 20_000_000)\n    return 1.0",
            "output_too_large",
        ),
        "fork": ("import os\ndef grade(s, i):\n    os.fork()\n    return 1.0", "forbidden"),
        "fork-bomb": ("import os\ndef grade(s, i):\n    while True:\n        os.fork()", "forbidden"),
        "subprocess": (
            "def grade(s, i):\n    import subprocess\n"
            "    subprocess.run(['sh', '-c', 'echo hi'])\n    return 1.0",
            "forbidden",
        ),
        "allocates": (
            "def grade(s, i):\n    keep = []\n    while True:\n        keep.append(bytearray(10 ** 7))",
            "memory",
        ),
        "writes-outside": (
            f"def grade(s, i):\n    open({str(outside)!r}, 'w').write('pwned')\n    return 1.0",
            "forbidden",
        ),
        "reads-secret": (
            f"def grade(s, i):\n    return float(len(open({str(secret)!r}).read()))",
            "forbidden",
        ),
        "lists-secrets": (
            f"import os\ndef grade(s, i):\n    return float(len(os.listdir({str(secret.parent.parent)!r})))",
            "forbidden",
        ),
        "reads-parent-env": (
            "import os\ndef grade(s, i):\n"
            f"    return float(open(f'/proc/{{os.getppid()}}/environ').read().count({FAKE_KEY!r}))",
            "forbidden",
        ),
        "socket": (
            "import socket\ndef grade(s, i):\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    return 1.0",
            "network",
        ),
        "ctypes": ("def grade(s, i):\n    import ctypes\n    return 1.0", "forbidden"),
        "segfault": ("import faulthandler\ndef grade(s, i):\n    faulthandler._sigsegv()", "crashed"),
        "os-exit": ("import os\ndef grade(s, i):\n    os._exit(0)", "crashed"),
        "kills-itself": ("import os\ndef grade(s, i):\n    os.kill(os.getpid(), 9)", "crashed"),
        "kills-parent": (
            "import os, signal\ndef grade(s, i):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 1.0",
            "forbidden",
        ),
        "sys-exit": ("import sys\ndef grade(s, i):\n    sys.exit(0)", "exception"),
        "recursion": (
            "def grade(s, i):\n    def f(n):\n        return f(n + 1)\n    return f(0)",
            "exception",
        ),
        "raises-rlimit": (
            "import resource\ndef grade(s, i):\n"
            "    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n    return 1.0",
            "forbidden",
        ),
        "huge-file": (
            "def grade(s, i):\n    open('big', 'wb').write(bytes(64 << 20))\n    return 1.0",
            "exception",
        ),
        "forges-protocol": (
            "import os\ndef grade(s, i):\n    for fd in range(3, 12):\n"
            "        try:\n            os.write(fd, b'\\x7f\\xff\\xff\\xff')\n"
            "        except OSError:\n            pass\n"
            "    return 1.0",
            "output_too_large",
        ),
        "patches-builtins-then-reads": (
            # The audit hook must not look these up at call time (it captured them when it was installed).
            "import builtins\nbuiltins.any = lambda *a: True\n"
            "builtins.getattr = lambda *a: None\n"
            f"def grade(s, i):\n    return float(len(open({str(secret)!r}).read()))",
            "forbidden",
        ),
        "threads": (
            "import threading\ndef grade(s, i):\n    threading.Thread(target=print).start()\n    return 1.0",
            "exception",
        ),
        "uses-scratch": (
            "import os, tempfile\ndef grade(s, i):\n    open('a.txt', 'w').write('12345')\n"
            "    with tempfile.NamedTemporaryFile('w') as f:\n        f.write('x')\n"
            "    return float(len(open('a.txt').read()))",
            None,
        ),
    }


@pytest.fixture(scope="module")
def catalogue() -> Iterator[dict[str, Any]]:
    # Not under /tmp: inside the namespaces the sandbox has a /tmp of its own (its scratch folder), where a
    # host path under /tmp would simply not exist.
    root = Path(tempfile.mkdtemp(prefix="whetstone-sandbox-test-", dir="/var/tmp"))
    secret = root / "grader-secrets" / "judge" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text(FAKE_KEY)
    outside = root / "pwned.txt"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[object] = []

    def accept() -> None:
        while not stopped.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    stopped = threading.Event()
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    cases = attacks(secret, outside, listener.getsockname()[1])
    specs = {
        name: RewardGraderSpec.model_validate(
            {"python": {"source": src, "limits": {**LIMITS, **LIMITS_OF.get(name, {})}}, "onError": "zero"}
        )
        for name, (src, _) in cases.items()
    }
    scratch_root = root / "scratch"  # where the workers' scratch folders go, to check they are removed
    scratch_root.mkdir()
    old_tempdir, tempfile.tempdir = tempfile.tempdir, str(scratch_root)
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = FAKE_KEY  # the trainer's own credentials, which no grader may see
    try:
        with GraderSet(
            [(n, 1.0) for n in cases], specs, secrets_dir=secret.parent.parent, workers=1
        ) as graders:
            rewards = graders.grade([Sample("first"), Sample("second")], [{}, {}])
            stats = graders.stats()
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY")
        else:
            os.environ["OPENAI_API_KEY"] = old
        tempfile.tempdir = old_tempdir
        stopped.set()
        acceptor.join()
        listener.close()
    yield {
        "cases": cases,
        "rewards": rewards,
        "stats": stats,
        "outside": outside,
        "accepted": accepted,
        "scratch_root": scratch_root,
    }
    shutil.rmtree(root)


def _grades(catalogue: dict[str, Any], name: str) -> list[Any]:
    rewards: list[Reward] = catalogue["rewards"]
    return [r.grades[name] for r in rewards]


CASE_NAMES = list(attacks(Path("/s/s/s"), Path("/o"), 1))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_attack_is_contained_counted_and_scored_per_on_error(
    catalogue: dict[str, Any], name: str
) -> None:
    _, reason = catalogue["cases"][name]
    grades = _grades(catalogue, name)
    stats = catalogue["stats"]
    if reason is None:
        assert [g.score for g in grades] == [5.0, 5.0] and not any(g.error for g in grades)
        return
    # Both samples of the batch: the second one ran on a fresh worker when the first one killed its own.
    assert [g.error for g in grades] == [reason, reason], [g.message for g in grades]
    assert [g.score for g in grades] == [0.0, 0.0]  # onError: zero
    assert stats.errors[(name, reason)] == 2
    assert all(g.message for g in grades)


def test_the_caller_went_on_and_nothing_leaked(catalogue: dict[str, Any]) -> None:
    stats = catalogue["stats"]
    assert stats.calls == {name: 2 for name in CASE_NAMES}
    assert not catalogue["outside"].exists()
    assert catalogue["accepted"] == []  # no connection ever reached the listener
    # Every layer this host offers was in force.
    assert {"process", "rlimits", "audit", "seccomp"} <= set(stats.sandbox)
    assert any(layer.startswith("landlock") for layer in stats.sandbox) or "namespaces" in stats.sandbox


def test_no_worker_process_or_scratch_folder_survives_close(catalogue: dict[str, Any]) -> None:
    children = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True
    )
    assert "worker.py" not in children.stdout
    assert list(catalogue["scratch_root"].iterdir()) == []


def test_on_error_skip_and_fail_with_a_hostile_grader() -> None:
    source = "import os\ndef grade(s, i):\n    os.kill(os.getppid(), 9)"
    skip = RewardGraderSpec.model_validate({"python": {"source": source}, "onError": "skip"})
    with GraderSet([("k", 1.0)], {"k": skip}) as graders:
        (reward,) = graders.grade([Sample("x")], [{}])
        assert reward.total is None and reward.grades["k"].error == "forbidden"
    fail = RewardGraderSpec.model_validate({"python": {"source": source}, "onError": "fail"})
    with (
        GraderSet([("k", 1.0)], {"k": fail}) as graders,
        pytest.raises(GraderFailed, match="RewardGrader k failed"),
    ):
        graders.grade([Sample("x")], [{}])


def test_module_level_code_that_hangs_is_one_error_not_a_restart_storm() -> None:
    limits = {"timeoutSeconds": 0.5}
    hangs = RewardGraderSpec.model_validate({"python": {"source": "while True:\n    pass", "limits": limits}})
    with GraderSet([("h", 1.0)], {"h": hangs}, workers=2) as graders:
        rewards = graders.grade([Sample(str(n)) for n in range(8)], [{}] * 8)
        assert {r.grades["h"].error for r in rewards} == {"timeout"}
        assert all("loading the grader" in (r.grades["h"].message or "") for r in rewards)
        sandbox = graders._sandboxes[0]
        assert sandbox.started == 0  # no worker ever got past loading; at most one try per pool slot


def test_a_catastrophic_regex_costs_one_timeout() -> None:
    redos = RewardGraderSpec.model_validate(
        {"regex": {"pattern": "^(a+)+$", "limits": {"timeoutSeconds": 1}}}
    )
    with GraderSet([("r", 1.0)], {"r": redos}) as graders:
        fine, evil = graders.grade([Sample("aaaa"), Sample("a" * 40 + "b")], [{}, {}])
    assert fine.total == 1.0
    assert evil.grades["r"].error == "timeout"


# --- the kernel layers alone ------------------------------------------------------------------------------

PROBES = {
    # name: source whose grade() returns 1.0 if the attack worked, 0.0 if it was refused
    "read-secret": "def grade(s, i):\n    open(i['secret']).read()\n    return 1.0",
    "list-secrets": "import os\ndef grade(s, i):\n    os.listdir(i['secrets'])\n    return 1.0",
    "parent-env": (
        "import os\ndef grade(s, i):\n"
        "    return float(i['key'] in open(f'/proc/{os.getppid()}/environ').read())"
    ),
    "write-outside": "def grade(s, i):\n    open(i['outside'], 'w').write('x')\n    return 1.0",
    "connect": (
        "import socket\ndef grade(s, i):\n"
        "    socket.create_connection(('127.0.0.1', i['port']), 1)\n    return 1.0"
    ),
    "udp": (
        "import socket\ndef grade(s, i):\n"
        "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    u.sendto(b'x', ('127.0.0.1', i['port']))\n    return 1.0"
    ),
    "fork": (
        "import os\ndef grade(s, i):\n    pid = os.fork()\n"
        "    if pid == 0:\n        os._exit(0)\n    return 1.0"
    ),
    "exec": "import os\ndef grade(s, i):\n    os.execv('/bin/true', ['true'])",
    "kill-parent": "import os\ndef grade(s, i):\n    os.kill(os.getppid(), 0)\n    return 1.0",
    "kill-everyone": "import os\ndef grade(s, i):\n    os.kill(-1, 0)\n    return 1.0",
    "ctypes-kill-parent": (
        "import ctypes, os\ndef grade(s, i):\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    return 1.0 if libc.kill(os.getppid(), 0) == 0 else 0.0"
    ),
    "ctypes-socket": (
        "import ctypes\ndef grade(s, i):\n    return 1.0 if ctypes.CDLL(None).socket(2, 1, 0) >= 0 else 0.0"
    ),
}


def probe_source(body: str) -> str:
    return textwrap.dedent(
        body.replace("def grade(", "def _attack(")
        + "\n\ndef grade(s, i):\n    try:\n        return float(_attack(s, i) or 0.0)\n"
        "    except (OSError, PermissionError):\n        return 0.0\n"
    )


@pytest.mark.parametrize(
    "layers",
    [
        ("namespaces", "uid", "landlock", "seccomp"),  # root: the kernel layers
        ("landlock", "seccomp"),  # what an unprivileged pod without user namespaces gets
        ("audit",),  # no kernel help at all: CPython's audit hook alone (best effort)
    ],
)
def test_each_set_of_layers_alone_refuses_every_probe(tmp_path: Path, layers: tuple[str, ...]) -> None:
    secret = tmp_path / "secrets" / "judge" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text(FAKE_KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    item = {
        "secret": str(secret),
        "secrets": str(secret.parent.parent),
        "outside": str(tmp_path / "pwned"),
        "port": listener.getsockname()[1],
        "key": FAKE_KEY,
    }
    os.environ["WHETSTONE_TEST_FAKE_KEY"] = FAKE_KEY
    worked, in_force = {}, set()
    try:
        for name, body in PROBES.items():
            with LocalSandbox(probe_source(body), workers=1, layers=layers, name=name) as sandbox:
                (outcome,) = sandbox.run([({"output_text": ""}, item)])
                in_force |= set(sandbox.layers)
            # Refused: the attack's own code saw it fail (0.0), or the audit hook refused it (an error).
            if outcome.score != 0.0 and outcome.error not in ("forbidden", "network"):
                worked[name] = (outcome.score, outcome.error, outcome.message)
    finally:
        os.environ.pop("WHETSTONE_TEST_FAKE_KEY")
        listener.close()
    assert worked == {}
    assert not (tmp_path / "pwned").exists()
    if "seccomp" in layers:
        assert "audit" not in in_force and "seccomp" in in_force
        assert any(layer.startswith("landlock") for layer in in_force)
    else:
        assert in_force == {"process", "rlimits", "audit"}


def test_signals_to_the_caller_are_refused_by_the_kernel_too() -> None:
    # The real thing, not a probe: if it got through, this test process would die.
    source = "import os, signal\ndef grade(s, i):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 1.0"
    with LocalSandbox(source, workers=1, layers=("landlock", "seccomp")) as sandbox:
        (outcome,) = sandbox.run([({"output_text": ""}, {})])
    assert outcome.error == "forbidden"
    assert os.getpid() > 0 and signal.SIGKILL  # still here


def test_workers_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    # A trainer killed with SIGKILL while its grader sleeps inside user code: the worker must not linger.
    script = tmp_path / "trainer.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, threading
            from whetstone_api.rewardgrader import SandboxLimits
            from whetstone_graders.sandbox import LocalSandbox
            sandbox = LocalSandbox("import time\\ndef grade(s, i):\\n    time.sleep(600)",
                                   SandboxLimits(timeout_seconds=600))
            threading.Thread(target=sandbox.run, args=([({}, {})],), daemon=True).start()
            print("grading", flush=True)
            threading.Event().wait()
            """
        )
    )
    env = {"PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("api", "graders")), "PATH": "/usr/bin:/bin"}
    env["TMPDIR"] = str(tmp_path)  # a killed trainer cannot remove its workers' scratch folders
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    assert trainer.stdout is not None and trainer.stdout.readline() == "grading\n"

    def workers() -> list[int]:
        found = []
        for task in Path(f"/proc/{trainer.pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
        return found

    deadline = time.monotonic() + 30
    while not workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    (worker,) = workers()
    time.sleep(0.5)  # let it get into grade()
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()


def test_a_read_only_root_under_the_hosts_tmp_keeps_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A virtual environment under /tmp makes its lib folder one of the read-only roots; the sandbox's own
    # /tmp (its scratch folder) used to take that path's mount point, and the namespaces (and with them the
    # uid) were lost: threads, the host's files and the network were no longer confined by the kernel.
    from whetstone_graders.sandbox import local

    venv_like = Path(tempfile.mkdtemp(prefix="whetstone-ro-root-", dir="/tmp"))
    python_roots = local.python_roots
    try:
        venv_like.chmod(0o755)
        (venv_like / "data.txt").write_text("42")
        (venv_like / "data.txt").chmod(0o644)
        source = (
            "import threading\n"
            "def grade(s, i):\n"
            f"    value = float(open({str(venv_like / 'data.txt')!r}).read())\n"
            "    try:\n"
            "        threading.Thread(target=print).start()\n"
            "    except RuntimeError:  # RLIMIT_NPROC, once the uid is dropped\n"
            "        return value\n"
            "    return -1.0\n"
        )
        spec = RewardGraderSpec.model_validate({"python": {"source": source}, "onError": "zero"})

        def layers_and_score() -> tuple[tuple[str, ...], float | None]:
            with GraderSet([("g", 1.0)], {"g": spec}, workers=1) as graders:
                grade = graders.grade([Sample("x")], [{}])[0].grades["g"]
                return graders.stats().sandbox, grade.score

        without, _ = layers_and_score()
        monkeypatch.setattr(local, "python_roots", lambda: [*python_roots(), str(venv_like)])
        with_root, score = layers_and_score()
    finally:
        shutil.rmtree(venv_like)
    assert with_root == without
    if "uid" in with_root:  # the file is bound read-only at its own path, and the thread was refused
        assert score == 42.0
