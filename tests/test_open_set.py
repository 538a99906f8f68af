"""The open-set rule and the novelty gate: verdicts for images the model was never trained on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.datasets.encode import encode_dicom
from verity.inference.bank import build_bank, save_bank
from verity.inference.decode import CLINICAL_DICOM_MODALITIES, dicom_modality
from verity.inference.engine import ModelLoadError, OnnxEngine
from verity.inference.gate_record import choose_novelty_threshold, envelope_side, novelty_record
from verity.inference.open_set import (
    NoveltyGate,
    OpenSetError,
    open_set_verdict,
    outside_envelope,
    scan_embedding,
)
from verity.inference.pipeline import (
    ScoringOptions,
    Upload,
    engine_predict,
    judge,
    prepare,
    score,
    score_bytes,
)
from verity.inference.preprocess import load_for_model_sized
from verity.inference.tiling import ScoringInput, TilingOptions, load_for_scoring, score_scan
from verity.inference.vocabulary import REASONS


@pytest.mark.parametrize(
    ("classifier", "recognised", "reference", "expected"),
    [
        ("counterfeit", False, "mismatch", ("uncertain", ("not_recognised", "unlike_training"))),
        ("genuine", False, None, ("uncertain", ("not_recognised", "smaller_than_training"))),
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
    cause = expected[1][1] if recognised is False else None  # the gate's cause follows not_recognised
    verdict, reasons = open_set_verdict(classifier, recognised, reference, cause)
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


def _png(value: int | None = None, size: int = 32, seed: int = 0, width: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, width or size, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gated_model(tmp_path: Path, rate: float = 0.05, min_side: int | None = None) -> Path:
    """A tiny model whose bank holds textured images (noise), gated on other noise images: a flat
    image, with no texture at all, lies far from them. `min_side`: the training envelope's size."""
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
    record = novelty_record(threshold, rate, distances, bank, k=1, min_side=min_side)
    card = {**tiny_card(spec), "novelty": record}
    return tiny_onnx(path, spec, card=card, features=8, embedding=True)


def test_the_engine_flags_an_image_unlike_its_bank(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    engine = OnnxEngine(path, warmup=False)
    assert engine.novelty_gate is not None and engine.card.novelty["k"] == 1
    seen, flat = score_bytes(_png(seed=7), engine), score_bytes(_png(value=255), engine)
    assert seen.recognised is True and seen.novelty is not None
    assert seen.novelty <= engine.novelty_gate.threshold
    # The tiny model calls bright images counterfeit; unrecognised, the answer is uncertain instead.
    assert flat.classifier_verdict == "counterfeit"
    assert (flat.recognised, flat.verdict) == (False, "uncertain")
    assert flat.reasons == ("not_recognised", "unlike_training")  # its size is within the envelope


def test_a_tiled_scan_is_judged_as_one_image(tmp_path: Path) -> None:
    path = gated_model(tmp_path)
    engine = OnnxEngine(path, warmup=False)
    pixels = np.full((32, 400, 3), 1.0, np.float32)  # a long, flat strip: every tile is unlike the bank
    scan = score_scan(pixels, engine, TilingOptions(mode="on"))
    assert len(scan.tiles) > 1
    scored = judge(Upload("", ScoringInput(None, pixels, 32, "png")), scan.output, engine, scan)
    assert scored.recognised is False and scored.verdict == "uncertain"
    tiles = engine.predict(np.stack([np.full((3, 32, 32), 1.0, np.float32)] * 2))
    np.testing.assert_allclose(scan.output.embedding, tiles[0].embedding, atol=1e-5)


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


def test_an_image_smaller_than_any_training_image_is_not_recognised(tmp_path: Path) -> None:
    """The training envelope: 31 x 32 noise has the bank's texture (the novelty gate alone recognises
    it) but a side under the smallest training image's 32 px, so it is not recognised."""
    engine = OnnxEngine(gated_model(tmp_path, min_side=32), warmup=False)
    gate = engine.novelty_gate
    assert gate is not None and gate.min_side == 32 and engine.card.novelty["min_side"] == 32
    for height, expected in ((31, False), (32, True)):
        upload = prepare(_png(seed=9, size=height, width=32), engine.spec, TilingOptions())
        assert upload.decoded.shorter_side == height
        judged = score(upload, engine, engine_predict(engine))
        assert judged.novelty is not None and gate.recognised(judged.novelty)  # by novelty alone
        assert judged.recognised is expected
        if not expected:
            assert judged.verdict == "uncertain"
            assert judged.reasons == ("not_recognised", "smaller_than_training")
            assert judged.classifier_verdict == engine.thresholds.verdict(judged.score)


def test_a_tiled_scan_under_the_training_envelope_is_not_recognised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long, thin scan scored in tiles is held against the training envelope as a whole image is: 31 px
    high is under the smallest training image's 32 px, so it is not recognised whatever its novelty,
    while 32 px is judged by novelty alone. Its novelty is searched once per scan, never per tile."""
    engine = OnnxEngine(gated_model(tmp_path, min_side=32), warmup=False)
    gate = engine.novelty_gate
    assert gate is not None
    searches = []
    real = NoveltyGate._similarities  # the bank search every measure starts from

    def counted(self: NoveltyGate, embeddings: np.ndarray) -> np.ndarray:
        searches.append(len(np.atleast_2d(embeddings)))
        return real(self, embeddings)

    monkeypatch.setattr(NoveltyGate, "_similarities", counted)
    options = ScoringOptions(TilingOptions(mode="on"))
    for height, expected in ((31, False), (32, True)):
        searches.clear()
        scored = score_bytes(_png(seed=9, size=height, width=400), engine, options)
        assert scored.scan is not None and scored.tiles > 1
        assert scored.upload.decoded.shorter_side == height
        assert searches == [1]  # one search for the scan's one embedding
        assert scored.novelty is not None
        assert scored.recognised is (expected and gate.recognised(scored.novelty))
        if not expected:
            assert scored.verdict == "uncertain"
            assert scored.reasons == ("not_recognised", "smaller_than_training")


def test_the_envelope_rule_and_its_size() -> None:
    assert envelope_side([40, 35, 300], image_size=224) == 35
    assert envelope_side([400, 300], image_size=224) == 224  # never above the model's input size
    with pytest.raises(OpenSetError):
        envelope_side([], image_size=224)
    assert outside_envelope(None, 10) is False
    bank = build_bank(np.eye(2, 3), ["genuine"] * 2)
    assert outside_envelope(NoveltyGate(bank, 0.1), 10) is False  # no size recorded: no rule
    sized = NoveltyGate(bank, 0.1, min_side=32)
    assert outside_envelope(sized, 31) and not outside_envelope(sized, 32)
    assert outside_envelope(sized, None) is False


def test_the_card_records_the_envelope_and_counts_it_in_the_val_rate() -> None:
    bank = build_bank(np.eye(2, 3), ["genuine"] * 2)
    novelty = np.array([0.0, 0.0, 0.0, 0.0])
    record = novelty_record(0.5, 0.01, novelty, bank, min_side=32, val_sides=np.array([64, 20, 32, 40]))
    assert record["min_side"] == 32 and record["val_rate"] == 0.25
    assert "min_side" not in novelty_record(0.5, 0.01, novelty, bank)


def test_the_shorter_side_is_the_images_own_even_for_a_drafted_jpeg() -> None:
    """A JPEG far larger than the model input decodes in draft mode, which keeps only its long side at
    the input size: a thin 2000 x 100 strip is still 100 px on its shorter side, not 2000/8 x 12."""
    spec = tiny_spec()
    buffer = io.BytesIO()
    Image.fromarray(np.full((100, 2000, 3), 128, np.uint8)).save(buffer, format="JPEG")
    _, side, _ = load_for_model_sized(buffer.getvalue(), spec)
    assert side == 100
    _, side, _ = load_for_model_sized(_png(seed=1, size=20, width=50), spec)
    assert side == 20
    tiff = io.BytesIO()
    Image.fromarray(np.full((18, 40), 3000, np.uint16)).save(tiff, format="TIFF")
    assert load_for_scoring(tiff.getvalue(), tiny_spec("xray"), TilingOptions()).shorter_side == 18


def test_eval_counts_what_the_pipeline_did_not_recognise_by_cause(tmp_path: Path) -> None:
    from verity.training.open_set_eval import not_recognised_rate

    engine = OnnxEngine(gated_model(tmp_path, min_side=24), warmup=False)
    assert engine.novelty_gate is not None
    results = [score_bytes(_png(seed=7), engine), score_bytes(_png(seed=8, size=20), engine),
               score_bytes(_png(value=255), engine)]  # fmt: skip
    figures = not_recognised_rate(results, engine.novelty_gate)
    assert figures["not_recognised"] == 2 and figures["images"] == 3
    assert figures["by_cause"] == {"unlike_training": 1, "smaller_than_training": 1}
    assert figures["under_min_side"] == 1


def test_a_clinical_dicom_is_another_kind_of_image_whatever_its_pixels(tmp_path: Path) -> None:
    """An MR slice or an ultrasound is no security X-ray (DICOS and industrial radiography write CT, DX,
    CR or DR): the header's Modality says so before any likeness is weighed."""
    engine = OnnxEngine(gated_model(tmp_path), warmup=False)
    pixels = (np.random.default_rng(3).random((48, 64)) * 65535).astype(np.uint16)
    scanner, clinical = encode_dicom(pixels), encode_dicom(pixels, Modality="MR")
    assert (dicom_modality(scanner), dicom_modality(clinical), dicom_modality(_png(seed=1))) == (
        "DX",
        "MR",
        None,
    )
    assert dicom_modality(encode_dicom(pixels, Modality="")) is None
    answer = score_bytes(clinical, engine)
    assert (answer.verdict, answer.reasons) == ("uncertain", ("not_recognised", "other_modality"))
    assert "other_modality" not in score_bytes(scanner, engine).reasons  # the same pixels from a scanner
    assert {"MR", "US", "NM", "PT"} <= CLINICAL_DICOM_MODALITIES
    assert not {"CT", "DX", "CR", "DR"} & CLINICAL_DICOM_MODALITIES
