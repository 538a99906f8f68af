"""Training defaults chosen from the data: what `verity train` picks when a knob is not given.

`verity train` with no options must fit sets from a few hundred to tens of thousands of images, 32 px
patches to 4,000 px scans. Each rule below reads a `DataProfile` (sizes, aspect ratios and colour of
a sample of the training images) and says what it chose and why; the choices go into config.yaml and
the model card, and a flag given by the user always wins. The measurements behind the rules are in
README.md ("Training defaults") and benchmarks/real_data.py.

- image size: 224, the backbone's pretraining size. Small patches are upsampled to it: the pretrained
  filters see evidence at the scale they were trained on. Only a set too large for the CPU budget drops
  to 160.
- resize mode: squash (stretch) unless the images are long scans (median aspect above 2.5), where
  squashing would flatten objects beyond recognition and letterboxing keeps their shape.
- channels (X-ray): 3 when the sample holds pseudo-colour (its hue is the material), else 1 grey plane.
- epochs: enough optimizer steps to fine-tune (about 450) on a small set, at least 6 passes, at most 30,
  and no more images in all than the CPU budget allows; warm-up is 5% of the steps. About 250 steps
  left 900 tiles at 32 px still learning when the schedule ended (validation ROC AUC rising every epoch)
  and spread the seeds 0.060; 450 beat it on every row it changes (README, "Training defaults").
- augmentation: the modality's preset; images smaller than the model input get its patch variant (X-ray:
  the geometric and exposure transforms only; photo: viewpoint and light only), since upsampling makes
  per-pixel noise, JPEG blocks, clutter and glare the size of the evidence (see training/augment.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from verity.datasets.manifest import ManifestRow
from verity.inference.decode import decode_image
from verity.inference.preprocess import is_grey_content
from verity.training.config import TrainConfig

MODEL_SIZE = 224
BUDGET_SIZE = 160
TARGET_STEPS = 450
MIN_EPOCHS, MAX_EPOCHS = 6, 30
# Images (forward and backward passes) that fit about 12 minutes of 2 CPU cores at 224 px.
CPU_IMAGE_BUDGET = 14_000
LONG_SCAN_ASPECT = 2.5
WARMUP_SHARE = 0.05
PROFILE_SAMPLE = 400
COLOUR_SAMPLE = 48


@dataclass(frozen=True)
class DataProfile:
    """What the rules look at: a sample of the training split."""

    train_images: int
    median_long_side: float
    median_short_side: float
    median_aspect: float  # long side / short side
    colour_share: float  # share of sampled images whose channels differ (not grey content)
    dual_share: float = 0.0  # share of sampled scans that are dual-energy pairs (high and low planes)


def _size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # DICOM and other containers PIL does not open: decode them
        height, width = decode_image(Path(path).read_bytes()).shape[:2]
        return width, height


def _pixel_kind(path: str) -> str:
    """dual (a high and a low energy plane), colour (three channels that differ) or grey."""
    image = decode_image(Path(path).read_bytes(), draft_size=64)
    planes = image.shape[2] if image.ndim == 3 else 1
    if planes == 2:
        return "dual"
    return "colour" if planes == 3 and not is_grey_content(image) else "grey"


def profile_rows(rows: list[ManifestRow], seed: int = 0) -> DataProfile:
    """Reads image headers (and a few images' pixels, for colour) of a fixed sample of `rows`."""
    train = [row for row in rows if row.split == "train"] or rows
    sample = random.Random(seed).sample(train, min(len(train), PROFILE_SAMPLE))
    sizes = np.array([_size(row.path) for row in sample], dtype=np.float64)
    long_side, short_side = sizes.max(axis=1), sizes.min(axis=1)
    kinds = np.array([_pixel_kind(row.path) for row in sample[:COLOUR_SAMPLE]])
    return DataProfile(
        train_images=len(train),
        median_long_side=float(np.median(long_side)),
        median_short_side=float(np.median(short_side)),
        median_aspect=float(np.median(long_side / np.maximum(short_side, 1))),
        colour_share=float(np.mean(kinds == "colour")) if len(kinds) else 0.0,
        dual_share=float(np.mean(kinds == "dual")) if len(kinds) else 0.0,
    )


def epochs_for(profile: DataProfile, batch_size: int, target_steps: int = TARGET_STEPS) -> tuple[int, str]:
    """The epochs rule: about `target_steps` optimizer steps, within MIN_EPOCHS..MAX_EPOCHS and the CPU
    budget; with the reason. `target_steps` other than the default: a candidate rule being measured
    (benchmarks/real_data.py --target-steps)."""
    steps_per_epoch = max(1, math.ceil(profile.train_images / batch_size))
    wanted = max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(target_steps / steps_per_epoch)))
    affordable = max(1, CPU_IMAGE_BUDGET // max(1, profile.train_images))
    epochs = min(wanted, max(2, affordable))
    why = f"{profile.train_images} training images, {steps_per_epoch} steps an epoch"
    if epochs < wanted:
        why += f"; {wanted} would exceed the CPU budget of {CPU_IMAGE_BUDGET:,} images"
    return epochs, why


def choose(config: TrainConfig, profile: DataProfile, spec_fixed: bool) -> tuple[dict[str, Any], list[str]]:
    """The values for the knobs left unset (None) in `config`, and one line of reason for each.

    `spec_fixed`: the spec comes from a model being fine-tuned or resumed, so size, resize mode and
    channels are that model's and are not chosen again.
    """
    chosen: dict[str, Any] = {}
    reasons: list[str] = []
    if config.epochs is None:
        chosen["epochs"], why = epochs_for(profile, config.batch_size)
        reasons.append(f"epochs {chosen['epochs']} ({why})")
    epochs = chosen.get("epochs", config.epochs)
    if config.warmup_epochs is None:
        chosen["warmup_epochs"] = round(WARMUP_SHARE * epochs, 3)
        reasons.append(f"warm-up {chosen['warmup_epochs']} epochs ({WARMUP_SHARE:.0%} of the steps)")
    if config.augment_preset is None:
        size = chosen.get("image_size", config.image_size) or MODEL_SIZE
        patches = small_patches(profile, size)
        chosen["augment_preset"] = "patch" if patches else "full"
        xray = config.modality == "xray"
        dropped = "noise or clutter" if xray else "noise, JPEG blocks, glare or blur"
        reasons.append(
            f"augmentation {chosen['augment_preset']}"
            + (f" ({'X-ray' if xray else 'photo'} patches under {size} px: no {dropped})" if patches else "")
        )
    if spec_fixed:
        return chosen, reasons
    if config.image_size is None:
        too_many = profile.train_images * MIN_EPOCHS > CPU_IMAGE_BUDGET * 2
        chosen["image_size"] = BUDGET_SIZE if too_many else MODEL_SIZE
        reasons.append(
            f"image size {chosen['image_size']} (median image {profile.median_long_side:.0f} x "
            f"{profile.median_short_side:.0f} px" + ("; a large set on the CPU budget)" if too_many else ")")
        )
    if config.resize_mode is None:
        long_scans = profile.median_aspect > LONG_SCAN_ASPECT
        chosen["resize_mode"] = "letterbox" if long_scans else "stretch"
        reasons.append(
            f"resize {chosen['resize_mode']} (median aspect {profile.median_aspect:.2f}; letterbox above "
            f"{LONG_SCAN_ASPECT})"
        )
    if config.in_chans is None and config.modality == "xray":
        chosen["in_chans"], why = _channels(profile)
        reasons.append(f"channels {chosen['in_chans']} ({why})")
    return chosen, reasons


def _channels(profile: DataProfile) -> tuple[int, str]:
    """2 when every sampled scan is a dual-energy pair (the low/high ratio tells materials apart); else
    3 when any is in pseudo-colour (its colours are the scanner's material classes), else 1. A set that
    mixes pairs with single scans trains on one plane: a 2-channel model could not score a single scan."""
    if profile.dual_share == 1.0:
        return 2, "every sampled scan a dual-energy pair"
    colour = f"{profile.colour_share:.0%} of sampled scans in pseudo-colour"
    if profile.dual_share > 0.0:
        colour += f"; {profile.dual_share:.0%} dual-energy, the rest single: the high-energy plane only"
    return (3 if profile.colour_share > 0.0 else 1), colour


def small_patches(profile: DataProfile, image_size: int) -> bool:
    """Patches smaller than the model input: upsampled, so per-pixel noise, clutter, JPEG blocks and glare
    become blobs the size of the evidence (training/augment.py's patch variants drop them)."""
    return profile.median_short_side < image_size


def apply_recipe(
    config: TrainConfig, rows: list[ManifestRow], spec_fixed: bool
) -> tuple[TrainConfig, DataProfile, list[str]]:
    """Fills the unset knobs of `config` from the data; returns it with the profile and the reasons."""
    profile = profile_rows(rows, config.seed)
    chosen, reasons = choose(config, profile, spec_fixed)
    return replace(config, **chosen), profile, reasons
