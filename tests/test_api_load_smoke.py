"""The load-test script itself works: a few seconds at low concurrency against a real server.

The full run (60 s at concurrency 32) is `benchmarks/load_test.py`; here only its machinery is checked.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from api_fixtures import REPO, make_models_dir

pytestmark = pytest.mark.slow


def test_load_test_script_short_run(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    out = tmp_path / "figures.json"
    code = load_test.main(
        [
            "--models-dir",
            str(make_models_dir(tmp_path)),
            "--duration",
            "3",
            "--concurrency",
            "4",
            "--max-rss-growth",
            "1.0",
            "--json",
            str(out),
        ]
    )
    figures = json.loads(out.read_text())
    assert code == 0 and figures["passed"] and figures["ok"] > 0 and not figures["errors"]
    assert {"p50_ms", "p99_ms", "throughput_rps", "rss_end_mb"} <= set(figures)
