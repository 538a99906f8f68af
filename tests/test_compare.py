"""`verity compare`: a champion against a challenger on a frozen benchmark, with paired figures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity import cli as verity_cli
from verity.datasets.manifest import ManifestRow, write_manifest
from verity.training.compare import CompareError, compare, mcnemar, paired_auc_interval

pytestmark = pytest.mark.torch  # the training extra (scipy)


def _images(folder: Path, levels: list[int], seed: int) -> list[ManifestRow]:
    """Noisy grey images around each brightness level: brighter ones are counterfeit (the tiny model's
    rule), with some overlap so that the ROC AUC is neither 0.5 nor 1."""
    rng = np.random.default_rng(seed)
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for index, level in enumerate(levels):
        pixels = np.clip(rng.normal(level, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{seed}-{index}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        label = "counterfeit" if level + rng.normal(0, 30) > 128 else "genuine"
        rows.append(ManifestRow(path=str(path), label=label, modality="photo", split="test"))
    return rows


def _model(root: Path, version: str, trained_on: list[ManifestRow]) -> Path:
    spec = tiny_spec("photo")
    card = tiny_card(spec, "m", version, alarm=0.6, clear=0.4)
    path = tiny_onnx(root / "m" / version / "model.onnx", spec, card)
    train = [ManifestRow(path=r.path, label=r.label, modality="photo", split="train") for r in trained_on]
    write_manifest(path.parent / "data.jsonl", train)
    return path


def test_two_equal_models_differ_by_nothing_beyond_noise(tmp_path: Path, capsys) -> None:
    training = _images(tmp_path / "train", list(range(40, 240, 10)), seed=1)
    benchmark = _images(tmp_path / "bench", list(range(30, 250, 5)), seed=2)
    write_manifest(tmp_path / "bench.jsonl", benchmark)
    old, new = _model(tmp_path, "1", training), _model(tmp_path, "2", training)
    result = compare(old, new, tmp_path / "bench.jsonl")
    assert result["images"] == len(benchmark) and result["roc_auc_difference"] == 0.0
    assert result["roc_auc_difference_interval"] == [0.0, 0.0] and not result["worse_beyond_noise"]
    assert result["verdict_changes"] == 0.0 and result["mcnemar"]["p_value"] == 1.0
    assert 0.5 < result["champion"]["roc_auc"] < 1.0
    argv = ["compare", "--champion", str(old.parent), "--challenger", str(new.parent),
            "--data", str(tmp_path / "bench.jsonl"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert verity_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "not different beyond noise" in printed and "McNemar" in printed
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["images"] == len(benchmark)


def test_a_benchmark_a_model_learnt_from_is_refused(tmp_path: Path, capsys) -> None:
    training = _images(tmp_path / "train", [60, 200, 90, 180], seed=1)
    write_manifest(tmp_path / "bench.jsonl", training[:2])  # two of its training images
    old, new = _model(tmp_path, "1", training), _model(tmp_path, "2", training[2:])
    with pytest.raises(CompareError, match="2 of the benchmark's 2 images are in the champion"):
        compare(old, new, tmp_path / "bench.jsonl")
    assert verity_cli.main(["compare", "--champion", str(old.parent), "--challenger", str(new.parent),
                            "--data", str(tmp_path / "bench.jsonl")]) == 1  # fmt: skip
    assert "never trained on" in capsys.readouterr().err


def test_the_paired_interval_finds_a_worse_challenger_and_mcnemar_counts_discordant_pairs() -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 150)
    champion = targets + rng.normal(0, 0.5, targets.size)  # separates well
    challenger = targets + rng.normal(0, 1.5, targets.size)  # much noisier
    low, high = paired_auc_interval(champion, challenger, targets)
    assert low < high < 0.0
    same = paired_auc_interval(champion, champion.copy(), targets)
    assert same == (0.0, 0.0)
    right_a = np.array([True] * 30 + [False] * 10 + [True] * 60)
    right_b = np.array([False] * 30 + [True] * 10 + [True] * 60)
    test = mcnemar(right_a, right_b)
    assert (test["only_champion_right"], test["only_challenger_right"]) == (30, 10) and test["p_value"] < 0.01
