"""Our packages install under one `verity` namespace and shadow nothing on PyPI.

An ML engineer's environment often has Hugging Face `datasets`; before the namespace, `import datasets`
gave ours or theirs depending on path order. These tests run from a folder outside the repository, as an
installed user would, so the repository root is not on the path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from api_fixtures import build_wheel

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "inference", "datasets", "training")

BOTH = """
import json, datasets
import verity.datasets.manifest, verity.api.app, verity.inference.engine, verity.training.recipe
print(json.dumps({"hf": datasets.__file__, "has_load_dataset": hasattr(datasets, "load_dataset"),
                  "ours": verity.datasets.manifest.__file__}))
"""


def _run(code: str, cwd: Path, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # seconds of wall time: make test-fast stays under a minute
def test_hugging_face_datasets_and_ours_import_side_by_side(tmp_path: Path) -> None:
    found = _run(BOTH, tmp_path)
    assert found["has_load_dataset"] and "site-packages" in found["hf"]
    assert Path(found["ours"]).resolve() == REPO / "datasets" / "manifest.py"


def test_python_dash_m_verity_is_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "verity", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "verity <command>" in result.stdout


@pytest.mark.slow
def test_the_wheel_holds_only_the_verity_namespace_and_works_beside_datasets(tmp_path: Path) -> None:
    """What `pip install .` puts on a console: every module under verity/, nothing at the top level."""
    wheel = build_wheel(tmp_path)
    modules = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")]
    assert modules and all(name.startswith("verity/") for name in modules), modules[:5]
    for package in PACKAGES:
        assert f"verity/{package}/__init__.py" in modules
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    found = _run(BOTH, tmp_path, PYTHONPATH=str(target))
    assert found["has_load_dataset"] and Path(found["ours"]).is_relative_to(target)
