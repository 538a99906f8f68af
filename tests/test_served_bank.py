"""The served gate's bank and profiles: the training images', against which every threshold is chosen,
then the validation images', joined once the thresholds are set (training/open_set.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.test_drift import monitored_model
from verity.inference.bank import BANK_FILE, DEFAULT_K, ReferenceBank, left_out_novelty, load_bank, novelty
from verity.inference.engine import OnnxEngine
from verity.inference.gate_record import DEFAULT_NOVELTY_RATE, choose_novelty_threshold
from verity.inference.input_profile import PROFILE_FILE, ProfileBank, ProfileError, load_profiles
from verity.inference.pipeline import score_bytes

if TYPE_CHECKING:
    from verity.training.open_set import EmbeddedSplit

pytestmark = pytest.mark.torch  # the gate is built by training's code (training/open_set.py)

TRAIN, VAL = 50, 30  # monitored_model's splits


def _split(model: Path, data: Path, split: str) -> EmbeddedSplit:
    from verity.training.open_set import embed_split
    from verity.training.scoring import OnnxScorer

    return embed_split(OnnxScorer(model), data / "manifest.jsonl", split)


def test_the_bank_holds_training_then_validation_images_and_the_threshold_is_the_training_banks(
    tmp_path: Path,
) -> None:
    model = monitored_model(tmp_path / "models", tmp_path / "data")
    record = OnnxEngine(model, warmup=False).card.novelty
    bank = load_bank(model.with_name(BANK_FILE))
    assert len(bank) == record["bank_rows"] == TRAIN + VAL and record["bank_validation_rows"] == VAL
    assert record["bank_total"] == TRAIN and bank.provenance["split"] == "train+val"
    train, val = _split(model, tmp_path / "data", "train"), _split(model, tmp_path / "data", "val")
    np.testing.assert_allclose(bank.embeddings[TRAIN:].astype(np.float32), val.embeddings /
                               np.linalg.norm(val.embeddings, axis=1, keepdims=True), atol=1e-3)  # fmt: skip
    # The threshold is the one chosen against the training rows alone, to the bit.
    training_only = ReferenceBank(bank.embeddings[:TRAIN], bank.labels[:TRAIN], bank.products[:TRAIN])
    chosen = choose_novelty_threshold(
        novelty(val.embeddings, training_only, DEFAULT_K), DEFAULT_NOVELTY_RATE / 2
    )
    assert record["threshold"] == chosen
    # With its own row in the bank, each validation image now lies nearer than it did.
    assert (
        novelty(val.embeddings, bank, DEFAULT_K) <= novelty(val.embeddings, training_only, DEFAULT_K)
    ).all()
    # Profiles: a row for every bank row, standardised by the training profiles alone.
    profiles = load_profiles(model.with_name(PROFILE_FILE))
    assert record["profile"]["rows"] == len(profiles.rows) == TRAIN + VAL
    np.testing.assert_array_equal(profiles.bank_rows, np.arange(TRAIN + VAL))
    np.testing.assert_allclose(profiles.mean, train.profiles.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(
        profiles.rows[TRAIN:], (val.profiles - profiles.mean) / profiles.spread, atol=1e-5
    )


def test_a_validation_image_is_served_as_one_the_bank_holds(tmp_path: Path) -> None:
    model = monitored_model(tmp_path / "models", tmp_path / "data")
    engine = OnnxEngine(model, warmup=False)
    val = _split(model, tmp_path / "data", "val")
    scored = score_bytes(val.samples[0].path.read_bytes(), engine)
    assert scored.recognised is True and scored.novelty is not None
    served = novelty(val.embeddings[:1], load_bank(model.with_name(BANK_FILE)))
    assert scored.novelty == pytest.approx(float(served[0]), abs=1e-6)


def test_the_cap_leaves_room_for_as_many_validation_images_as_it_can(tmp_path: Path) -> None:
    from verity.training.open_set import build_open_set

    model = monitored_model(tmp_path / "models", tmp_path / "data")
    full = load_bank(model.with_name(BANK_FILE))
    record = build_open_set(model, tmp_path / "data" / "manifest.jsonl", max_references=TRAIN + 10)
    capped = load_bank(model.with_name(BANK_FILE))
    assert len(capped) == record["bank_rows"] == TRAIN + 10 and record["bank_validation_rows"] == 10
    np.testing.assert_array_equal(capped.embeddings[:TRAIN], full.embeddings[:TRAIN])
    joined = {row.tobytes() for row in capped.embeddings[TRAIN:]}
    assert joined <= {row.tobytes() for row in full.embeddings[TRAIN:]}  # a choice of the validation rows
    profiles = load_profiles(model.with_name(PROFILE_FILE))
    assert len(profiles.rows) == TRAIN + 10 and sorted(profiles.bank_rows) == list(range(TRAIN + 10))
    record = build_open_set(model, tmp_path / "data" / "manifest.jsonl", max_references=TRAIN)
    assert record["bank_rows"] == TRAIN and record["bank_validation_rows"] == 0


def test_appended_profiles_keep_the_banks_unit_and_name_their_rows() -> None:
    rng = np.random.default_rng(0)
    training = rng.normal(size=(20, 16))
    bank = ProfileBank.from_profiles(training, np.arange(20))
    more = bank.with_rows(training[:3] + 1.0, np.array([20, 21, 22]))
    np.testing.assert_array_equal(more.mean, bank.mean)
    np.testing.assert_allclose(
        more.rows[20:], bank.rows[:3] + (1.0 / bank.spread).astype(np.float32), atol=1e-5
    )
    np.testing.assert_array_equal(more.bank_rows, np.arange(23))
    with pytest.raises(ProfileError, match="bank rows"):
        bank.with_rows(training[:3])  # this bank names its rows: so must what joins it
    with pytest.raises(ProfileError, match="3 profiles need as many bank rows"):
        bank.with_rows(training[:3], np.array([20, 21]))
    with pytest.raises(ProfileError, match="N x 16"):
        bank.with_rows(training[:3, :5], np.array([20, 21, 22]))


def test_eval_says_a_validation_splits_gate_figures_are_no_estimate(tmp_path: Path) -> None:
    from verity.training.eval_outputs import open_set_lines
    from verity.training.evaluate import evaluate

    model = monitored_model(tmp_path / "models", tmp_path / "data")
    manifest = tmp_path / "data" / "manifest.jsonl"
    for split, in_bank in (("val", VAL), ("all", VAL), ("train", None)):
        result = evaluate(
            model.parent, manifest, split=split, out_dir=tmp_path / split, progress=False, report=False
        )
        evaluated = result["open_set"]["evaluated"]
        assert evaluated.get("validation_in_bank") == in_bank, split
        noted = any("not an estimate" in line for line in open_set_lines(result))
        assert noted == (in_bank is not None), split


def test_a_validation_split_too_small_for_the_rate_is_joined_by_the_training_images() -> None:
    """The embedding's threshold is chosen on the fewest ordinary images that resolve its share of the
    rate: validation alone when it does; else with the training images, each measured without its case,
    when together they do; else validation alone (a largest novelty, with the gate-size warning)."""
    from verity.inference.bank import build_bank
    from verity.training.open_set import embedding_ordinary

    rng = np.random.default_rng(5)
    cases = np.repeat(np.arange(120), 2)  # 240 training images, two of each case
    bank = build_bank(np.repeat(rng.normal(size=(120, 8)), 2, axis=0), ["genuine"] * 240)
    share = DEFAULT_NOVELTY_RATE / 2  # 200 images resolve it
    val = rng.uniform(0.1, 0.2, 200)
    assert embedding_ordinary(bank, cases, val, share, DEFAULT_K) is val
    few = val[:75]
    pooled = embedding_ordinary(bank, cases, few, share, DEFAULT_K)
    assert len(pooled) == 240 + 75
    np.testing.assert_array_equal(pooled[:240], left_out_novelty(bank, cases, DEFAULT_K))
    assert pooled[:240].min() > 0.01  # never beside its identical case-mate
    small = ReferenceBank(bank.embeddings[:100], bank.labels[:100], bank.products[:100])
    assert embedding_ordinary(small, cases[:100], few, share, DEFAULT_K) is few  # 175: still too few


def test_a_gate_chooses_the_embeddings_threshold_with_its_training_images_where_validation_is_too_few(
    tmp_path: Path,
) -> None:
    """30 validation images are too few for half of 1%; with 180 training images, each measured without
    its case, they are enough: the card records the threshold chosen on the 210, and no size warning."""
    from verity.training.open_set import group_codes

    model = monitored_model(tmp_path / "models", tmp_path / "data", train=180)
    record = OnnxEngine(model, warmup=False).card.novelty
    assert record["threshold_images"] == 180 + VAL and "warnings" not in record
    bank = load_bank(model.with_name(BANK_FILE))
    training_only = ReferenceBank(bank.embeddings[:180], bank.labels[:180], bank.products[:180])
    train, val = _split(model, tmp_path / "data", "train"), _split(model, tmp_path / "data", "val")
    groups = group_codes(train.samples)
    assert len(set(groups.tolist())) == 180 // 5
    ordinary = np.concatenate([left_out_novelty(training_only, groups, DEFAULT_K),
                               novelty(val.embeddings, training_only, DEFAULT_K)])  # fmt: skip
    assert record["threshold"] == choose_novelty_threshold(ordinary, DEFAULT_NOVELTY_RATE / 2)
