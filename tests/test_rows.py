"""datasets.rows: one folder reader for ingest, training and evaluation, and evaluation without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.datasets.ingest import IngestOptions, ingest
from verity.datasets.manifest import read_manifest, resolve_image_path
from verity.datasets.rows import LABEL_SYNONYMS, label_for_folder, load_rows
from verity.inference.vocabulary import LABELS
from verity.training.eval_samples import load_samples

REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, count: int, seed: int) -> None:
    """Distinct noise PNGs (ingest drops exact duplicates), each of its own product-less group."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = rng.integers(0, 256, (24 + index, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{folder.name.lower()}_{index}.png")


def _synonym_folder(root: Path) -> Path:
    """One label folder per synonym, in mixed case (Real/, FAKE/, authentic/, ...): 3 images each."""
    for number, name in enumerate(LABEL_SYNONYMS):
        shown = name.upper() if number % 2 else name.capitalize()
        _write_images(root / shown, 3, seed=number)
    return root


def test_label_for_folder_knows_each_synonym_in_any_case() -> None:
    assert {label_for_folder(f"  {name.upper()} ") for name in LABEL_SYNONYMS} == set(LABELS)
    assert [label_for_folder(name) for name in ("Real", "fake", "AUTHENTIC", "other", "")] == [
        "genuine",
        "counterfeit",
        "genuine",
        None,
        None,
    ]


def test_ingest_train_and_eval_accept_every_label_folder_name_alike(tmp_path: Path) -> None:
    folder = _synonym_folder(tmp_path / "seizure")
    expected = sorted(
        (str(path.resolve()), label_for_folder(path.parent.name)) for path in folder.glob("*/*.png")
    )
    assert len(expected) == 3 * len(LABEL_SYNONYMS)

    trained, _ = load_rows(folder, "photo")
    evaluated = load_samples(folder, None, "photo").samples
    manifest = tmp_path / "ingested" / "manifest.jsonl"
    result = ingest(folder, manifest, IngestOptions(modality="photo", progress=False, workers=1))

    assert result.rejected == {} and result.accepted == len(expected)
    as_train = sorted((str(Path(row.path).resolve()), row.label) for row in trained)
    as_eval = sorted((str(sample.path.resolve()), LABELS[sample.target]) for sample in evaluated)
    as_ingest = sorted(
        (str(resolve_image_path(manifest, row).resolve()), row.label) for row in read_manifest(manifest)
    )
    assert as_train == as_eval == as_ingest == expected


def test_eval_split_folders_take_every_label_folder_name(tmp_path: Path) -> None:
    """DIR/<split>/<label synonym>/ for evaluation: the split comes from the folder, the label from any
    accepted name."""
    for number, name in enumerate(LABEL_SYNONYMS):
        _write_images(tmp_path / "test" / name.upper(), 2, seed=number)
    _write_images(tmp_path / "val" / "real", 2, seed=99)
    samples = load_samples(tmp_path, "test", "photo").samples
    labels = sorted(LABELS[sample.target] for sample in samples)
    assert labels == sorted(label_for_folder(name) for name in LABEL_SYNONYMS for _ in range(2))
    assert len(load_samples(tmp_path, None, "photo").samples) == len(samples) + 2


def test_eval_holds_out_what_training_held_out_by_default(tmp_path: Path) -> None:
    """Without a run config both sides use the vocabulary's split defaults, so eval's test split is
    exactly the rows training kept out (no test image was trained on)."""
    folder = tmp_path / "data"
    _write_images(folder / "genuine", 20, seed=1)
    _write_images(folder / "fake", 20, seed=2)
    rows, _ = load_rows(folder, "photo")
    held_out = sorted(row.path for row in rows if row.split == "test")
    evaluated = sorted(str(sample.path) for sample in load_samples(folder, "test", "photo").samples)
    assert evaluated == held_out and 0 < len(held_out) < len(rows)


TORCH_FREE_EVAL = """
import sys
from verity.cli import main

code = main(sys.argv[1:])
HEAVY = ("torch", "torchvision", "timm", "albumentations")
heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
print("RESULT", code, heavy)
"""


def test_verity_eval_of_an_onnx_model_never_imports_torch(tmp_path: Path) -> None:
    """A scanner console evaluates an exported model with the base install: no torch on that path."""
    spec = tiny_spec("photo", 32)
    tiny_onnx(tmp_path / "models" / "tiny" / "1" / "model.onnx", spec, tiny_card(spec, "tiny", "1"))
    _write_images(tmp_path / "data" / "real", 6, seed=1)
    _write_images(tmp_path / "data" / "fake", 6, seed=2)
    args = ["eval", "--model", str(tmp_path / "models"), "--data", str(tmp_path / "data")]
    args += ["--split", "all", "--out", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_EVAL, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "RESULT 0 []" in done.stdout, done.stdout + done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"]["kind"] == "onnx" and metrics["data"]["n_evaluated"] == 12


def test_an_evaluation_sample_names_the_group_its_split_keeps_together(tmp_path: Path) -> None:
    """`Sample.group` is the split's unit (the case, else the product, else the file): what the gate
    leaves out with a training image when it measures it as a validation image would be measured."""
    from verity.datasets.manifest import ManifestRow, write_manifest

    _write_images(tmp_path / "images", 3, seed=5)
    paths = sorted(str(path) for path in (tmp_path / "images").glob("*.png"))
    write_manifest(tmp_path / "manifest.jsonl", [
        ManifestRow(paths[0], "genuine", "photo", product="tea", case_id="c-1", split="train"),
        ManifestRow(paths[1], "genuine", "photo", product="tea", split="train"),
        ManifestRow(paths[2], "genuine", "photo", split="train"),
    ])  # fmt: skip
    samples = load_samples(tmp_path / "manifest.jsonl", "train", "photo").samples
    assert [sample.group for sample in samples] == ["case:c-1", "product:tea", f"file:{paths[2]}"]
