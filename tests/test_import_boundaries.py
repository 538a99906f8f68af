"""What each package may import (docs/architecture.md): checked on the source and at run time.

The source check reads every module's imports, lazy ones inside functions included, and every string
that names one of our modules (dispatch tables and `importlib.import_module` calls import by string).
A rule that a test cannot see being broken protects nothing, so each rule is also shown failing on a
planted violation.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "verity"
PACKAGES = ("inference", "datasets", "training", "api")
HEAVY = ("torch", "torchvision", "albumentations", "timm")
# A string naming one of our modules (not a logger or metadata key such as "verity.spec").
MODULE_NAME = re.compile(rf"{NAMESPACE}\.(?:{'|'.join(PACKAGES)}|cli)(?:\.\w+)*")


@dataclass(frozen=True)
class Rule:
    may_import: tuple[str, ...]  # our packages this one may import
    forbidden: tuple[str, ...]  # third-party top-level names it must never import
    torch_module: str | None = None  # the one module allowed the forbidden names anyway


RULES = {
    "inference": Rule(may_import=(), forbidden=HEAVY),
    "api": Rule(may_import=("inference",), forbidden=HEAVY),
    "datasets": Rule(may_import=("inference",), forbidden=HEAVY, torch_module="torch_dataset.py"),
    "training": Rule(may_import=("inference", "datasets"), forbidden=()),
}


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) for each import, and for each string naming a module of ours."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.append((node.lineno, "<relative import>"))
        elif isinstance(node, ast.Constant) and MODULE_NAME.fullmatch(str(node.value)):
            names.append((node.lineno, str(node.value)))
    return names


def _violation(package: str, rule: Rule, module: Path, name: str) -> str | None:
    parts = name.split(".")
    if name == "<relative import>":
        return "relative import: write verity.<package>.<module>"
    if parts[0] in rule.forbidden and module.name != rule.torch_module:
        return f"imports {name}"
    if parts[0] in PACKAGES:
        return f"imports {name} by its bare folder name: write {NAMESPACE}.{name}"
    if parts[0] != NAMESPACE:
        return None
    if name == NAMESPACE:  # the root package itself (its __version__): every module's parent, always loaded
        return None
    target = parts[1]
    if target == package or target in rule.may_import:
        return None
    return f"imports {name} ({package} may import {', '.join(rule.may_import) or 'no other package of ours'})"


def find_violations(root: Path) -> list[str]:
    """Every import under root's package folders that breaks its package's rule, as 'path:line: why'."""
    found = []
    for package, rule in RULES.items():
        for module in sorted((root / package).rglob("*.py")):
            for line, name in imported_names(module.read_text(encoding="utf-8")):
                why = _violation(package, rule, module, name)
                if why:
                    found.append(f"{module.relative_to(root)}:{line}: {why}")
    return found


def test_the_tree_keeps_every_import_rule() -> None:
    assert find_violations(REPO) == []


PLANTED = {
    "inference/planted.py": ("import torch\n", "imports torch"),
    "inference/planted_ours.py": ("from verity.datasets.manifest import LABELS\n", "imports verity.datasets"),
    "api/planted.py": ("def lazy():\n    from verity.training import trainer\n", "imports verity.training"),
    "api/planted_torch.py": ("import torchvision.models\n", "imports torchvision.models"),
    "api/planted_string.py": ('TABLE = {"x": ("verity.datasets.cli", "main")}\n', "verity.datasets.cli"),
    # The root package's __version__ is allowed everywhere; the command beside it is not.
    "api/planted_command.py": ("from verity import __version__\nfrom verity.cli import main\n", "verity.cli"),
    "datasets/planted.py": ("import importlib\nimportlib.import_module('verity.api.feedback')\n", "api"),
    "datasets/planted_torch.py": ("import albumentations\n", "imports albumentations"),
    "training/planted.py": ("from verity.api.app import create_app\n", "imports verity.api.app"),
    "training/planted_bare.py": ("from inference.spec import PreprocessSpec\n", "bare folder name"),
    "inference/planted_relative.py": ("from .spec import PreprocessSpec\n", "relative import"),
}


@pytest.mark.parametrize("relative", sorted(PLANTED))
def test_each_rule_fails_on_a_planted_violation(tmp_path: Path, relative: str) -> None:
    source, expected = PLANTED[relative]
    for package in RULES:
        (tmp_path / package).mkdir()
    (tmp_path / "datasets" / "torch_dataset.py").write_text("import torch\n")  # allowed: the Dataset
    (tmp_path / "training" / "fine.py").write_text("import torch\nfrom verity.datasets import manifest\n")
    assert find_violations(tmp_path) == []
    (tmp_path / relative).write_text(source)
    found = find_violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(relative) and expected in found[0], found


SERVING_PROBE = """
import json, sys, tempfile
import uvicorn  # what `verity serve` runs
import verity.api.app, verity.api.cli, verity.api.feedback, verity.cli
from verity.api.settings import Settings
tmp = tempfile.mkdtemp()
settings = Settings(models_dir=tmp, audit_db=tmp + "/a.sqlite", keys_file=tmp + "/k.json")
verity.api.app.create_app(settings).openapi()
print(json.dumps(sorted(sys.modules)))
"""


def test_serving_loads_neither_torch_nor_the_training_stack() -> None:
    """At run time too: what a console installs with `pip install '.[serve]'` is all serving loads."""
    result = subprocess.run(
        [sys.executable, "-c", SERVING_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    training_stack = ("verity.training", "verity.datasets")
    # Ray only in its extra's deployment (api/ray_serve.py), never in what `verity serve` loads.
    loaded = [m for m in modules if m.split(".")[0] in (*HEAVY, "ray") or m.startswith(training_stack)]
    assert not loaded, f"serving imported {loaded[:10]}"
    assert "fastapi" in modules and "verity.api.app" in modules
