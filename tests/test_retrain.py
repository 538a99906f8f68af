"""`verity retrain` end to end on a small set: the model's rows and new cases ingested together, a
fine-tune from the model, and the comparison on a frozen benchmark beside the candidate; never a promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_trainer import make_folder
from verity import cli as verity_cli
from verity.datasets.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def test_retrain_runs_end_to_end_and_never_promotes(tmp_path: Path, capsys) -> None:
    from verity.training.trainer import train_from_options

    options = dict(image_size=32, batch_size=8, workers=0, progress=False, report=False, epochs=1,
                   warmup_epochs=0.0, allow_weak=True, model="resnet18", pretrained=False)  # fmt: skip
    old = str(make_folder(tmp_path / "old", per_class=16, seed=0))
    base = train_from_options(data=old, out=str(tmp_path / "models"), name="photo-m", version="1", **options)
    new_cases = make_folder(tmp_path / "seized", per_class=8, seed=1)
    frozen = make_folder(tmp_path / "frozen", per_class=8, seed=2)
    ingest = ["data", "ingest", str(frozen), "--out", str(tmp_path / "frozen.jsonl"), "--modality", "photo",
              "--no-progress", "--test", "0.9", "--val", "0.05"]  # fmt: skip
    assert verity_cli.main(ingest) == 0
    capsys.readouterr()
    argv = ["retrain", "--from", str(Path(base["model_onnx"]).parent), "--add", str(new_cases),
            "--benchmark", str(tmp_path / "frozen.jsonl"), "--version", "2", "--out", str(tmp_path / "cand")]
    assert verity_cli.main(argv) == 0
    printed = capsys.readouterr().out
    candidate = tmp_path / "cand" / "photo-m" / "2"
    assert (candidate / "model.onnx").is_file() and "verity promote photo-m 2 --why" in printed
    comparison = json.loads((candidate / "compare.json").read_text())
    assert comparison["champion"]["model"] == "photo-m/1" and comparison["challenger"]["model"] == "photo-m/2"
    card = json.loads((candidate / "card.json").read_text())
    started = card["lineage"]["init_from"]
    assert (started["name"], started["version"]) == ("photo-m", "1")
    trained_on = list(read_manifest(candidate / "data.jsonl"))
    assert len(trained_on) == 32 + 16  # the old rows and the new cases, together
    assert not (tmp_path / "models" / "photo-m" / "2").exists()  # nothing lands where the server reads
