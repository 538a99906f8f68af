"""Serving must not import the training stack: a console installs only what `serve` needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision", "albumentations", "timm", "training")

PROBE = """
import json, sys, tempfile
import verity.api.app, verity.api.cli, verity.api.feedback, verity.cli
import uvicorn  # what `verity serve` runs
from verity.api.settings import Settings
tmp = tempfile.mkdtemp()
app = verity.api.app.create_app(Settings(models_dir=tmp, audit_db=tmp + "/a.sqlite", keys_file=tmp + "/k.json"))
app.openapi()
print(json.dumps(sorted(name for name in sys.modules)))
"""


def test_api_and_serve_path_load_neither_torch_nor_albumentations() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = [m for m in modules if m.split(".")[0] in FORBIDDEN]
    assert not loaded, f"serving imported {loaded[:10]}"
    assert "fastapi" in modules and "verity.api.app" in modules


def test_api_sources_never_import_training_packages() -> None:
    for path in (REPO / "api").glob("*.py"):
        text = path.read_text()
        for name in FORBIDDEN:
            assert f"import {name}" not in text and f"from {name}" not in text, (path.name, name)
