"""The "not recognised" gate of an exported model: its reference bank, input profiles and thresholds.

After export, the training split is embedded through the server's own engine and decoder (the scoring
path of `verity eval`), subsampled into a bank, with its input profiles (`inference.input_profile`). The
validation split's novelty against that bank, and its profiles' distance to the training profiles with
the training profiles' own (each left out of its neighbours), set the two thresholds, each for half the
stated rate of in-distribution images flagged (`inference.gate_record.choose_novelty_threshold`). Where
the validation images are too few for the embedding's share of the rate, the training images join them,
each measured against the bank without its case, if together they are enough (`embedding_ordinary`).
Then the validation images join the bank and the profiles (`_served_references`), and the two are
written beside model.onnx as bank.npz and profile.npz. The share of training images in colour is kept
for the colour rule. The card, in the ONNX metadata and card.json, then records the gate; the served
model loads it without torch.

Why the training images, and without their case: a validation split too small for the rate sets the
threshold at its largest novelty, and its images are fewer draws than they look, since the images of
one case (a scan, its crops and patches) lie together. The synthetic console set of the robustness
suite has 75 validation images of 25 cases: on 2,000 fresh images from the same generator (another
seed), the three models' gates chosen on them alone flagged 3.4%, 2.9% and 2.9%, where 1% was asked.
A training image measured without its case is as fair a draw as a validation image (on seed 0 their
novelties had the median and 90th percentile of the fresh images', 0.0045 and 0.0061 against 0.0041 and
0.0062), and beside its case-mates it is not (a crop beside its own scan). With the 349 training images,
the same gates flagged 1.8%, 1.5% and 1.5% of the fresh images (`benchmarks/foreign_bench.py --fresh`).

Why the validation images join the bank once the thresholds are set: a new image is then compared with
every ordinary image the run has, so an ordinary one finds nearer neighbours, while the thresholds stay
those chosen against the training images alone. On small sets this is what the gate's own false alarms
hang on: the GDXray fish bones have 128 training and 32 validation images, and with the 32 in the bank
the models of the robustness suite flagged 1, 0 and 1 of their 40 test images at 32 px (2, 1 and 1
before) and 0, 1 and 1 at full size (1 each), and gave the foreign images of benchmarks/foreign_bench.py
as many verdicts as before, group for group (1 of 404 at full size, none at 32 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.bank import (
    BANK_FILE,
    DEFAULT_K,
    MAX_REFERENCES,
    ReferenceBank,
    build_bank,
    left_out_novelty,
    novelty,
    save_bank,
    subsample_indices,
    unit_rows,
)
from verity.inference.card import ModelCard
from verity.inference.drift import drift_reference
from verity.inference.engine import METADATA_CARD_KEY
from verity.inference.gate_record import (
    DEFAULT_NOVELTY_RATE,
    card_with_gate,
    choose_novelty_threshold,
    envelope_side,
    gate_size_warnings,
    novelty_record,
    with_gate_warnings,
)
from verity.inference.input_profile import (
    MEDIAN_LEVEL,
    PROFILE_FILE,
    PROFILE_WIDTH,
    ProfileBank,
    detail_on_input,
    save_profiles,
)
from verity.inference.open_set import NoveltyGate, joint_distance
from verity.inference.vocabulary import LABELS
from verity.training.eval_samples import Sample, load_samples, split_params_for
from verity.training.scoring import OnnxScorer, score_samples


@dataclass(frozen=True)
class EmbeddedSplit:
    embeddings: np.ndarray  # N x D, as served
    samples: list[Sample]  # the images they belong to
    shorter_sides: np.ndarray  # N, each decoded image's shorter side in pixels
    profiles: np.ndarray  # M x PROFILE_WIDTH: the input profiles of the images scored whole (M <= N)
    profile_sides: np.ndarray  # M: the shorter side of each of those images
    whole: np.ndarray  # M: the index of each of those images among the N
    colour: np.ndarray  # N booleans: each image in colour before the colour rule
    scores: np.ndarray  # N calibrated scores, as served


def embed_split(scorer: OnnxScorer, data: str | Path, split: str, progress: bool = False) -> EmbeddedSplit:
    """The embeddings of one split of `data`, with their samples and sizes."""
    params = split_params_for(scorer.path)
    loaded = load_samples(data, split, scorer.spec.modality, params)
    scored = score_samples(scorer, loaded.samples, progress=progress)
    if scored.embeddings is None:
        raise ValueError(f"{scorer.path} has no embedding output: export it again with this version.")
    assert scored.shorter_sides is not None  # score_samples always measures them
    samples = [loaded.samples[i] for i in scored.indices]
    decoded = [result.upload.decoded for result in scored.results]
    whole = [i for i, image in enumerate(decoded) if image.profile is not None]
    stacked = (
        np.stack([decoded[i].profile for i in whole]) if whole else np.zeros((0, PROFILE_WIDTH), np.float32)
    )
    sides = np.array([decoded[i].shorter_side for i in whole], dtype=np.int64)
    colour = np.array([bool(image.colour) for image in decoded])
    return EmbeddedSplit(
        scored.embeddings, samples, scored.shorter_sides, stacked, sides, np.array(whole, dtype=np.int64),
        colour, scored.scores,
    )


def rewrite_card(onnx_path: Path, card: ModelCard) -> None:
    """Replaces the card in the ONNX metadata (the graph is untouched, so parity still holds)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    for entry in proto.metadata_props:
        if entry.key == METADATA_CARD_KEY:
            entry.value = card.to_json(sort_keys=True)
    onnx.save(proto, str(onnx_path), save_as_external_data=False)


def build_open_set(
    onnx_path: str | Path,
    data: str | Path,
    *,
    rate: float = DEFAULT_NOVELTY_RATE,
    max_references: int = MAX_REFERENCES,
    k: int = DEFAULT_K,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Chooses the novelty threshold on the validation split of `data` against a bank of its training
    split, takes the training envelope's size from the training images (`gate_record.envelope_side`),
    writes bank.npz (and profile.npz) beside `onnx_path` with the validation images joined to the
    training images (`_served_references`), and records all in the model's card. Returns the record."""
    onnx_path = Path(onnx_path)
    scorer = OnnxScorer(onnx_path)
    train = embed_split(scorer, data, "train", progress)
    val = embed_split(scorer, data, "val", progress)
    card = scorer.engine.card
    provenance = {"model": card.name, "version": card.version, "data": str(data), "split": "train"}
    bank = build_bank(
        train.embeddings, [LABELS[s.target] for s in train.samples], [s.product or "" for s in train.samples],
        provenance, max_references=max_references, seed=seed,
    )  # fmt: skip
    val_novelty = novelty(val.embeddings, bank, min(k, len(bank)))
    kept = subsample_indices(len(train.embeddings), max_references, seed)  # as build_bank kept
    # Two measures share the stated rate, half each, so the gate as a whole flags at most `rate` of
    # validation (the size and colour rules add what the training images themselves never show); the
    # joint measure takes what is left of it (`_joint_threshold`).
    ordinary = embedding_ordinary(bank, group_codes(train.samples)[kept], val_novelty, rate / 2, k)
    threshold = choose_novelty_threshold(ordinary, rate / 2)
    min_side = envelope_side(train.shorter_sides, scorer.spec.image_size)
    colour_share = float(train.colour.mean())
    gate = NoveltyGate(bank, threshold, k, min_side, colour_share=colour_share)
    colour_flags = np.array([gate.colour_unseen(bool(c)) for c in val.colour], dtype=bool)
    flagged = (val_novelty > threshold) | (val.shorter_sides < min_side) | colour_flags
    profile, profile_flags, profiles = _profile_gate(
        train, val, rate, k, _EmbeddingGate(bank, kept, threshold, flagged), scorer.spec.image_size
    )
    served_bank, served_profiles = _served_references(bank, profiles, val, max_references, seed)
    save_bank(served_bank, onnx_path.with_name(BANK_FILE))
    if profile is not None and served_profiles is not None:  # a profile record comes with its profiles
        save_profiles(served_profiles, onnx_path.with_name(PROFILE_FILE))
        profile["rows"] = len(served_profiles.rows)
    record = novelty_record(
        threshold, rate, val_novelty, served_bank, k, min_side=min_side, val_sides=val.shorter_sides,
        profile=profile, colour_share=colour_share, val_flagged=profile_flags | colour_flags,
    )  # fmt: skip
    record.update(_threshold_images_record(ordinary, val_novelty, val, rate / 2))
    # What live traffic is held against (inference.drift): the validation split's distributions.
    brightness = val.profiles[:, MEDIAN_LEVEL] if len(val.profiles) else np.array([np.nan])
    record["drift"] = drift_reference(val.scores, brightness, record["val_rate"])
    rewrite_card(onnx_path, card_with_gate(card, record))
    return record


@dataclass(frozen=True)
class _EmbeddingGate:
    """What the profile and joint measures build on: the bank, the training images it kept (indices into
    the training split), the embedding's threshold, and the validation images already flagged (by the
    embedding, the size rule and the colour rule)."""

    bank: ReferenceBank
    kept: np.ndarray
    threshold: float
    val_flagged: np.ndarray


def _threshold_images_record(
    ordinary: np.ndarray, val_novelty: np.ndarray, val: EmbeddedSplit, share: float
) -> dict[str, Any]:
    """What the card records of the images the embedding's threshold was chosen on: how many (validation
    images, and training images where they count), and the gate-size warning where validation alone was
    too few for its share of the rate (`gate_record.gate_size_warnings`, counting its cases)."""
    record: dict[str, Any] = {"threshold_images": len(ordinary)}
    if len(ordinary) == len(val_novelty):
        val_cases = len(np.unique(group_codes(val.samples)))  # a case, many images
        warnings = gate_size_warnings(len(val_novelty), share, val_cases)
        if warnings:
            record["warnings"] = warnings
    return record


def embedding_ordinary(
    bank: ReferenceBank, groups: np.ndarray, val_novelty: np.ndarray, share: float, k: int
) -> np.ndarray:
    """The novelties the embedding's threshold is chosen on, for a share of the rate: the fewest ordinary
    images that resolve it (1 / share of them). The validation images' when they are enough. Otherwise
    the training images join them, each measured against the bank without its case (`groups`, one code a
    bank row; `bank.left_out_novelty`), when together they are enough. Otherwise the validation images'
    alone, with the gate-size warning: the threshold is then a largest novelty, set by one image, and
    the validation images were never trained on (on the GDXray fish bones, 160 images with the training
    ones, the largest was an isolated training patch's, 0.0224 against 0.0087 for validation's largest,
    and 17 of 404 foreign images passed it)."""
    needed = math.ceil(1.0 / share - 1e-9)
    if len(val_novelty) >= needed:
        return val_novelty
    left_out = left_out_novelty(bank, groups, k)
    pooled = np.concatenate([left_out[np.isfinite(left_out)], val_novelty])
    return pooled if len(pooled) >= needed else val_novelty


def group_codes(samples: list[Sample]) -> np.ndarray:
    """One integer a sample, the same for samples of one group (`Sample.group`, the unit the split keeps
    on one side: a case and its images; a sample without one is a group of its own)."""
    keys = [sample.group or f"file:{sample.path}" for sample in samples]
    return np.unique(np.asarray(keys, dtype=str), return_inverse=True)[1].astype(np.int64)


def _profile_gate(
    train: EmbeddedSplit, val: EmbeddedSplit, rate: float, k: int, embedding: _EmbeddingGate, input_side: int
) -> tuple[dict[str, Any] | None, np.ndarray, ProfileBank | None]:
    """The input profiles of the bank's training images that were scored whole, each with its bank row,
    and the profile's threshold and the joint measure's (for half the stated `rate` each, on the training
    profiles' own distances, each left out of its neighbours, and validation's); the envelope's detail
    from the training images. Returns the card's `profile` record, each validation image's flag and the
    profiles. None (no flags, no profiles) when a split has no image scored whole: every image a scan in
    tiles."""
    no_flags = np.zeros(len(val.samples), dtype=bool)
    if len(train.profiles) == 0 or len(val.profiles) == 0 or len(val.profiles) != len(val.samples):
        return None, no_flags, None
    position = {int(image): row for row, image in enumerate(train.whole)}
    kept = enumerate(embedding.kept)
    linked = [(row, position[int(image)]) for row, image in kept if int(image) in position]
    if not linked:
        return None, no_flags, None
    bank_rows, profile_rows = (np.array(column, dtype=np.int64) for column in zip(*linked, strict=True))
    profiles = ProfileBank.from_profiles(train.profiles[profile_rows], bank_rows)
    distances = profiles.distance(val.profiles, k)
    # The profile is no learnt feature: a training image left out of its own neighbours is as fair a
    # draw of an ordinary image as a validation one, so the threshold sees both. A validation split of
    # 75 images alone sets it at their largest distance, and one short of a product then flags its
    # ordinary images on test (the synthetic console set: 5 of 76).
    ordinary = np.concatenate([profiles.left_out_distance(k), distances])
    threshold = choose_novelty_threshold(ordinary, rate / 2)
    # The envelope's detail: the least any training image showed (as `min_side` is the smallest side).
    min_detail = min(_details_on_input(train, input_side))
    flags = (distances > threshold) | (np.array(_details_on_input(val, input_side)) < min_detail)
    # The validation images' joint distances as the served gate measures them (no threshold yet).
    measuring = NoveltyGate(embedding.bank, embedding.threshold, k, profiles=profiles,
                            profile_threshold=threshold, joint_threshold=math.inf)  # fmt: skip
    joint = np.array([measured.joint for measured in measuring.likeness(val.embeddings, val.profiles)])
    scales = (embedding.threshold, threshold)
    joint_ordinary = np.concatenate([_joint_left_out(embedding.bank, profiles, scales, k), joint])
    joint_threshold = _joint_threshold(
        choose_novelty_threshold(joint_ordinary, rate / 2), joint, flags | embedding.val_flagged, rate
    )
    flags |= joint > joint_threshold
    record = {"file": PROFILE_FILE, "threshold": threshold, "k": int(k), "rows": len(profiles.rows),
              "threshold_images": len(ordinary), "min_detail": min_detail, "target_rate": rate / 2,
              "joint": {"threshold": joint_threshold, "target_rate": rate / 2},
              "val_rate": float(flags.mean())}  # fmt: skip
    return record, flags, profiles


def _served_references(
    bank: ReferenceBank, profiles: ProfileBank | None, val: EmbeddedSplit, max_references: int, seed: int
) -> tuple[ReferenceBank, ProfileBank | None]:
    """The bank and profiles the served gate compares with: the training images' (the thresholds were
    chosen against them), then the validation images', as many as the bank's cap leaves room for (a
    seeded choice when fewer), each validation image scored whole with its profile, standardised as the
    training profiles are, so that every threshold keeps its unit."""
    room = max(max_references - len(bank), 0)
    joined = subsample_indices(len(val.embeddings), room, seed)  # none when the training images fill it
    labels = np.asarray([LABELS[val.samples[i].target] for i in joined], dtype=str)
    products = np.asarray([val.samples[i].product or "" for i in joined], dtype=str)
    served = ReferenceBank(
        np.concatenate([bank.embeddings, unit_rows(val.embeddings[joined]).astype(np.float16)]),
        np.concatenate([bank.labels, labels]),
        np.concatenate([bank.products, products]),
        {**bank.provenance, "split": "train+val", "validation_rows": len(joined)},
    )
    if profiles is None:
        return served, None
    bank_row = {int(image): len(bank) + row for row, image in enumerate(joined)}
    whole = [(row, bank_row[int(image)]) for row, image in enumerate(val.whole) if int(image) in bank_row]
    if not whole:
        return served, profiles
    profile_rows, bank_rows = (np.array(column, dtype=np.int64) for column in zip(*whole, strict=True))
    return served, profiles.with_rows(val.profiles[profile_rows], bank_rows)


def _joint_threshold(chosen: float, val_joint: np.ndarray, flagged: np.ndarray, rate: float) -> float:
    """The joint measure's threshold: `chosen` (for its half of the rate), raised if need be so that it
    flags no more validation images than the stated `rate` leaves after the other rules' `flagged`: the
    gate as a whole keeps its promise on validation. On the shipped X-ray model the joint measure would
    have added a fourth flag to three of 360."""
    allowed = max(math.floor(rate * len(val_joint)) - int(flagged.sum()), 0)
    beyond = np.sort(val_joint[~flagged & (val_joint > chosen)])[::-1]
    return chosen if len(beyond) <= allowed else float(beyond[allowed])


def _joint_left_out(
    bank: ReferenceBank, profiles: ProfileBank, scales: tuple[float, float], k: int, chunk: int = 1024
) -> np.ndarray:
    """Each training image's joint distance to the others (itself left out), in chunks of rows."""
    assert profiles.bank_rows is not None
    if len(profiles.rows) <= 1:
        return np.zeros(0)
    embeddings = bank.index.references[profiles.bank_rows]
    nearest = min(k, len(profiles.rows) - 1)
    out = []
    for rows, squared in profiles.left_out_blocks(chunk):
        embedding_distances = 1.0 - embeddings[rows] @ embeddings.T
        out.append(joint_distance(embedding_distances, np.sqrt(np.maximum(squared, 0.0)), scales, nearest))
    return np.concatenate(out)


def _details_on_input(split: EmbeddedSplit, input_side: int) -> list[float]:
    return [
        detail_on_input(p, int(n), input_side)
        for p, n in zip(split.profiles, split.profile_sides, strict=True)
    ]


def rebuild_gate(model_dir: Path, data: Path | None = None) -> dict[str, Any]:
    """The gate this code builds, for a model exported before (bank, input profiles, colour share,
    thresholds on `data`'s validation split, by default the run's own data.jsonl), recorded in its ONNX
    metadata and card.json. The graph is untouched, so every score stays the same."""
    import json

    record = build_open_set(model_dir / "model.onnx", data or model_dir / "data.jsonl")
    card_json = model_dir / "card.json"
    card = json.loads(card_json.read_text(encoding="utf-8"))  # its own order kept: only the gate changes
    warnings = with_gate_warnings(None if card.get("warnings") is None else tuple(card["warnings"]), record)
    card = {**card, "novelty": record}
    if warnings is not None:
        card["warnings"] = list(warnings)
    card_json.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return record


def describe(record: dict[str, Any]) -> str:
    """For `verity export` and `verity train`: the gate in one line, then a line for each of its warnings."""
    line = (
        f"novelty gate: bank of {record['bank_rows']:,} training and validation images "
        f"({record['bank_file']}), "
        f"threshold {record['threshold']:.4f} flags {record['val_rate']:.2%} of {record['val_images']} "
        f"validation images (target {record['target_rate']:.0%})"
    )
    if record.get("profile"):
        profile = record["profile"]
        rows, threshold = profile["rows"], profile["threshold"]
        line += f"; input profiles of {rows:,} of those images, threshold {threshold:.3f}"
        if profile.get("joint"):
            line += f"; joint threshold {profile['joint']['threshold']:.3f} (texture and profile together)"
        if "min_detail" in profile:
            line += "; an image with less detail than any training image (enlarged) is not recognised"
    if record.get("min_side"):
        line += f"; an image under {record['min_side']} px on its shorter side is not recognised"
    if "colour_share" in record:
        line += f"; {record['colour_share']:.0%} of training images in colour"
    return "\n".join([line, *(f"WARNING: {warning}" for warning in record.get("warnings") or ())])
