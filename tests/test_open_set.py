"""The open-set rule and the novelty gate: verdicts for images the model was never trained on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.inference.bank import build_bank, save_bank
from verity.inference.engine import ModelLoadError, OnnxEngine
from verity.inference.open_set import (
    OpenSetError,
    choose_novelty_threshold,
    novelty_record,
    open_set_verdict,
    scan_embedding,
)
from verity.inference.tiling import TilingOptions, load_for_scoring, score_scan
from verity.inference.vocabulary import REASONS


@pytest.mark.parametrize(
    ("classifier", "recognised", "reference", "expected"),
    [
        ("counterfeit", False, "mismatch", ("uncertain", ("not_recognised",))),
        ("genuine", False, None, ("uncertain", ("not_recognised",))),
        ("counterfeit", True, None, ("counterfeit", ("classifier",))),
        ("genuine", True, "mismatch", ("counterfeit", ("reference_mismatch",))),
        ("counterfeit", True, "mismatch", ("counterfeit", ("classifier", "reference_mismatch"))),
        ("uncertain", True, "match", ("uncertain", ("classifier_uncertain",))),
        ("uncertain", None, "abstained", ("uncertain", ("classifier_uncertain",))),
        ("genuine", True, "match", ("genuine", ())),
        ("genuine", None, None, ("genuine", ())),
        ("genuine", True, "abstained", ("genuine", ())),
    ],
)
def test_the_open_set_rule(classifier, recognised, reference, expected) -> None:
    verdict, reasons = open_set_verdict(classifier, recognised, reference)
    assert (verdict, reasons) == expected
    assert set(reasons) <= set(REASONS)


def test_the_threshold_flags_at_most_the_stated_rate() -> None:
    values = np.linspace(0.0, 1.0, 1000)
    for rate in (0.01, 0.02, 0.1):
        threshold = choose_novelty_threshold(values, rate)
        assert np.mean(values > threshold) <= rate
        assert np.mean(values >= threshold) > rate - 0.002  # and no stricter than it must be
    with pytest.raises(OpenSetError):
        choose_novelty_threshold(np.array([]), 0.01)
    with pytest.raises(OpenSetError):
        choose_novelty_threshold(values, 0.0)


def test_a_scan_embedding_is_the_unit_mean_of_its_tiles() -> None:
    tiles = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(scan_embedding(tiles), [2**-0.5, 2**-0.5], atol=1e-7)


def _png(value: int | None = None, size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if value is None else np.full(
        (size, size, 3), value, np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gated_model(tmp_path: Path, rate: float = 0.05) -> Path:
    """A tiny model whose bank holds textured images (noise), gated on other noise images: a flat
    image, with no texture at all, lies far from them."""
    spec = tiny_spec()
    path = tiny_onnx(tmp_path / "m" / "model.onnx", spec, features=8, embedding=True)
    engine = OnnxEngine(path, warmup=False)
    options = TilingOptions()

    def embeddings(seeds: range) -> np.ndarray:
        inputs = [load_for_scoring(_png(seed=s), spec, options).model_input for s in seeds]
        return np.stack([p.embedding for p in engine.predict(np.stack(inputs))])

    bank = build_bank(embeddings(range(40)), ["genuine"] * 40)
    save_bank(bank, path.with_name("bank.npz"))
    val = embeddings(range(100, 140))
    distances = 1.0 - (val @ bank.embeddings.astype(np.float32).T).max(axis=1)  # k = 1 for this test
    threshold = choose_novelty_threshold(distances, rate)
    card = {**tiny_card(spec), "novelty": novelty_record(threshold, rate, distances, bank, k=1)}
    return tiny_onnx(path, spec, card=card, features=8, embedding=True)


def test_the_engine_flags_an_image_unlike_its_bank(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    engine = OnnxEngine(path, warmup=False)
    assert engine.novelty_gate is not None and engine.card.novelty["k"] == 1
    spec = engine.spec
    seen = engine.predict([load_for_scoring(_png(seed=7), spec, TilingOptions()).model_input])[0]
    flat = engine.predict([load_for_scoring(_png(value=255), spec, TilingOptions()).model_input])[0]
    assert seen.recognised is True and seen.novelty is not None
    assert seen.novelty <= engine.novelty_gate.threshold
    # The tiny model calls bright images counterfeit; unrecognised, the answer is uncertain instead.
    assert flat.classifier_verdict == "counterfeit"
    assert (flat.recognised, flat.verdict, flat.reasons) == (False, "uncertain", ("not_recognised",))


def test_a_tiled_scan_is_judged_as_one_image(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    engine = OnnxEngine(path, warmup=False)
    pixels = np.full((32, 400, 3), 1.0, np.float32)  # a long, flat strip: every tile is unlike the bank
    scan = score_scan(pixels, engine, TilingOptions(mode="on"))
    assert len(scan.tiles) > 1
    assert scan.prediction.recognised is False and scan.verdict == "uncertain"
    tiles = engine.predict(np.stack([np.full((3, 32, 32), 1.0, np.float32)] * 2))
    np.testing.assert_allclose(scan.prediction.embedding, tiles[0].embedding, atol=1e-5)


def test_a_card_with_a_gate_but_no_bank_is_refused(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    path.with_name("bank.npz").unlink()
    with pytest.raises(ModelLoadError, match="novelty gate"):
        OnnxEngine(path, warmup=False)


def test_a_bank_of_another_width_is_refused(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    save_bank(build_bank(np.eye(3, 5), ["genuine"] * 3), path.with_name("bank.npz"))
    with pytest.raises(ModelLoadError, match="wide"):
        OnnxEngine(path, warmup=False)


def test_the_card_records_the_gate(tmp_path: Path) -> None:
    path = gated_model(tmp_path, rate=0.05)
    record = OnnxEngine(path, warmup=False).card.novelty
    assert record["target_rate"] == 0.05 and record["val_rate"] <= 0.05
    assert record["bank_rows"] == 40 and record["val_images"] == 40 and record["bank_file"] == "bank.npz"
    json.dumps(record)  # plain JSON
