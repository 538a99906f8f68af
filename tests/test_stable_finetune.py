"""The stable fine-tune: backbone and head rates, the weight average, the early-stopping floor, and an
export gate that never throws a run away (issue: training defaults that never trail a plain fine-tune).

Tiny folders (32 px) and tiny steps: these check the mechanics; benchmarks/real_data.py measures the
recipe on real sets.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.test_trainer import FAST, make_folder
from verity.datasets.manifest import write_manifest
from verity.datasets.rows import folder_rows
from verity.inference.spec import resolve_spec
from verity.training.averaging import MAX_DECAY, MIN_DECAY, ema_decay
from verity.training.config import build_config
from verity.training.models import build_for_spec
from verity.training.run import make_optimizer, peak_lr
from verity.training.trainer import should_stop, stop_floor, train_from_options

torch.set_num_threads(1)
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("stable") / "data")


def noisy_validation_manifest(folder: Path, target: Path) -> Path:
    """The tiny folder with a fixed split whose validation labels are a coin toss: its ROC AUC is noise."""
    rows = folder_rows(folder, "photo")
    rng = random.Random(0)
    placed = []
    for index, row in enumerate(rows):
        split = "val" if index % 3 == 0 else "train"
        label = rng.choice(["genuine", "counterfeit"]) if split == "val" else row.label
        placed.append(replace(row, split=split, label=label))
    val_labels = {row.label for row in placed if row.split == "val"}
    assert val_labels == {"genuine", "counterfeit"}
    write_manifest(target, placed)
    return target


# ------------------------------------------------------------------------------------------ the two rates
def test_the_pretrained_backbone_learns_at_a_fraction_of_the_head_rate() -> None:
    spec = resolve_spec("photo", override={"image_size": 32})
    model = build_for_spec("efficientnet_lite0", spec, pretrained=False)
    config = build_config(overrides={"lr": 1e-3, "backbone_lr_ratio": 0.2, "batch_size": 128})
    optimizer = make_optimizer(model, config, learned_backbone=True)
    head = {id(p) for p in model.head.parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr_scale"] == (1.0 if in_head == {True} else 0.2)
        assert group["weight_decay"] == (config.weight_decay if group["params"][0].ndim > 1 else 0.0)
    assert peak_lr(config) == pytest.approx(1e-3 * math.sqrt(128 / 32))
    # A backbone trained from scratch is as new as the head: one rate for both.
    scratch = make_optimizer(model, config, learned_backbone=False)
    assert {group["lr_scale"] for group in scratch.param_groups} == {1.0}


# -------------------------------------------------------------------------------------- early stopping
def test_early_stopping_never_fires_before_warm_up_and_half_the_epochs() -> None:
    config = build_config(overrides={"epochs": 20, "warmup_epochs": 1.0, "patience": 2})
    assert stop_floor(config) == 1.0 + 0.5 * 20
    assert stop_floor(config) >= config.warmup_epochs + 0.3 * config.epochs  # the least
    assert not should_stop(epochs_done=10, bad_epochs=9, config=config)
    assert should_stop(epochs_done=11, bad_epochs=2, config=config)
    assert not should_stop(epochs_done=11, bad_epochs=1, config=config)
    assert not should_stop(epochs_done=20, bad_epochs=20, config=replace(config, patience=0))


def test_a_noisy_validation_split_cannot_stop_a_run_early(tiny_folder: Path, tmp_path: Path) -> None:
    manifest = noisy_validation_manifest(tiny_folder, tmp_path / "noisy.jsonl")
    options = {**FAST, "warmup_epochs": 1.0, "patience": 1, "epochs": 8}
    result = train_from_options(data=str(manifest), model="resnet18", pretrained=False, out=str(tmp_path),
                                name="noisy", **options)  # fmt: skip
    history = torch.load(Path(result["run_dir"]) / "last.pt", weights_only=True)["run_state"]["history"]
    assert len(history) >= math.ceil(1.0 + 0.3 * 8)
    assert len(history) >= stop_floor(build_config(overrides=options))
    assert all("val_score_smoothed" in record for record in history)


# ------------------------------------------------------------------------------------- the weight average
def test_the_average_spans_a_tenth_of_the_run() -> None:
    assert ema_decay(250) == pytest.approx(1 - 1 / 25)
    assert ema_decay(10) == MIN_DECAY and ema_decay(10**7) == MAX_DECAY


def test_the_run_exports_the_average_of_its_weights(tiny_folder: Path, tmp_path: Path) -> None:
    options = dict(data=str(tiny_folder), model="resnet18", pretrained=False, epochs=3, **FAST)
    averaged = train_from_options(out=str(tmp_path), name="ema", **options)
    final = torch.load(averaged["model_pt"], weights_only=True)["state_dict"]
    last = torch.load(Path(averaged["run_dir"]) / "last.pt", weights_only=True)
    key = "features.0.weight"
    torch.testing.assert_close(final[key], last["ema_state_dict"][key], rtol=0, atol=0)
    assert not torch.equal(final[key], last["state_dict"][key])  # the raw weights are not exported
    raw = train_from_options(out=str(tmp_path), name="raw", ema=False, **options)
    raw_final = torch.load(raw["model_pt"], weights_only=True)["state_dict"]
    raw_last = torch.load(Path(raw["run_dir"]) / "last.pt", weights_only=True)
    torch.testing.assert_close(raw_final[key], raw_last["state_dict"][key], rtol=0, atol=0)
    assert raw_last["ema_state_dict"] is None


# ------------------------------------------------------------------------- the gate keeps the run
def test_a_failed_export_keeps_the_run_and_names_the_command_that_retries(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from verity.training import export
    from verity.training.cli import EXPORT_FAILED, train_main
    from verity.training.export_cli import main as export_main

    real_check = export.check_parity

    def drifting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - wraps the real check
        return {**real_check(*args, **kwargs), "logits_relative": 1.0}

    monkeypatch.setattr(export, "check_parity", drifting)
    argv = ["--data", str(tiny_folder), "--epochs", "1", "--name", "kept", "--out", str(tmp_path),
            "--image-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--allow-weak"]  # fmt: skip
    assert train_main(argv) == EXPORT_FAILED
    run_dir = tmp_path / "kept" / "dev"
    for name in ("model.pt", "card.json", "report.html", "data.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model.onnx").exists()
    error = capsys.readouterr().err
    assert "parity gate failed" in error and "The run is kept" in error
    retry = error.split("Export it again with: ")[1].split(" (add")[0].split()
    assert retry[:2] == ["verity", "export"]
    monkeypatch.setattr(export, "check_parity", real_check)
    assert export_main(retry[2:]) == 0
    assert (run_dir / "model.onnx").is_file()
    assert json.loads((run_dir / "card.json").read_text())["novelty"] is not None
