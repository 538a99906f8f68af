"""Training defaults chosen from the data (training/recipe.py): each rule on the data it is meant for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from verity.datasets.manifest import ManifestRow
from verity.training.config import TrainConfig
from verity.training.recipe import CPU_IMAGE_BUDGET, MAX_EPOCHS, DataProfile, apply_recipe, choose


def _rows(root: Path, size: tuple[int, int], count: int = 6, colour: bool = False) -> list[ManifestRow]:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        width, height = size
        grey = rng.integers(0, 255, (height, width), dtype=np.uint8)
        if colour:
            pixels = np.stack([grey, grey // 2, 255 - grey], axis=2)  # pseudo-colour: channels differ
        else:
            pixels = np.repeat(grey[..., None], 3, axis=2)  # RGB-encoded grey
        path = root / f"{index}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        label = ("genuine", "counterfeit")[index % 2]
        rows.append(ManifestRow(str(path), label, "xray", split="train"))
    return rows


def _profile(n: int, long: float = 300, short: float = 300, colour: float = 0.0) -> DataProfile:
    return DataProfile(n, long, short, long / short, colour)


def test_profile_reads_sizes_aspect_and_colour(tmp_path) -> None:
    grey = apply_recipe(TrainConfig(modality="xray"), _rows(tmp_path, (120, 40)), spec_fixed=False)
    config, profile, reasons = grey
    assert (profile.median_long_side, profile.median_short_side, profile.median_aspect) == (120, 40, 3.0)
    assert profile.colour_share == 0.0  # RGB-encoded grey is grey
    assert config.resize_mode == "letterbox" and config.in_chans == 1 and config.image_size == 224
    assert config.augment_preset == "patch"  # 40 px patches are under the 224 px input
    assert any(reason.startswith("resize letterbox") for reason in reasons)
    (tmp_path / "c").mkdir()
    colour_rows = _rows(tmp_path / "c", (64, 64), colour=True)
    colour, profile, _ = apply_recipe(TrainConfig(modality="xray"), colour_rows, spec_fixed=False)
    assert profile.colour_share == 1.0 and colour.in_chans == 3 and colour.resize_mode == "stretch"


@pytest.mark.parametrize(
    ("train_images", "expected"),
    [(128, MAX_EPOCHS), (900, 15), (1400, 10), (20_000, 2)],
)
def test_epochs_follow_the_set_size_within_the_cpu_budget(train_images: int, expected: int) -> None:
    chosen, reasons = choose(TrainConfig(), _profile(train_images), spec_fixed=False)
    assert chosen["epochs"] == expected
    assert chosen["epochs"] * train_images <= max(CPU_IMAGE_BUDGET, 2 * train_images)
    assert chosen["warmup_epochs"] == pytest.approx(0.05 * expected, abs=1e-3)
    assert reasons[0].startswith(f"epochs {expected} ")
    # A set of tens of thousands also drops to the smaller input to fit the budget.
    assert chosen["image_size"] == (160 if train_images == 20_000 else 224)


def test_flags_given_win_and_a_fine_tuned_spec_is_kept() -> None:
    given = TrainConfig(modality="xray", epochs=3, warmup_epochs=0.0, image_size=96, resize_mode="stretch",
                        in_chans=2, augment_preset="full")  # fmt: skip
    chosen, reasons = choose(given, _profile(500, 4000, 1500, colour=1.0), spec_fixed=False)
    assert chosen == {} and reasons == []
    chosen, _ = choose(TrainConfig(modality="xray"), _profile(500, 4000, 1500), spec_fixed=True)
    assert set(chosen) == {"epochs", "warmup_epochs", "augment_preset"}  # size and channels are the model's


def test_photos_keep_their_channels_and_small_ones_take_the_patch_variant() -> None:
    small = _profile(500, 64, 64, colour=1.0)
    chosen, reasons = choose(TrainConfig(modality="photo"), small, spec_fixed=False)
    assert chosen["augment_preset"] == "patch" and "in_chans" not in chosen
    assert "augmentation patch (photo patches under 224 px: no noise, JPEG blocks, glare or blur)" in reasons
    chosen, reasons = choose(TrainConfig(modality="photo"), _profile(500, 400, 300), spec_fixed=False)
    assert chosen["augment_preset"] == "full" and "augmentation full" in reasons


def test_dual_energy_pairs_train_two_channels_and_a_mixed_set_one(tmp_path) -> None:
    """Synthetic dual-energy scans (two-page 16-bit TIFFs) choose 2 channels; the same parcels as single
    scans 1; a set mixing both trains on one plane, since a 2-channel model cannot score a single scan."""
    from dataclasses import replace

    from verity.datasets.synth import generate

    def rows(name: str, dual_energy: bool) -> list[ManifestRow]:
        written = generate("xray", 6, tmp_path / name, seed=3, size=64, dual_energy=dual_energy)
        return [replace(row, path=str(tmp_path / name / row.path), split="train") for row in written]

    dual, single = rows("dual", True), rows("single", False)
    config, profile, reasons = apply_recipe(TrainConfig(modality="xray"), dual, spec_fixed=False)
    assert profile.dual_share == 1.0 and config.in_chans == 2
    assert "channels 2 (every sampled scan a dual-energy pair)" in reasons
    config, profile, _ = apply_recipe(TrainConfig(modality="xray"), single, spec_fixed=False)
    assert profile.dual_share == 0.0 and config.in_chans == 1
    mixed = [*dual[:3], *single[3:]]
    config, profile, reasons = apply_recipe(TrainConfig(modality="xray"), mixed, spec_fixed=False)
    assert 0.0 < profile.dual_share < 1.0 and config.in_chans == 1
    assert any("the high-energy plane only" in reason for reason in reasons)


@pytest.mark.parametrize(("target_steps", "expected"), [(250, 9), (450, 15), (10_000, 15)])
def test_a_candidate_step_target_stays_within_the_cpu_budget(target_steps: int, expected: int) -> None:
    """benchmarks/real_data.py --target-steps measures a longer rule: 900 images get 15 epochs at 450
    steps, and no target takes them past the budget of 14,000 images (15 epochs)."""
    from verity.training.recipe import epochs_for

    assert epochs_for(_profile(900), 32, target_steps)[0] == expected
