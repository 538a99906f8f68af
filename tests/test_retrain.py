"""`verity retrain` end to end on a small set: the model's rows and new cases ingested together, a
fine-tune from the model, and the comparison on a frozen benchmark beside the candidate; never a promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_trainer import make_folder
from verity import cli as verity_cli
from verity.datasets.manifest import read_manifest, write_manifest

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
    argv = [
        "retrain",
        "--from",
        str(Path(base["model_onnx"]).parent),
        "--add",
        str(new_cases),
        "--benchmark",
        str(tmp_path / "frozen.jsonl"),
        "--version",
        "2",
        "--out",
        str(tmp_path / "cand"),
    ]
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


def test_promote_refuses_a_deliberately_worse_challenger_and_shows_the_interval(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A challenger trained on the champion's rows with most labels swapped (consistently in training and
    validation, so the weak-run guard sees a model that learnt its labels) is worse on a frozen benchmark
    beyond noise: `verity promote` refuses it, with the interval, from --comparison or from the
    compare.json beside it, and `--force` overrides."""
    import dataclasses
    import random

    from verity.training.trainer import train_from_options

    models, audit = tmp_path / "models", tmp_path / "audit.sqlite"
    monkeypatch.setenv("VERITY_MODELS_DIR", str(models))
    monkeypatch.setenv("VERITY_AUDIT_DB", str(audit))
    options = dict(image_size=32, batch_size=8, workers=0, progress=False, report=False, epochs=4,
                   val_fraction=0.3, warmup_epochs=0.0, model="resnet18", pretrained=False)  # fmt: skip
    data = str(make_folder(tmp_path / "old", per_class=40, seed=0))
    champion = Path(
        train_from_options(data=data, out=str(models), name="photo-m", version="1", **options)["model_onnx"]
    )
    rows = list(read_manifest(champion.parent / "data.jsonl"))
    swap, rng = {"genuine": "counterfeit", "counterfeit": "genuine"}, random.Random(0)
    swapped = [
        dataclasses.replace(row, label=swap[row.label]) if rng.random() < 0.85 else row for row in rows
    ]
    write_manifest(tmp_path / "swapped.jsonl", swapped)
    train_from_options(data=str(tmp_path / "swapped.jsonl"), out=str(models), name="photo-m", version="2",
                       **options)  # fmt: skip
    frozen = make_folder(tmp_path / "frozen", per_class=16, seed=2)
    ingest = ["data", "ingest", str(frozen), "--out", str(tmp_path / "frozen.jsonl"), "--modality", "photo",
              "--no-progress", "--test", "0.9", "--val", "0.05"]  # fmt: skip
    assert verity_cli.main(ingest) == 0
    versions = models / "photo-m"
    compare = ["compare", "--champion", str(versions / "1"), "--challenger", str(versions / "2"),
               "--data", str(tmp_path / "frozen.jsonl"), "--out", str(tmp_path / "compared")]  # fmt: skip
    assert verity_cli.main(compare) == 0
    result = json.loads((tmp_path / "compared" / "compare.json").read_text())
    assert result["worse_beyond_noise"] and result["roc_auc_difference_interval"][1] < 0
    capsys.readouterr()
    given = [
        "promote",
        "photo-m",
        "2",
        "--why",
        "try",
        "--comparison",
        str(tmp_path / "compared" / "compare.json"),
    ]
    assert verity_cli.main(given) == 1
    refused = capsys.readouterr().err
    low, high = result["roc_auc_difference_interval"]
    assert (
        "worse than the champion beyond noise" in refused
        and f"95% interval [{low:+.4f}, {high:+.4f}]" in refused
    )
    # Left beside the version, as `verity retrain` leaves it: the same refusal without --comparison.
    (models / "photo-m" / "2" / "compare.json").write_text(json.dumps(result))
    assert verity_cli.main(["promote", "photo-m", "2", "--why", "try again"]) == 1
    assert "worse than the champion beyond noise" in capsys.readouterr().err
    assert verity_cli.main(["promote", "photo-m", "2", "--why", "drill: known worse", "--force"]) == 0
    assert "production -> 2" in capsys.readouterr().out
