"""The import rules of the design card, checked on the source: the contract (whetstone_api) imports nothing of
ours and nothing but pydantic and yaml; the operator imports the contract (and the graders), never the trainer
or torch; the graders import only the contract and the standard library (their sandbox worker only the
standard library); the trainer never imports the operator or the CLI; the CLI reaches the operator and the
trainer only lazily."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT, SOURCE_DIRS

PACKAGES = {
    "whetstone_api": ROOT / "api" / "whetstone_api",
    "whetstone_cli": ROOT / "cli" / "whetstone_cli",
    "whetstone_graders": ROOT / "graders" / "whetstone_graders",
    "whetstone_operator": ROOT / "operator" / "whetstone_operator",
    "whetstone_trainer": ROOT / "trainer-image" / "whetstone_trainer",
}
OURS = set(PACKAGES)
STDLIB = set(sys.stdlib_module_names)


def imports(package: str, top_level_only: bool = False) -> dict[str, set[str]]:
    """Top-level names of absolute imports, by file (relative imports stay inside the package)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGES[package].rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        names: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, allowed: set[str], top_level_only: bool = False) -> dict[str, set[str]]:
    bad = {}
    for file, names in imports(package, top_level_only).items():
        extra = names - allowed - STDLIB - {"__future__"}
        if extra:
            bad[file] = extra
    return bad


def test_the_contract_imports_only_pydantic_and_yaml() -> None:
    assert offenders("whetstone_api", {"whetstone_api", "pydantic", "yaml"}) == {}


def test_the_operator_imports_the_contract_never_the_trainer() -> None:
    allowed = {
        "whetstone_api",
        "whetstone_graders",
        "whetstone_operator",
        "kopf",
        "kubernetes",
        "prometheus_client",
        "aiohttp",
        "yaml",
    }
    assert offenders("whetstone_operator", allowed) == {}


def test_the_graders_import_only_the_contract_and_the_standard_library() -> None:
    assert offenders("whetstone_graders", {"whetstone_api", "whetstone_graders"}) == {}


def test_what_runs_in_the_sandbox_imports_only_the_standard_library() -> None:
    # worker.py and confine.py run in a clean interpreter; similarity.py is sent to it as source.
    folder = PACKAGES["whetstone_graders"]
    for path in (
        folder / "sandbox" / "worker.py",
        folder / "sandbox" / "confine.py",
        folder / "similarity.py",
    ):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {
            n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        }
        assert names <= STDLIB | {"__future__"}, (path.name, names - STDLIB)


def test_the_trainer_never_imports_the_operator_or_the_cli() -> None:
    bad = {
        f: n & {"whetstone_operator", "whetstone_cli", "kopf"}
        for f, n in imports("whetstone_trainer").items()
    }
    assert {f: n for f, n in bad.items() if n} == {}


def test_the_cli_reaches_operator_and_trainer_only_lazily() -> None:
    heavy = {"whetstone_operator", "whetstone_trainer", "torch", "kopf", "kubernetes"}
    bad = {f: n & heavy for f, n in imports("whetstone_cli", top_level_only=True).items()}
    assert {f: n for f, n in bad.items() if n} == {}


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        ("import whetstone_cli.main as m; m.build_parser()", ("torch", "kopf", "whetstone_trainer")),
        (
            "import whetstone_operator.handlers, whetstone_operator.operator_main",
            ("torch", "transformers", "whetstone_trainer"),
        ),
        ("import whetstone_api.crd, whetstone_api.manifests, whetstone_api.wire", ("torch", "kopf")),
        # The operator's start-up, up to its first passes: not the other subcommands, not kopf (started once
        # the first passes are done), no resource model but the FineTuneJob's.
        (
            "import whetstone_cli.main as m; m.build_parser('operator'); "
            "import whetstone_operator.handlers, whetstone_operator.leader, whetstone_operator.kube; "
            "import whetstone_operator.operator_main as o; from whetstone_api import PLURALS; "
            "o.wait_for_crds(type('K', (), {'served_resources': lambda s, g, v: set(PLURALS.values())})())",
            (
                "kopf",
                "whetstone_cli.validate",
                "whetstone_cli.run",
                "whetstone_cli.get",
                "whetstone_api.rewardgrader",
                "whetstone_api.trainingsession",
                "whetstone_api.checkpoint",
                "whetstone_api.manifests",
                "whetstone_api.crd",
            ),
        ),
        (
            "import whetstone_graders, whetstone_operator.graders",
            ("torch", "kopf", "kubernetes", "whetstone_trainer", "whetstone_cli"),
        ),
    ],
)
def test_what_importing_pulls_in(code: str, forbidden: tuple[str, ...]) -> None:
    check = f"import sys; {code}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    env = {"PYTHONPATH": ":".join(map(str, SOURCE_DIRS)), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_no_package_is_named_operator() -> None:
    # `import operator` must stay the standard library's.
    assert not any(p.name == "operator" and (p / "__init__.py").exists() for p in ROOT.rglob("operator"))
