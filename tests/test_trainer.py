"""Training: config, augmentation presets, data loading, loss going down, exact resume, artifacts.

Everything runs on tiny folders (32 px, a few dozen images): genuine images carry a red patch and
counterfeits a blue one, so a few steps are enough to learn the difference.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from verity.datasets.manifest import ManifestRow, write_manifest
from verity.datasets.rows import folder_rows, load_rows
from verity.datasets.torch_dataset import ManifestDataset
from verity.inference.spec import PreprocessSpec, resolve_spec
from verity.training.augment import Augmenter, build_preset
from verity.training.config import ConfigError, build_config, load_yaml
from verity.training.trainer import EpochSampler, lr_factor, train_from_options

torch.set_num_threads(1)
pytestmark = pytest.mark.torch

FAST = dict(
    image_size=32, batch_size=8, workers=0, progress=False, export=False, report=False, log_every=1,
    warmup_epochs=0.0, lr=3e-3, allow_weak=True,
)  # fmt: skip  (these tests check the plumbing of a few steps, not learning: the weak-run guard has its own)


def make_folder(root: Path, per_class: int = 16, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    colours = {"genuine": (220, 40, 40), "counterfeit": (40, 40, 220)}
    for label, colour in colours.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
            top, left = rng.integers(2, size // 2, 2)
            image[top : top + size // 3, left : left + size // 3] = colour
            Image.fromarray(image).save(root / label / f"{label}-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny") / "data")


# ------------------------------------------------------------------------------------------------ config
def test_config_unknown_keys_name_close_matches(tmp_path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(overrides={"batchsize": 4})
    (tmp_path / "run.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="Did you mean"):
        load_yaml(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="epochs must be a int"):
        load_yaml(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="Only auto, off, bf16, fp16"):
        build_config(overrides={"amp": "fp8"})


def test_config_precedence_defaults_yaml_flags(tmp_path) -> None:
    from verity.training.cli import parse_config

    (tmp_path / "run.yaml").write_text("epochs: 3\nlr: 0.01\npretrained: false\n")
    config = parse_config(["--data", "x", "--config", str(tmp_path / "run.yaml"), "--lr", "0.5"])
    assert (config.epochs, config.lr, config.pretrained, config.batch_size) == (3, 0.5, False, 32)
    with pytest.raises(ConfigError, match="--batch-size"):
        parse_config(["--data", "x", "--batch-sise", "4"])


# ------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize(
    ("modality", "shape", "dtype", "in_chans"),
    [
        ("photo", (48, 40, 3), np.uint8, 3),
        ("photo", (48, 40, 1), np.uint8, 3),
        ("xray", (48, 40, 1), np.uint16, 1),
        ("xray", (48, 40, 1), np.uint8, 1),
        ("xray", (48, 40, 2), np.float32, 2),
    ],
)
def test_augmentation_presets_keep_shapes_and_dtypes(modality, shape, dtype, in_chans) -> None:
    spec = resolve_spec(modality, override={"in_chans": in_chans, "image_size": 32})
    augmenter = Augmenter(modality, spec)
    rng = np.random.default_rng(0)
    high = {np.uint8: 255, np.uint16: 65535}.get(dtype, 1)
    image = (rng.random(shape) * high).astype(dtype)
    for seed in range(8):
        augmenter.set_seed(seed)
        out, out_spec = augmenter(image)
        channels = 3 if modality == "photo" else shape[2]
        # 90-degree turns of a scan swap height and width; the letterbox resize absorbs that.
        size_kept = (
            sorted(out.shape[:2]) == sorted(shape[:2]) if modality == "xray" else out.shape[:2] == shape[:2]
        )
        assert size_kept and out.shape[2] == channels
        if modality == "photo" and dtype == np.uint8:
            assert out.dtype == np.uint8
        else:  # X-ray is augmented in float [0, 1]; the window was applied, so the spec's is cleared
            assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
            assert out_spec.window is None
        from verity.inference.preprocess import to_model_input

        assert to_model_input(out, out_spec).shape == (spec.in_chans, 32, 32)


def test_the_photo_patch_variant_adds_nothing_per_pixel() -> None:
    """Upsampled 7 times, noise or a JPEG block on a 32 px photo is a blob the size of a defect: the
    patch variant changes only viewpoint and light, so a flat patch stays flat inside."""
    from verity.training.augment import describe_preset

    def names(variant: str) -> set[str]:
        transforms = describe_preset("photo", variant)["transform"]["transforms"]
        return {entry["__class_fullname__"].split(".")[-1] for entry in transforms}

    per_pixel = {"GaussNoise", "ImageCompression", "GaussianBlur", "Glare"}
    assert per_pixel <= names("full") and not per_pixel & names("patch")
    assert {"Perspective", "Affine", "ColorJitter"} <= names("patch")
    flat = np.full((32, 32, 3), 128, np.uint8)
    inside = {}
    for variant in ("full", "patch"):
        preset = build_preset("photo", variant)
        spreads = []
        for seed in range(40):
            preset.set_random_seed(seed)
            spreads.append(float(preset(image=flat)["image"][10:22, 10:22].astype(np.float32).std()))
        inside[variant] = max(spreads)
    assert inside["patch"] < 0.5 < inside["full"], inside


def test_photo_preset_moves_hue_only_a_little() -> None:
    import colorsys

    image = np.zeros((32, 32, 3), np.uint8)
    image[...] = (200, 40, 40)
    preset = build_preset("photo")
    hues = []
    for seed in range(30):
        preset.set_random_seed(seed)
        out = preset(image=image)["image"].reshape(-1, 3).mean(axis=0) / 255
        hues.append(colorsys.rgb_to_hsv(*out)[0])
    drift = max(min(abs(h), abs(1 - h)) for h in hues)
    assert drift < 0.03, f"hue moved by {drift:.3f} of the colour wheel: colour cues would be erased"


def test_augmentation_is_a_function_of_the_sample_seed(tiny_folder) -> None:
    rows, _ = load_rows(tiny_folder, "photo")
    spec = resolve_spec("photo", override={"image_size": 32})
    augmenter = Augmenter("photo", spec)
    dataset = ManifestDataset(rows, spec, augmenter, augmenter.set_seed)
    first, again, other = dataset[(3, 11)][0], dataset[(3, 11)][0], dataset[(3, 12)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


# ----------------------------------------------------------------------------------------------- data
def test_folder_rows_get_a_grouped_stratified_split(tiny_folder, tmp_path) -> None:
    rows, description = load_rows(tiny_folder, "photo", val=0.25, test=0.25, seed=1)
    assert "grouped split" in description
    counts = {(row.split, row.label) for row in rows}
    assert {(s, label) for s in ("train", "val", "test") for label in ("genuine", "counterfeit")} <= counts
    assert rows == load_rows(tiny_folder, "photo", val=0.25, test=0.25, seed=1)[0], (
        "the split is reproducible"
    )
    # A manifest's own splits are kept; relative paths resolve from the manifest's folder.
    fixed = [
        ManifestRow(str(Path(r.path).relative_to(tiny_folder)), r.label, "photo", split="train")
        for r in folder_rows(tiny_folder, "photo")
    ]
    manifest = _write(tmp_path / "fixed.jsonl", fixed)
    with pytest.raises(ValueError, match="no xray rows"):
        load_rows(manifest, "xray")
    manifest = _write(tiny_folder / "fixed.jsonl", fixed)
    manifest_rows, _ = load_rows(manifest, "photo")
    assert {row.split for row in manifest_rows} == {"train"}
    assert all(Path(row.path).is_file() for row in manifest_rows)


def _write(path: Path, rows: list[ManifestRow]) -> Path:
    write_manifest(path, rows)
    return path


def test_epoch_sampler_shards_and_resumes_mid_epoch() -> None:
    from verity.training.distributed import DistInfo

    whole = EpochSampler(10, seed=3, info=DistInfo())
    whole.set_epoch(2)
    order = list(whole)
    whole.set_epoch(2, skip=4)
    assert list(whole) == order[4:]
    shards = [EpochSampler(10, seed=3, info=DistInfo(rank, 2, 0)) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(2)
    indices = [i for shard in shards for i, _ in shard]
    assert len(indices) == 10 and set(indices) == set(range(10))


def test_lr_warms_up_then_decays() -> None:
    factors = [lr_factor(step, 100, 10, 0.01) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[50] < factors[10] and factors[-1] == pytest.approx(0.01, abs=1e-3)


# ----------------------------------------------------------------------------------------------- training
def _train_loss(model: torch.nn.Module, folder: Path) -> float:
    rows = [row for row in load_rows(folder, "photo")[0] if row.split == "train"]
    dataset = ManifestDataset(rows, resolve_spec("photo", override={"image_size": 32}))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor(dataset.targets)
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(images)[0], targets))


def test_a_few_steps_lower_the_loss(tiny_folder, tmp_path) -> None:
    from verity.training.models import build_for_spec

    torch.manual_seed(0)
    spec = resolve_spec("photo", override={"image_size": 32})
    # resnet18 from scratch: at 32 px a pretrained model's batch-norm statistics need more steps to settle.
    before = _train_loss(build_for_spec("resnet18", spec), tiny_folder)
    options = dict(model="resnet18", pretrained=False, epochs=4, out=str(tmp_path), name="loss", **FAST)
    train_from_options(data=str(tiny_folder), **options)
    checkpoint = torch.load(tmp_path / "loss" / "dev" / "last.pt", weights_only=True)
    model = build_for_spec("resnet18", spec)
    model.load_state_dict(checkpoint["state_dict"])
    after = _train_loss(model, tiny_folder)
    assert after < 0.5 * before, f"training loss went from {before:.4f} to {after:.4f}"


def test_resume_continues_from_the_saved_step_exactly(tiny_folder, tmp_path) -> None:
    options = dict(data=str(tiny_folder), model="resnet18", pretrained=False, epochs=3, **FAST)
    train_from_options(out=str(tmp_path / "whole"), name="r", **options)
    whole = torch.load(tmp_path / "whole" / "r" / "dev" / "last.pt", weights_only=True)
    # Stop in the middle of the second epoch, then resume the run without a step limit.
    train_from_options(out=str(tmp_path / "broken"), name="r", max_steps=3, **options)
    broken_dir = tmp_path / "broken" / "r" / "dev"
    stopped = torch.load(broken_dir / "last.pt", weights_only=True)
    # 22 training images in batches of 8 (last partial batch dropped): 2 steps an epoch.
    assert stopped["step"] == 3 and stopped["run_state"]["epoch_step"] == 1
    result = train_from_options(resume=str(broken_dir), max_steps=None)
    resumed = torch.load(broken_dir / "last.pt", weights_only=True)
    assert resumed["step"] == whole["step"] == 3 * 2
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert Path(result["model_pt"]).is_file()
    # header, 2 rows before the break (epoch 1, half of epoch 2), 2 after (epochs 2 and 3)
    assert len((broken_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 2 + 2
    # A finished run can be extended: one more epoch continues from step 6.
    train_from_options(resume=str(broken_dir), epochs=4)
    assert torch.load(broken_dir / "last.pt", weights_only=True)["step"] == 4 * 2


def test_verity_train_writes_every_artifact_and_prints_where(tiny_folder, tmp_path, capsys) -> None:
    from verity.training.cli import train_main

    argv = ["--data", str(tiny_folder), "--epochs", "1", "--name", "tiny", "--version", "v1",
            "--out", str(tmp_path), "--image-size", "32", "--batch-size", "8", "--workers", "1",
            "--no-progress", "--allow-weak"]  # fmt: skip
    assert train_main(argv) == 0
    run_dir = tmp_path / "tiny" / "v1"
    printed = capsys.readouterr().out
    for name in (
        "model.pt",
        "model.onnx",
        "card.json",
        "report.html",
        "config.yaml",
        "metrics.csv",
        "augment.json",
    ):
        assert (run_dir / name).is_file(), name
    assert str(run_dir / "model.onnx") in printed and str(run_dir / "report.html") in printed
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)  # plain types only
    for key in ("state_dict", "spec", "config", "labels", "metrics", "thresholds", "calibration",
                "data_fingerprint", "code_version", "model_name", "epoch", "step"):  # fmt: skip
        assert key in checkpoint, key
    card = json.loads((run_dir / "card.json").read_text())
    assert card["name"] == "tiny" and card["backbone"] == "efficientnet_lite0"
    assert PreprocessSpec.from_dict(card["spec"]) == resolve_spec("photo", override={"image_size": 32})
    assert set(card["metrics"]) == {"val", "test"} and card["metrics"]["test"]["roc_auc"] is not None
    assert card["thresholds"]["clear"] <= card["thresholds"]["alarm"]
    assert checkpoint["config"]["epochs"] == 1 and not (run_dir / "best.pt").exists()


def test_training_refuses_without_counterfeits_in_validation(tiny_folder, tmp_path) -> None:
    from verity.training.calibrate import ThresholdError

    rows = folder_rows(tiny_folder, "photo")
    split = [
        "train" if i % 2 else ("val" if row.label == "genuine" else "test") for i, row in enumerate(rows)
    ]
    manifest = _write(tmp_path / "m.jsonl", [replace(r, split=s) for r, s in zip(rows, split, strict=True)])
    with pytest.raises(ThresholdError, match="no counterfeit"):
        train_from_options(data=str(manifest), epochs=1, out=str(tmp_path), **FAST)


def test_init_from_fine_tunes_a_previous_model_with_its_spec(tiny_folder, tmp_path) -> None:
    options = {**FAST, "image_size": None, "model": "resnet18", "pretrained": False, "epochs": 1}
    data, out = str(tiny_folder), str(tmp_path)
    base = train_from_options(data=data, out=out, name="base", **{**options, "image_size": 48})
    # A vanishing learning rate: the fine-tuned weights must still be the base model's.
    tuned = train_from_options(
        data=data, out=out, name="tuned", init_from=base["model_pt"], **{**options, "lr": 1e-12}
    )
    base_weights = torch.load(base["model_pt"], weights_only=True)
    checkpoint = torch.load(tuned["model_pt"], weights_only=True)
    assert checkpoint["spec"]["image_size"] == 48, "the fine-tuned model keeps the stored spec"
    assert checkpoint["config"]["init_from"] == base["model_pt"]
    # The card says where the weights started, with the base model's data (lineage, /v1/models).
    base_card = base["card"]
    assert tuned["card"].lineage == {"init_from": {
        "name": "base", "version": base_card.version, "data_fingerprint": base_card.data_fingerprint,
        "file": base["model_pt"],
    }}  # fmt: skip
    assert base_card.lineage is None
    key = "features.0.weight"
    torch.testing.assert_close(
        checkpoint["state_dict"][key], base_weights["state_dict"][key], rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="--model resnet18"):
        train_from_options(data=data, out=out, name="wrong", init_from=base["model_pt"], **FAST)


def test_cli_bad_options_exit_2_with_a_message(capsys) -> None:
    from verity.training.cli import train_main

    assert train_main(["--data", "x", "--epochs", "0"]) == 2
    assert "epochs must be positive" in capsys.readouterr().err
    assert train_main(["--data", "x", "--modle", "resnet18"]) == 2
    assert "did you mean --model" in capsys.readouterr().err
