"""The gate's joint measure: an image must lie near the same training images by its embedding and by its
input profile (`open_set.joint_distance`), and training builds it with each profile tied to its image's
bank row (`training.open_set`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from tests.test_drift import monitored_model
from verity.inference.bank import build_bank, load_bank, save_bank, unit_rows
from verity.inference.engine import ModelLoadError, OnnxEngine
from verity.inference.input_profile import (
    PROFILE_FILE,
    PROFILE_WIDTH,
    ProfileBank,
    ProfileError,
    load_profiles,
    save_profiles,
)
from verity.inference.open_set import (
    SHORTLIST,
    Likeness,
    NoveltyGate,
    Observed,
    joint_distance,
    not_recognised_cause,
)
from verity.training.open_set import _joint_left_out, _joint_threshold, describe, embed_split
from verity.training.scoring import OnnxScorer


def _three_images() -> tuple[np.ndarray, np.ndarray]:
    """Three training images: orthogonal embeddings, and profiles far apart from each other."""
    profiles = np.random.default_rng(0).normal(0.0, 1.0, (3, PROFILE_WIDTH))
    return np.eye(3, dtype=np.float32), profiles


def _gate(joint_threshold: float | None = 1.0) -> NoveltyGate:
    embeddings, profiles = _three_images()
    bank = build_bank(embeddings, ["genuine"] * 3)
    profile_bank = ProfileBank.from_profiles(profiles, np.arange(3))
    apart = np.sqrt(profile_bank.squared_distances(profiles)[~np.eye(3, dtype=bool)]).min()
    # Each threshold lies halfway to the nearest other training image by its own measure.
    return NoveltyGate(bank, 0.5, k=1, profiles=profile_bank, profile_threshold=float(apart) / 2,
                       joint_threshold=joint_threshold)  # fmt: skip


def test_an_image_near_other_training_images_by_each_measure_is_unlike_training() -> None:
    """Texture of the first training image and the profile of the second: within each threshold alone,
    far from every training image by both at once."""
    gate = _gate()
    embeddings, profiles = _three_images()
    same, mixed = gate.likeness(np.stack([embeddings[0], embeddings[0]]), profiles[[0, 1]])
    assert same.novelty == pytest.approx(0.0, abs=1e-6) and same.joint == pytest.approx(0.0, abs=1e-5)
    assert mixed.novelty == pytest.approx(0.0, abs=1e-6)
    assert mixed.profile_distance == pytest.approx(0.0, abs=1e-3)
    assert gate.threshold > mixed.novelty and gate.profile_threshold > mixed.profile_distance  # each: like
    assert mixed.joint is not None and mixed.joint >= 2.0  # one unit from each threshold, at the least
    assert not_recognised_cause(gate, same, Observed(64, False, profiles[0])) is None
    assert not_recognised_cause(gate, mixed, Observed(64, False, profiles[1])) == "unlike_training"


def test_without_a_joint_threshold_the_gate_keeps_its_two_measures() -> None:
    """An older card (no joint record) judges by the embedding and the profile, each alone."""
    gate = _gate(joint_threshold=None)
    embeddings, profiles = _three_images()
    mixed = gate.likeness(embeddings[0], profiles[[1]])[0]
    assert mixed.joint is None
    assert not_recognised_cause(gate, mixed, Observed(64, False, profiles[1])) is None


def test_the_joint_distance_is_the_mean_of_the_k_smallest_scaled_sums() -> None:
    embedding = np.array([[0.1, 0.4, 0.2, 0.8]])
    profile = np.array([[2.0, 0.0, 1.0, 4.0]])
    sums = embedding / 0.2 + profile / 2.0  # 1.5, 2, 1.5, 6
    assert joint_distance(embedding, profile, (0.2, 2.0), 2)[0] == pytest.approx(1.5)
    assert joint_distance(embedding, profile, (0.2, 2.0), 3)[0] == pytest.approx(sums[0, :3].mean())
    assert joint_distance(embedding, profile, (0.2, 2.0), 9)[0] == pytest.approx(sums.mean())  # k > rows
    # A threshold of 0 (validation images the bank holds exactly) still gives a finite distance.
    assert np.isfinite(joint_distance(embedding, profile, (0.0, 2.0), 2)).all()


def test_the_training_images_left_out_distances_match_one_by_one_and_in_chunks() -> None:
    rng = np.random.default_rng(3)
    bank = build_bank(rng.normal(size=(23, 6)), ["genuine"] * 23)
    rows = np.array([4, 0, 7, 22, 13, *range(8, 13), 1, 2, 3])  # profiles of some bank rows, in any order
    profiles = ProfileBank.from_profiles(rng.normal(size=(len(rows), PROFILE_WIDTH)), rows)
    scales = (0.3, 2.0)
    expected = []
    for i in range(len(rows)):
        others = np.delete(np.arange(len(rows)), i)
        gate = NoveltyGate(bank, 0.3, k=3, profiles=profiles, profile_threshold=2.0, joint_threshold=1.0)
        embedding = bank.index.references[rows[i]]
        similarity = bank.index.similarities(embedding[None])[:, rows[others]]
        squared = profiles.squared_distances(profiles.rows[i] * profiles.spread + profiles.mean)[:, others]
        expected.append(joint_distance(1 - similarity, np.sqrt(np.maximum(squared, 0)), scales, 3)[0])
        assert gate.joint_scales == scales
    for chunk in (1, 4, 1024):
        assert np.allclose(_joint_left_out(bank, profiles, scales, 3, chunk), expected, atol=1e-5)


def test_a_profile_file_keeps_its_bank_rows_and_an_older_one_has_none(tmp_path: Path) -> None:
    _, profiles = _three_images()
    linked = save_profiles(ProfileBank.from_profiles(profiles, np.array([2, 0, 1])), tmp_path / "a.npz")
    assert load_profiles(linked).bank_rows.tolist() == [2, 0, 1]
    older = save_profiles(ProfileBank.from_profiles(profiles), tmp_path / "b.npz")
    assert load_profiles(older).bank_rows is None
    bank = ProfileBank.from_profiles(profiles)
    np.savez(tmp_path / "c.npz", rows=bank.rows, mean=bank.mean, spread=bank.spread, bank_rows=np.ones(2))
    with pytest.raises(ProfileError, match="bank rows"):
        load_profiles(tmp_path / "c.npz")
    with pytest.raises(ProfileError, match="bank rows"):
        ProfileBank.from_profiles(profiles, np.arange(2))


def _model_with_joint(tmp_path: Path, bank_rows: np.ndarray | None) -> Path:
    spec = tiny_spec()
    path = tiny_onnx(tmp_path / "m" / "model.onnx", spec, features=8, embedding=True)
    embeddings = np.random.default_rng(0).normal(size=(3, 8))
    save_bank(build_bank(embeddings, ["genuine"] * 3), path.with_name("bank.npz"))
    _, profiles = _three_images()
    save_profiles(ProfileBank.from_profiles(profiles, bank_rows), path.with_name(PROFILE_FILE))
    profile = {"file": PROFILE_FILE, "threshold": 3.0, "k": 1, "joint": {"threshold": 2.0}}
    record = {"threshold": 0.5, "k": 1, "bank_file": "bank.npz", "profile": profile}
    return tiny_onnx(path, spec, card={**tiny_card(spec), "novelty": record}, features=8, embedding=True)


@pytest.mark.parametrize("bank_rows", [None, np.array([0, 1, 3])])
def test_a_card_with_a_joint_rule_needs_profiles_tied_to_its_bank(tmp_path: Path, bank_rows) -> None:
    """A joint rule whose profiles name no bank rows, or rows the bank lacks, must not serve silently."""
    with pytest.raises(ModelLoadError, match="joint rule"):
        OnnxEngine(_model_with_joint(tmp_path, bank_rows), warmup=False)
    served = OnnxEngine(_model_with_joint(tmp_path / "ok", np.array([2, 0, 1])), warmup=False)
    assert served.novelty_gate is not None and served.novelty_gate.joint_threshold == 2.0


def test_training_ties_each_profile_to_its_images_bank_row_and_records_the_joint_rule(tmp_path: Path) -> None:
    model = monitored_model(tmp_path / "models", tmp_path / "data")
    record = json.loads(OnnxEngine(model, warmup=False).card.to_json())["novelty"]
    joint = record["profile"]["joint"]
    assert joint["threshold"] > 0 and joint["target_rate"] == record["profile"]["target_rate"]
    assert "joint threshold" in describe(record)
    bank, profiles = load_bank(model.with_name("bank.npz")), load_profiles(model.with_name(PROFILE_FILE))
    assert profiles.bank_rows is not None and len(profiles.bank_rows) == len(profiles.rows) == len(bank)
    train, val = (
        embed_split(OnnxScorer(model), tmp_path / "data" / "manifest.jsonl", s) for s in ("train", "val")
    )
    # The bank keeps every image of a small set, in order: the training images, then the validation ones.
    embeddings = np.concatenate([train.embeddings, val.embeddings])
    units = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    whole = np.concatenate([train.whole, len(train.embeddings) + val.whole])
    images_profiles = np.concatenate([train.profiles, val.profiles])
    assert len(profiles.bank_rows) == len(whole)
    for row, bank_row in enumerate(profiles.bank_rows):
        image = whole[row]
        assert np.allclose(bank.embeddings[bank_row].astype(np.float32), units[image], atol=2e-3)
        standardised = (images_profiles[row] - profiles.mean) / profiles.spread
        assert np.allclose(profiles.rows[row], standardised, atol=1e-5)
    gate = OnnxEngine(model, warmup=False).novelty_gate
    assert gate is not None and gate.joint_threshold == joint["threshold"]
    measured = gate.likeness(train.embeddings[:2], train.profiles[:2])
    assert all(isinstance(m, Likeness) and m.joint is not None for m in measured)


def test_the_joint_threshold_takes_only_what_the_stated_rate_leaves_on_validation() -> None:
    """200 validation images at a 1% rate allow 2 flags. With none flagged elsewhere, the chosen
    threshold stands when it flags 2; when the other rules already flag one, it rises to flag one more
    only; when they flag two or more, to flag none."""
    joint = np.linspace(0.0, 1.0, 200)  # the two largest: 1.0 and 0.99497...
    chosen = float(joint[-3])  # flags the two largest
    none = np.zeros(200, dtype=bool)
    assert _joint_threshold(chosen, joint, none, 0.01) == chosen
    one = none.copy()
    one[0] = True  # flagged by another rule (its joint distance does not matter)
    raised = _joint_threshold(chosen, joint, one, 0.01)
    assert int((joint[~one] > raised).sum()) == 1 and raised == joint[-2]
    two = none.copy()
    two[:2] = True
    assert int((joint[~two] > _joint_threshold(chosen, joint, two, 0.01)).sum()) == 0
    both_largest = none.copy()
    both_largest[-2:] = True  # the other rules flag the two the joint would: nothing left to flag
    assert _joint_threshold(chosen, joint, both_largest, 0.01) == chosen


def _clustered_gate(rows_total: int = 400, seed: int = 5) -> tuple[NoveltyGate, np.ndarray, np.ndarray]:
    """A gate over training images in a few clusters, where an image's texture and profile go together
    (as they do for real images), thresholds at the 90th percentile of the training images' own left-out
    distances; with their embeddings and raw profiles. The profiles are tied to the bank in another order
    than the bank's, and a tenth of the bank's rows have none (images scored in tiles)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 12))
    cluster = rng.integers(0, 4, rows_total)
    embeddings = unit_rows(centres[cluster] * 3 + rng.normal(size=(rows_total, 12)))
    profiles = np.concatenate([centres[cluster], centres[cluster][:, :4]], axis=1) + rng.normal(
        0, 0.5, (rows_total, PROFILE_WIDTH)
    )
    bank = build_bank(embeddings, ["genuine"] * rows_total)
    tied = rng.permutation(rows_total)[: rows_total * 9 // 10]
    profile_bank = ProfileBank.from_profiles(profiles[tied], tied)
    loose = NoveltyGate(bank, 1.0, k=5, profiles=profile_bank, profile_threshold=1e9, joint_threshold=1e9)
    measured = [loose.likeness(embeddings[i], profiles[i][None])[0] for i in tied[:60]]
    novelty = float(np.percentile([m.novelty for m in measured], 90))
    profile_threshold = float(np.percentile([m.profile_distance for m in measured], 90))
    gate = NoveltyGate(bank, novelty, k=5, profiles=profile_bank, profile_threshold=profile_threshold)
    scaled = gate_with_joint_of(gate, 1e9).likeness(embeddings[tied[:60]], profiles[tied[:60]])
    joint = float(np.percentile([m.joint for m in scaled], 90))
    return gate_with_joint_of(gate, joint), embeddings, profiles


def gate_with_joint_of(gate: NoveltyGate, joint_threshold: float) -> NoveltyGate:
    return NoveltyGate(gate.bank, gate.threshold, k=gate.k, profiles=gate.profiles,
                       profile_threshold=gate.profile_threshold, joint_threshold=joint_threshold)  # fmt: skip


def test_the_verdicts_shortcut_gives_every_verdict_that_the_full_measures_give() -> None:
    """Near and far images, by texture and by profile, each alone and both: the shortcut's novelty is
    the full one to the bit, its verdict the same, and where it settles on bounds they are at least the
    full distances. It settles most images like the training images, and every image unlike them by
    texture, without weighing every profile; the rest take the full measures."""
    gate, embeddings, profiles = _clustered_gate()
    rng = np.random.default_rng(11)
    picks = rng.integers(0, len(embeddings), 300)
    noise = rng.choice([0.0, 0.3, 1.0, 3.0], size=(300, 1))
    queries = unit_rows(embeddings[picks] + noise * rng.normal(size=(300, embeddings.shape[1])))
    query_profiles = profiles[picks] + rng.choice([0.0, 0.5, 2.0], size=(300, 1)) * rng.normal(
        size=(300, PROFILE_WIDTH)
    )
    query_profiles[:40] = profiles[rng.integers(0, len(profiles), 40)]  # another image's profile
    outcomes = {"bounds": 0, "beyond_by_texture": 0, "full": 0}
    liked = 0
    for embedding, profile in zip(queries, query_profiles, strict=True):
        full = gate.likeness(embedding, profile[None])[0]
        fast = gate.verdict_likeness(embedding, profile)
        assert fast.novelty == full.novelty
        assert gate.like_training(fast) == gate.like_training(full)
        liked += gate.like_training(full)
        if not fast.settled:
            assert fast == full
            outcomes["full"] += 1
        elif fast.profile_distance is None:
            assert not gate.recognised(fast.novelty)
            outcomes["beyond_by_texture"] += 1
        else:
            assert fast.profile_distance >= full.profile_distance - 1e-6
            assert fast.joint is not None and full.joint is not None and fast.joint >= full.joint - 1e-6
            outcomes["bounds"] += 1
    assert outcomes["bounds"] >= 0.7 * liked and outcomes["beyond_by_texture"] > 0 and outcomes["full"] > 0


def test_a_settled_verdict_weighs_only_the_shortlists_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training image itself is settled on the profiles of its nearest training images by texture;
    an image whose profile lies far from theirs, though near by texture, is weighed against every one."""
    gate, embeddings, profiles = _clustered_gate()
    weighed: list[int] = []
    real = ProfileBank.squared_distances

    def counted(self: ProfileBank, queries: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        weighed.append(len(self.rows) if rows is None else len(rows))
        return real(self, queries, rows)

    monkeypatch.setattr(ProfileBank, "squared_distances", counted)
    assert gate.profiles is not None and gate.profiles.bank_rows is not None
    full = gate.likeness(embeddings[gate.profiles.bank_rows], profiles[gate.profiles.bank_rows])
    own = int(gate.profiles.bank_rows[int(np.argmin([m.joint for m in full]))])  # the most typical image
    weighed.clear()
    settled = gate.verdict_likeness(embeddings[own], profiles[own])
    assert settled.settled and gate.like_training(settled) and weighed == [weighed[0]]
    assert weighed[0] <= SHORTLIST
    weighed.clear()
    unlike = gate.verdict_likeness(embeddings[own], profiles[own] + 50.0)
    assert not unlike.settled and not gate.like_training(unlike)
    assert weighed[-1] == len(gate.profiles.rows)  # the full measure, after the bounds failed
