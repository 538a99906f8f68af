"""`verity eval` end to end on a tiny manifest, through the ONNX engine and through a model.pt."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image
from torch_models import contrast_net

from benchmarks.models import tiny_spec
from verity import cli as verity_cli
from verity.datasets.manifest import ManifestRow, write_manifest
from verity.inference.card import ModelCard
from verity.inference.preprocess import load_for_model
from verity.inference.spec import PreprocessSpec
from verity.training import eval_cli, export_cli
from verity.training.calibrate import card_warnings, choose_thresholds, fit_temperature
from verity.training.export import export_onnx
from verity.training.metrics import roc_auc

pytestmark = pytest.mark.torch


def _image(path: Path, counterfeit: bool, rng: np.random.Generator) -> None:
    # Counterfeits lean red, genuine lean blue; noise makes the classes overlap a little.
    base = np.array([150, 90, 110] if counterfeit else [110, 90, 150], dtype=np.float64)
    shift = rng.normal(0, 12, 3)
    pixels = np.clip(base + shift + rng.normal(0, 10, (40, 48, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("val", 24), ("test", 16)):
        for i in range(count):
            counterfeit = i % 2 == 1
            name = f"images/{split}_{i}.png"
            _image(root / name, counterfeit, rng)
            label = "counterfeit" if counterfeit else "genuine"
            rows.append(
                ManifestRow(path=name, label=label, modality="photo", product="AB"[i % 4 // 2], split=split)
            )
    (root / "images" / "broken.png").write_bytes(b"not an image at all")
    rows.append(
        ManifestRow(path="images/broken.png", label="genuine", modality="photo", product="A", split="test")
    )
    rows.append(ManifestRow(path="images/test_0.png", label="genuine", modality="xray", split="test"))
    write_manifest(root / "manifest.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibrates and thresholds contrast_net on val, saves model.pt, exports model.onnx: as training does."""
    spec = tiny_spec()
    model = contrast_net(spec).eval()
    val = sorted((dataset / "images").glob("val_*.png"))
    batch = np.stack([load_for_model(p, spec) for p in val])
    targets = np.array([int(p.stem.split("_")[1]) % 2 for p in val])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch))[0].numpy()
    temperature = fit_temperature(logits, targets)
    scaled = torch.softmax(torch.from_numpy(logits) / temperature, dim=1)[:, 1].numpy()
    thresholds = choose_thresholds(scaled, targets, 0.1, 0.1)
    card = ModelCard(
        name="contrast",
        version="1",
        modality="photo",
        backbone="contrastnet",
        spec=spec,
        thresholds=thresholds,
        temperature=temperature,
        metrics={"val": {"roc_auc": roc_auc(scaled, targets)}},
        data_fingerprint="fp",
        data_counts={"val": {"genuine": 12, "counterfeit": 12}},
        code_version="test",
        warnings=tuple(card_warnings(thresholds)),
    )
    folder = tmp_path_factory.mktemp("checkpoints") / "contrast" / "1"
    folder.mkdir(parents=True)
    torch.save(
        {
            "model_name": "contrastnet",
            "spec": spec.to_dict(),
            "state_dict": model.state_dict(),
            "config": {},
            "thresholds": thresholds,
            "calibration": {"temperature": temperature},
            "card": card.to_dict(),
        },
        folder / "model.pt",
    )
    export_onnx(model, spec, card, folder / "model.onnx", sample=batch[:3])
    return folder


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model registry that knows contrast_net, standing in for training.models in these tests."""
    module = types.ModuleType("verity.training.models")

    def build_for_spec(name: str, spec: PreprocessSpec, pretrained: bool = False) -> torch.nn.Module:
        assert name == "contrastnet" and not pretrained
        return contrast_net(spec)

    module.build_for_spec = build_for_spec
    monkeypatch.setitem(sys.modules, "verity.training.models", module)


def _read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_cli_onnx_end_to_end(
    dataset: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    code = eval_cli.main(
        [
            "--model",
            str(trained / "model.onnx"),
            "--data",
            str(dataset / "manifest.jsonl"),
            "--out",
            str(out),
            "--batch-size",
            "5",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    # The printed ROC AUC is the one in the JSON and the one a reviewer recomputes from predictions.csv.
    assert f"ROC AUC           {metrics['roc_auc']:.4f}" in printed
    # ... with its 95% bootstrap interval in brackets, and one recall line per false-alarm rate.
    low, high = metrics["roc_auc_ci"]
    assert low <= metrics["roc_auc"] <= high
    assert f"ROC AUC           {metrics['roc_auc']:.4f} [{low:.4f}, {high:.4f}]" in printed
    for rate, entry in metrics["recall_at_false_alarm_rate"].items():
        recall_low, recall_high = entry["recall_ci"]
        line = f"{100 * float(rate):.1f}%: {entry['recall']:.3f} [{recall_low:.3f}, {recall_high:.3f}]"
        assert line in printed
    assert "[lo, hi] are 95% percentile bootstrap intervals (1000 resamples within each label)" in printed
    assert "unreadable: " in printed and "broken.png" in printed
    predictions = _read_predictions(out / "predictions.csv")
    recomputed = roc_auc(
        [float(r["score"]) for r in predictions], [r["label"] == "counterfeit" for r in predictions]
    )
    assert metrics["roc_auc"] == pytest.approx(recomputed, abs=1e-6)
    assert metrics["roc_auc"] > 0.9
    assert metrics["n"] == 16 and len(predictions) == 16
    assert result["data"]["n_failed"] == 1 and "broken.png" in result["data"]["failed"][0]["path"]
    assert result["data"]["skipped_other_modality"] == 1
    assert set(metrics["groups"]["product"]) == {"A", "B"}
    assert set(metrics["groups"]["modality"]) == {"photo"}
    assert metrics["operating_point"] == "model thresholds"
    # What the model's validation predicted for a set of this size, and whether this one lies in it.
    predicted = metrics["predicted_from_validation"]
    low_far, high_far = predicted["false_alarm_rate"]
    inside = "within" if low_far <= metrics["false_alarm_rate"] <= high_far else "OUTSIDE"
    assert f"validation predicted, 95% for this many images: false alarms {100 * low_far:.1f}%-" in printed
    assert f"{100 * high_far:.1f}% ({inside})" in printed
    for key in ("pr_auc", "accuracy", "confusion_matrix", "recall_at_false_alarm_rate", "ece"):
        assert key in metrics
    report = (out / "report.html").read_text()
    for marker in ("<svg", "ROC", "Reliability", "Confusion matrix", "data:image/png;base64,", "per product"):
        assert marker in report
    assert f"(95% CI {low:.4f} to {high:.4f})" in report and "percentile bootstrap" in report
    for svg in re.findall(r"<svg.*?</svg>", report, re.S):
        ElementTree.fromstring(svg)  # well-formed: a browser will draw it
    assert "http://" not in report.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_eval_of_checkpoint_matches_onnx(
    dataset: Path, trained: Path, tmp_path: Path, registry: None
) -> None:
    from verity.training.evaluate import evaluate
    from verity.training.scoring import ModuleScorer

    onnx_result = evaluate(
        trained, dataset / "manifest.jsonl", out_dir=tmp_path / "a", progress=False, report=False
    )
    assert onnx_result["model"]["kind"] == "onnx"  # a folder prefers the ONNX export
    torch_result = evaluate(
        trained / "model.pt", dataset / "manifest.jsonl", out_dir=tmp_path / "b", progress=False, report=False
    )
    assert torch_result["model"]["kind"] == "torch"
    onnx_scores = [float(r["score"]) for r in _read_predictions(tmp_path / "a" / "predictions.csv")]
    torch_scores = [float(r["score"]) for r in _read_predictions(tmp_path / "b" / "predictions.csv")]
    assert np.allclose(onnx_scores, torch_scores, atol=1e-5)
    assert onnx_result["metrics"]["roc_auc"] == pytest.approx(torch_result["metrics"]["roc_auc"])
    assert not (tmp_path / "a" / "report.html").exists()
    # The trainer's in-memory model gives the same figures, and keeps its training mode.
    model = contrast_net(tiny_spec()).train()
    scorer = ModuleScorer(
        model,
        tiny_spec(),
        temperature=torch_result["model"]["temperature"],
        thresholds=torch_result["model"]["thresholds"],
    )
    memory = evaluate(
        scorer, dataset / "manifest.jsonl", out_dir=tmp_path / "c", progress=False, report=False
    )
    assert memory["metrics"]["roc_auc"] == pytest.approx(torch_result["metrics"]["roc_auc"])
    assert memory["metrics"]["confusion_matrix"] == torch_result["metrics"]["confusion_matrix"]
    assert model.training


def test_eval_on_labelled_folder_uses_the_training_split(
    trained: Path, dataset: Path, tmp_path: Path
) -> None:
    from verity.datasets.rows import load_rows
    from verity.training.evaluate import evaluate

    folder = tmp_path / "folder"
    for label, parity in (("genuine", 0), ("counterfeit", 1)):
        for source in sorted((dataset / "images").glob("*_*.png")):
            if int(source.stem.split("_")[1]) % 2 == parity:
                (folder / label).mkdir(parents=True, exist_ok=True)
                (folder / label / source.name).write_bytes(source.read_bytes())
    # The test split is the one `verity train --data DIR` holds out (same grouped split, same seed).
    rows, _ = load_rows(folder, "photo", 0.15, 0.15, 0)
    held_out = sorted(row.path for row in rows if row.split == "test")
    result = evaluate(trained / "model.onnx", folder, out_dir=tmp_path / "out", progress=False, worst=3)
    evaluated = sorted(r["path"] for r in _read_predictions(tmp_path / "out" / "predictions.csv"))
    assert evaluated == held_out and len(held_out) > 0
    assert "grouped split `verity train` gives them" in result["data"]["notes"][0]
    # A run's config.yaml beside the model decides the split: another seed, another held-out set.
    (trained / "config.yaml").write_text("seed: 3\nval_fraction: 0.25\ntest_fraction: 0.25\n")
    try:
        result = evaluate(
            trained / "model.onnx", folder, out_dir=tmp_path / "seeded", progress=False, report=False
        )
    finally:
        (trained / "config.yaml").unlink()
    rows, _ = load_rows(folder, "photo", 0.25, 0.25, 3)
    evaluated = sorted(r["path"] for r in _read_predictions(tmp_path / "seeded" / "predictions.csv"))
    assert evaluated == sorted(row.path for row in rows if row.split == "test")
    assert "seed 3" in result["data"]["notes"][0]
    everything = evaluate(
        trained / "model.onnx", folder, split="all", out_dir=tmp_path / "all", progress=False
    )
    assert everything["metrics"]["n"] == 40

    # DIR/<split>/<label>/... uses the split's folder; a product folder below the label names the product.
    split_folder = tmp_path / "split_folder"
    (split_folder / "test" / "genuine" / "shoes").mkdir(parents=True)
    for source in sorted((dataset / "images").glob("test_*.png"))[::2]:
        (split_folder / "test" / "genuine" / "shoes" / source.name).write_bytes(source.read_bytes())
    result = evaluate(
        trained / "model.onnx", split_folder, out_dir=tmp_path / "out2", progress=False, report=False
    )
    assert result["metrics"]["n"] == 8 and result["metrics"]["n_counterfeit"] == 0
    assert result["metrics"]["roc_auc"] is None and set(result["metrics"]["groups"]["product"]) == {"shoes"}
    with pytest.raises(ValueError, match="split folders test but no 'val'"):
        evaluate(trained / "model.onnx", split_folder, split="val", out_dir=tmp_path / "out3", progress=False)


def test_export_cli_reexports_checkpoint(
    trained: Path, dataset: Path, tmp_path: Path, registry: None, capsys: pytest.CaptureFixture
) -> None:
    from verity.inference.engine import OnnxEngine

    out = tmp_path / "re" / "model.onnx"
    code = export_cli.main(
        [
            "--checkpoint",
            str(trained / "model.pt"),
            "--out",
            str(out),
            "--sample",
            str(dataset / "images" / "test_1.png"),
        ]
    )
    assert code == 0
    assert "parity max |delta logit|" in capsys.readouterr().out
    engine = OnnxEngine(out, warmup=False)
    assert (
        engine.name == "contrast"
        and engine.thresholds.alarm == OnnxEngine(trained / "model.onnx").thresholds.alarm
    )
    assert json.loads((out.parent / "card.json").read_text())["name"] == "contrast"


def test_cli_errors_are_one_line(
    tmp_path: Path, trained: Path, dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    assert verity_cli.main(["eval", "--model", str(tmp_path / "none.onnx"), "--data", str(dataset)]) == 1
    assert "No model at" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verity_cli.main(["eval", "--model", str(trained / "model.onnx"), "--data", str(empty)]) == 1
    assert "no images in genuine/ or counterfeit/" in capsys.readouterr().err
    assert verity_cli.main(["export", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "No checkpoint at" in capsys.readouterr().err


def test_resolve_model_prefers_onnx_and_the_newest_version(tmp_path: Path) -> None:
    from verity.inference.artifacts import resolve_model

    for version in ("1.9", "1.10", "1.2"):
        (tmp_path / "name" / version).mkdir(parents=True)
        (tmp_path / "name" / version / "model.pt").write_bytes(b"x")
    (tmp_path / "name" / "1.10" / "model.onnx").write_bytes(b"x")
    assert resolve_model(tmp_path / "name") == tmp_path / "name" / "1.10" / "model.onnx"
    assert resolve_model(tmp_path / "name" / "1.9") == tmp_path / "name" / "1.9" / "model.pt"
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither an ONNX model"):
        resolve_model(tmp_path / "weights.bin")
    # The --out folder of `verity train` holding one model: that model's newest version.
    assert resolve_model(tmp_path) == tmp_path / "name" / "1.10" / "model.onnx"
    (tmp_path / "other" / "v10").mkdir(parents=True)
    (tmp_path / "other" / "v10" / "model.pt").write_bytes(b"x")
    (tmp_path / "other" / "v9").mkdir()
    (tmp_path / "other" / "v9" / "model.onnx").write_bytes(b"x")
    assert resolve_model(tmp_path / "other") == tmp_path / "other" / "v10" / "model.pt"  # 10 > 9
    with pytest.raises(ValueError, match=r"holds 2 models \(name, other\); choose one"):
        resolve_model(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.onnx"):
        resolve_model(tmp_path / "empty")


def test_eval_finds_the_model_in_the_folder_train_wrote(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`verity train --out DIR` writes DIR/<name>/<version>/; `verity eval --model DIR` finds it."""
    out_dir = trained.parent.parent
    code = eval_cli.main(
        [
            "--model",
            str(out_dir),
            "--data",
            str(dataset),
            "--out",
            str(tmp_path),
            "--no-report",
            "--no-progress",
        ]
    )
    assert code == 0 and "verity eval: contrast 1 (onnx)" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["model"]["path"] == str(trained / "model.onnx")


def test_train_eval_and_ingest_read_a_real_fake_folder_alike(dataset: Path, tmp_path: Path) -> None:
    """Label folder names are one definition (datasets.rows.LABEL_SYNONYMS) for all three readers."""
    from verity.datasets.ingest import IngestOptions, ingest
    from verity.datasets.manifest import read_manifest, resolve_image_path
    from verity.datasets.rows import label_for_folder, load_rows
    from verity.training.eval_samples import load_samples

    assert [label_for_folder(n) for n in ("Real", "fake", "AUTHENTIC", "genuine", "other")] == [
        "genuine",
        "counterfeit",
        "genuine",
        "genuine",
        None,
    ]
    folder = tmp_path / "seizure"
    for source in sorted((dataset / "images").glob("*_*.png")):
        label = "fake" if int(source.stem.split("_")[1]) % 2 else "real"
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / source.name).write_bytes(source.read_bytes())
    trained_rows, _ = load_rows(folder, "photo")
    evaluated = load_samples(folder, None, "photo").samples
    manifest = tmp_path / "ingested" / "manifest.jsonl"
    ingest(folder, manifest, IngestOptions(modality="photo", progress=False, workers=1))
    ingested = list(read_manifest(manifest))
    target_names = ("genuine", "counterfeit")
    as_train = sorted((str(Path(row.path).resolve()), row.label) for row in trained_rows)
    as_eval = sorted((str(s.path.resolve()), target_names[s.target]) for s in evaluated)
    as_ingest = sorted((str(resolve_image_path(manifest, row).resolve()), row.label) for row in ingested)
    assert as_train == as_eval == as_ingest
    assert len(as_train) == 40 and {label for _, label in as_train} == set(target_names)
    # DIR/<split>/<label synonym>/... is read as split folders too.
    (tmp_path / "split" / "test" / "Fake").mkdir(parents=True)
    for source in sorted((folder / "fake").iterdir())[:3]:
        (tmp_path / "split" / "test" / "Fake" / source.name).write_bytes(source.read_bytes())
    samples = load_samples(tmp_path / "split", "test", "photo").samples
    assert [s.target for s in samples] == [1, 1, 1]


def test_evaluations_are_kept_per_model_version_and_data(tmp_path: Path, monkeypatch) -> None:
    """The default output folder names the model, its version and the data, and a second evaluation
    never overwrites the first."""
    from types import SimpleNamespace

    from verity.training.evaluate import default_eval_dir

    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "seizures-nov" / "manifest.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("")
    scorer = SimpleNamespace(name="photo-m", version="2")
    first, second = default_eval_dir(scorer, manifest, "test"), default_eval_dir(scorer, manifest, "test")  # type: ignore[arg-type]
    assert first.parts[:4] == ("runs", "eval", "photo-m", "2") and first.name.startswith("seizures-nov-test-")
    assert first != second
