"""The weak-run guard: a run that did not learn is refused with its reasons, never written as a model."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_trainer import FAST, make_folder
from verity.training.guard import WeakRunError, auc_interval, check_run, weak_signs

torch.set_num_threads(1)
pytestmark = pytest.mark.torch


def shuffled_copy(source: Path, target: Path, seed: int = 0) -> Path:
    """The same images with their labels drawn at random: nothing left to learn."""
    files = sorted(source.rglob("*.png"))
    rng = random.Random(seed)
    labels = ["genuine", "counterfeit"] * (len(files) // 2)
    rng.shuffle(labels)
    for index, (path, label) in enumerate(zip(files, labels, strict=True)):
        (target / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / label / f"{index:03d}.png")
    return target


@pytest.mark.slow
def test_shuffled_labels_are_refused_and_say_why(tmp_path, capsys) -> None:
    from verity.training.cli import train_main

    data = shuffled_copy(make_folder(tmp_path / "tidy", per_class=24), tmp_path / "shuffled")
    argv = ["--data", str(data), "--model", "resnet18", "--no-pretrained", "--epochs", "3",
            "--image-size", "32", "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--no-progress",
            "--out", str(tmp_path / "out"), "--name", "shuffled"]  # fmt: skip
    assert train_main(argv) == 3
    message = capsys.readouterr().err
    assert "did not learn" in message and "no model was written" in message
    assert "not above chance" in message or "uncertain" in message or "clamp" in message
    assert "Likely causes" in message and "--allow-weak" in message
    assert not (tmp_path / "out" / "shuffled" / "dev").exists()  # a refused run leaves nothing behind
    # With --allow-weak the model is written and its card says it is weak.
    assert train_main([*argv, "--allow-weak", "--no-report"]) == 0
    card = (tmp_path / "out" / "shuffled" / "dev" / "card.json").read_text()
    assert "weak run:" in card


@pytest.mark.slow
def test_a_run_that_learns_passes_the_guard(tmp_path) -> None:
    from verity.training.trainer import train_from_options

    data = make_folder(tmp_path / "tidy", per_class=24)
    options = {**FAST, "allow_weak": False, "export": False}
    result = train_from_options(data=str(data), model="resnet18", pretrained=False, epochs=4,
                                out=str(tmp_path), name="learns", **options)  # fmt: skip
    assert Path(result["model_pt"]).is_file()
    assert not [w for w in result["card"].warnings if w.startswith("weak run")]


def test_signs_of_a_weak_run() -> None:
    targets = np.array([0] * 20 + [1] * 20)
    refuse, _ = weak_signs(0.55, targets, uncertain_share=0.2, temperature=1.3, history=[])
    assert refuse and "not above chance" in refuse[0]
    refuse, report = weak_signs(0.97, targets, uncertain_share=0.98, temperature=20.0, history=[])
    assert len(refuse) == 1 and "98%" in refuse[0] and "clamp" in report[0]
    flat = [{"train_loss": 0.69}, {"train_loss": 0.68}, {"train_loss": 0.685}]
    refuse, report = weak_signs(0.97, targets, uncertain_share=0.1, temperature=1.0, history=flat)
    assert not refuse and "did not fall" in report[0]
    with pytest.raises(WeakRunError, match="Likely causes"):
        check_run(["validation ROC AUC 0.5"], [], allow_weak=False)
    assert check_run(["x"], ["y"], allow_weak=True) == ["weak run: x", "y"]


def test_auc_interval_narrows_with_more_images() -> None:
    small, large = auc_interval(0.8, 16, 16), auc_interval(0.8, 400, 400)
    assert small[0] < large[0] < 0.8 < large[1] < small[1]
    assert auc_interval(1.0, 10, 10) == (1.0, 1.0)
