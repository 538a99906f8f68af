"""The README's client for scanner integrators runs as it is written, against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import LiveServer, server_env

from verity.datasets.encode import encode_dicom

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def integrators_block() -> str:
    section = README.read_text(encoding="utf-8").split("## For scanner integrators", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_client_runs_against_a_live_server(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(integrators_block(), encoding="utf-8")
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(encode_dicom(np.full((48, 48), 40000, np.uint16)))
    live = LiveServer(server_env(tmp_path)).start()
    try:
        command = [sys.executable, str(script), live.url, str(scan)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        live.stop()
    assert done.returncode == 0, done.stderr
    v1, v2, dicos = (line.split() for line in done.stdout.splitlines())
    assert v1[0] == "v1" and v1[1] in ("genuine", "counterfeit", "uncertain")
    assert v2[0] == "v2" and v2[1] in ("genuine", "counterfeit", "uncertain")
    assert dicos[0] == "dicos" and dicos[1] == v1[1] and dicos[2].startswith("1.2.826.0.1.3680043.8.498.")
    assert len(integrators_block().strip().splitlines()) <= 20
