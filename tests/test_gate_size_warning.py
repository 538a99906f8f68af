"""The gate warns when validation is too small for the embedding's share of the rate: its threshold is
then the largest validation novelty, which an ordinary image passes 1 time in n + 1
(inference.gate_record)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_drift import monitored_model
from verity.inference.engine import OnnxEngine
from verity.inference.gate_record import (
    GATE_SIZE_WARNING,
    choose_novelty_threshold,
    gate_size_warnings,
    with_gate_warnings,
)


def test_a_split_too_small_for_its_share_is_warned_with_the_rate_it_gives() -> None:
    (warning,) = gate_size_warnings(32, 0.005)
    assert warning.startswith(f"{GATE_SIZE_WARNING} 32 validation images, fewer than the 200 (1 / 0.005)")
    assert "up to 1 time in 33 (3.0%; less with the validation images in the bank), not 1 in 200" in warning
    assert "--val-fraction" in warning
    assert gate_size_warnings(199, 0.005) and gate_size_warnings(200, 0.005) == []
    assert gate_size_warnings(0, 0.005) == []
    (grouped,) = gate_size_warnings(75, 0.005, val_cases=25)  # the synthetic console set's validation
    assert grouped.startswith(f"{GATE_SIZE_WARNING} 75 validation images of 25 cases, fewer than the 200")
    assert "up to 1 time in 26 (3.8%;" in grouped
    assert gate_size_warnings(32, 0.005, val_cases=32) == gate_size_warnings(32, 0.005)  # a case each
    assert gate_size_warnings(250, 0.005, val_cases=25) == []  # not their largest: no warning of it

def test_the_stated_rate_is_the_one_a_split_of_that_size_gives() -> None:
    """Why the warning's figure: with fewer than 1 / share images the threshold is their largest, and a new
    draw from the same distribution lies beyond it 1 time in n + 1 (simulated)."""
    rng = np.random.default_rng(0)
    beyond = [
        float(np.mean(rng.random(400) > choose_novelty_threshold(rng.random(32), 0.005)))
        for _ in range(2000)
    ]
    assert abs(np.mean(beyond) - 1 / 33) < 0.002


def test_a_new_gate_replaces_the_warning_of_the_one_before() -> None:
    old = (f"{GATE_SIZE_WARNING} 20 validation images, ...", "validation holds 40 genuine images, ...")
    record = {"warnings": gate_size_warnings(32, 0.005)}
    assert with_gate_warnings(old, record) == (old[1], *record["warnings"])
    assert with_gate_warnings(old, {}) == (old[1],)
    assert with_gate_warnings(None, {}) is None  # a card written before warnings keeps none
    assert with_gate_warnings(None, record) == tuple(record["warnings"])


@pytest.mark.torch  # the gate is built by training's code (training/open_set.py)
def test_the_card_and_a_rebuilt_card_carry_the_gate_warning_once(tmp_path: Path) -> None:
    from verity.training.open_set import rebuild_gate

    model = monitored_model(tmp_path / "models", tmp_path / "data")  # 30 validation images of 6 cases
    (warning,) = OnnxEngine(model).card.novelty["warnings"]
    assert warning.startswith(f"{GATE_SIZE_WARNING} 30 validation images of 6 cases")
    assert OnnxEngine(model).card.warnings == (warning,)  # what /v1/models, eval and reports show
    card = OnnxEngine(model).card.to_dict()
    (model.parent / "card.json").write_text(json.dumps({**card, "warnings": ["too few genuine images"]}))
    shutil.copy(tmp_path / "data" / "manifest.jsonl", model.parent / "data.jsonl")
    for _ in range(2):
        rebuild_gate(model.parent)
    written = json.loads((model.parent / "card.json").read_text())
    assert written["warnings"] == ["too few genuine images", warning]
    assert OnnxEngine(model).card.warnings == (warning,)
