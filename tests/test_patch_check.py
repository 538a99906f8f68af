"""The product reference check on local features (inference/references/patch_check.py), and the store
using it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_onnx, tiny_spec
from verity.inference.engine import OnnxEngine
from verity.inference.references.check import image_features
from verity.inference.references.patch_check import (
    calibrate_patches,
    nearest_distances,
    signature_from,
    unit_patches,
)
from verity.inference.references.store import ReferenceStore

WIDTH, PARTS, BACKGROUND = 16, 12, 18  # the product fills 40% of the image, as in a product photo


def part_vectors(seed: int = 0) -> np.ndarray:
    """The product's parts (logo, text, hologram...): fixed unit vectors every genuine image shows."""
    return unit_patches(np.random.default_rng(seed).standard_normal((PARTS, WIDTH)))


def genuine(rng: np.random.Generator, parts: np.ndarray, missing: int | None = None) -> np.ndarray:
    """One image's patches: the parts with a little noise (one left out when `missing`), in any order,
    among background patches that change from image to image."""
    shown = [p for i, p in enumerate(parts) if i != missing]
    noisy = np.stack(shown) + rng.normal(0, 0.05, (len(shown), WIDTH))
    background = rng.standard_normal((BACKGROUND, WIDTH))
    if missing is not None:  # the missing part's place holds more background
        background = np.concatenate([background, rng.standard_normal((1, WIDTH))])
    rows = np.concatenate([noisy, background])
    return unit_patches(rows[rng.permutation(len(rows))])


def test_the_signature_keeps_the_parts_every_reference_shows_and_drops_backgrounds() -> None:
    rng, parts = np.random.default_rng(1), part_vectors()
    references = [genuine(rng, parts) for _ in range(12)]
    from verity.inference.references.patch_check import pairwise_nearest

    signature = signature_from(references, pairwise_nearest(references), list(range(12)))
    closest_part = nearest_distances(signature.patches, parts)
    assert np.mean(closest_part < 0.05) > 0.9  # nearly every signature patch is a product part
    assert len(signature.patches) <= 0.3 * 12 * (PARTS + BACKGROUND) + 1


def test_a_missing_part_alarms_and_genuine_images_mostly_do_not() -> None:
    rng, parts = np.random.default_rng(2), part_vectors()
    calibration = calibrate_patches([genuine(rng, parts) for _ in range(20)], false_alarm_rate=0.01)
    genuine_scores = np.array([calibration.signature.score(genuine(rng, parts)) for _ in range(200)])
    missing_scores = np.array([calibration.signature.score(genuine(rng, parts, missing=i % PARTS))
                               for i in range(60)])
    assert np.mean(genuine_scores > calibration.threshold) <= 0.05
    assert np.mean(missing_scores > calibration.threshold) >= 0.95
    assert len(calibration.loo_scores) == 20 and calibration.spread > 0


def test_leave_one_out_never_sees_the_reference_it_scores() -> None:
    """With one reference unlike the rest, its leave-one-out score is large: the signature it is
    scored against was learnt without it (a leak would match it to itself, distance 0)."""
    rng, parts = np.random.default_rng(3), part_vectors()
    references = [genuine(rng, parts) for _ in range(10)] + [genuine(rng, parts, missing=0)]
    calibration = calibrate_patches(references, false_alarm_rate=0.01)
    assert calibration.loo_scores[-1] > np.max(calibration.loo_scores[:-1])


def test_calibration_needs_three_references_of_one_width() -> None:
    rng, parts = np.random.default_rng(4), part_vectors()
    with pytest.raises(ValueError, match="at least 3"):
        calibrate_patches([genuine(rng, parts)] * 2, 0.01)
    with pytest.raises(ValueError, match="widths"):
        calibrate_patches([genuine(rng, parts)] * 3 + [np.ones((4, 3), np.float32)], 0.01)


def _png(seed: int, corner: bool = True) -> bytes:
    """A textured 32 px image with a bright square in one corner (the 'part'), or without it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
    if corner:
        pixels[2:10, 2:10] = 250
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_store_checks_by_patch_signature_when_the_model_has_local_features(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m" / "model.onnx", tiny_spec(), features=8, embedding=True, patches=True)
    engine = OnnxEngine(path, warmup=False)
    embedding, patches = image_features(engine, _png(0))
    assert patches is not None and patches.shape == (64, 8)
    store = ReferenceStore(tmp_path / "refs")

    def embed(data: bytes) -> np.ndarray:
        return image_features(engine, data)[0]

    for seed in range(12):
        store.add(engine.name, "boxed", _png(seed), source=f"{seed}.png", actor="t", role="admin",
                  embed=embed)
    described = store.calibration(engine, "boxed")
    assert described["check"] == "patch signature" and described["signature_patches"] > 0
    kept = store.check(engine, "boxed", *image_features(engine, _png(100)))
    lost = store.check(engine, "boxed", *image_features(engine, _png(101, corner=False)))
    assert kept.threshold == described["threshold"]
    assert lost.distance > kept.distance
    assert lost.status == "mismatch"
    # A caller without local features (an older client path) still gets the embedding check.
    assert store.check(engine, "boxed", embedding).threshold != described["threshold"]
    # The features survive in the embeddings cache: a new store on the same folder embeds nothing.
    fresh = ReferenceStore(tmp_path / "refs")
    cached = fresh.check(engine, "boxed", *image_features(engine, _png(101, corner=False)))
    assert cached.distance == pytest.approx(lost.distance, abs=1e-3)
