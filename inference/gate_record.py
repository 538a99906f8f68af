"""The card's `novelty` record: how export sets the gate from the training and validation images (the
training envelope's size, the novelty threshold for a stated rate, the record itself), and how a model
that loads reads it back into a `NoveltyGate` with its bank and input profiles. What the gate does with an
image is `inference.open_set`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.bank import BANK_FILE, DEFAULT_K, BankError, ReferenceBank, load_bank
from verity.inference.card import ModelCard
from verity.inference.input_profile import PROFILE_FILE, ProfileBank, ProfileError, load_profiles
from verity.inference.open_set import NoveltyGate, OpenSetError

# The share of in-distribution validation images the gate may flag, unless a run asks otherwise.
DEFAULT_NOVELTY_RATE = 0.01


# How a gate-size warning begins: a card rebuilt with another gate drops the warning of the one before.
GATE_SIZE_WARNING = "the novelty gate's threshold was chosen on"


def gate_size_warnings(val_images: int, share: float, val_cases: int | None = None) -> list[str]:
    """A warning when the embedding's threshold had fewer validation images than its share of the rate
    needs (1 / share): it is then their largest novelty, and an ordinary image lies beyond the largest of
    n ordinary images 1 time in n + 1, whatever the stated rate (the 32 validation images of the GDXray
    fish bones: 3.0%, where half of 1% was asked). Images of one case (a scan, its crops and patches) lie
    together and count nearer one draw than several, so with `val_cases` fewer than the images the rate is
    the cases' (the synthetic console set's 75 validation images of 25 cases: up to 1 in 26, 3.8%; 3.2%
    measured on 2,000 fresh images). None for a split large enough, or an empty one."""
    needed = math.ceil(1.0 / share - 1e-9)
    if not 0 < val_images < needed:
        return []
    draws = val_images if val_cases is None else max(1, min(val_cases, val_images))
    counted = f"{val_images} validation images" + (f" of {draws} cases" if draws < val_images else "")
    return [
        f"{GATE_SIZE_WARNING} {counted}, fewer than the {needed} (1 / {share:g}) its share of the rate "
        f"needs: it is their largest novelty, so an ordinary image lies beyond it up to 1 time in "
        f"{draws + 1} ({100 / (draws + 1):.1f}%; less with the validation images in the bank), not 1 in "
        f"{needed}, and more ordinary images are answered 'not recognised' than the card's rate says. Add "
        "images to the validation split (or raise --val-fraction)."
    ]


def with_gate_warnings(warnings: tuple[str, ...] | None, record: dict[str, Any]) -> tuple[str, ...] | None:
    """A card's warnings with the gate record's own (`gate_size_warnings`) in place of any earlier gate's;
    None stays None (a card written before cards carried warnings) when there is nothing to add."""
    added = tuple(record.get("warnings") or ())
    if warnings is None and not added:
        return None
    kept = tuple(warning for warning in warnings or () if not warning.startswith(GATE_SIZE_WARNING))
    return kept + added


def card_with_gate(card: ModelCard, record: dict[str, Any] | None) -> ModelCard:
    """The card with this gate's record (None: no gate) and its warnings in place of any earlier gate's."""
    if record is None:
        return replace(card, novelty=None)
    return replace(card, novelty=record, warnings=with_gate_warnings(card.warnings, record))


def envelope_side(training_sides: np.ndarray | list[int], image_size: int) -> int:
    """The training envelope's `min_side`: the smallest training image's shorter side, capped at the
    model's input size (an image as large as the input is never too small: the model resizes it)."""
    sides = np.asarray(training_sides)
    if sides.size == 0:
        raise OpenSetError("No training images to take the envelope's size from.")
    return int(min(int(sides.min()), image_size))


def choose_novelty_threshold(val_novelty: np.ndarray, rate: float = DEFAULT_NOVELTY_RATE) -> float:
    """The smallest distance that flags at most `rate` of these in-distribution validation images
    (a distance above it is not recognised)."""
    values = np.sort(np.asarray(val_novelty, dtype=np.float64))
    if values.size == 0:
        raise OpenSetError("No validation embeddings to choose a novelty threshold on.")
    if not 0.0 < rate < 1.0:
        raise OpenSetError(f"The novelty rate must lie between 0 and 1, got {rate}.")
    allowed = math.floor(rate * values.size)  # images that may lie above the threshold
    return float(values[values.size - 1 - allowed])


def novelty_record(
    threshold: float,
    rate: float,
    val_novelty: np.ndarray,
    bank: ReferenceBank,
    k: int = DEFAULT_K,
    *,
    min_side: int | None = None,
    val_sides: np.ndarray | None = None,
    profile: dict[str, Any] | None = None,
    colour_share: float | None = None,
    val_flagged: np.ndarray | None = None,
) -> dict[str, Any]:
    """The card's `novelty` entry: how the gate was set, and how it did on the images it was set on.
    val_rate counts every rule: beyond the threshold, under the envelope's `min_side`, and what
    `val_flagged` adds (the profile's and the colour rule's flags, by image)."""
    val = np.asarray(val_novelty, dtype=np.float64)
    flagged = val > threshold
    if min_side is not None and val_sides is not None:
        flagged = flagged | (np.asarray(val_sides) < min_side)
    if val_flagged is not None:
        flagged = flagged | np.asarray(val_flagged, dtype=bool)
    record: dict[str, Any] = {
        "threshold": float(threshold),
        "k": int(k),
        "target_rate": float(rate),
        "val_rate": float(np.mean(flagged)),
        "val_images": int(val.size),
        "bank_file": BANK_FILE,
        "bank_rows": len(bank),
        "bank_total": int(bank.provenance.get("total", len(bank))),  # training images before subsampling
        "max_references": int(bank.provenance.get("max_references", len(bank))),
    }
    if "validation_rows" in bank.provenance:  # validation images joined after the thresholds were chosen
        record["bank_validation_rows"] = int(bank.provenance["validation_rows"])
    if min_side is not None:
        record["min_side"] = int(min_side)
    if profile is not None:
        record["profile"] = profile
    if colour_share is not None:
        record["colour_share"] = float(colour_share)
    return record


def load_novelty_gate(card: ModelCard, model_dir: Path) -> NoveltyGate | None:
    """The gate the card describes, with its bank read from `model_dir`; None for a card without one.

    A card that names a gate whose bank is missing or does not fit the model raises OpenSetError: such a
    model must not serve silently without the check its card promises."""
    record = card.novelty
    if record is None:
        return None
    path = model_dir / str(record.get("bank_file", BANK_FILE))
    try:
        bank = load_bank(path)
    except BankError as error:
        message = f"The card of {card.name} {card.version} has a novelty gate but {error}"
        raise OpenSetError(message) from error
    if card.embedding_dim is not None and bank.dim != card.embedding_dim:
        raise OpenSetError(
            f"{path} holds {bank.dim}-wide embeddings; the model's are {card.embedding_dim} wide."
        )
    min_side, profile = record.get("min_side"), record.get("profile")
    profiles = None
    if profile is not None:
        try:
            profiles = load_profiles(model_dir / str(profile.get("file", PROFILE_FILE)))
        except ProfileError as error:
            message = f"The card of {card.name} {card.version} has a profile gate but {error}"
            raise OpenSetError(message) from error
    colour_share = record.get("colour_share")
    return NoveltyGate(
        bank,
        float(record["threshold"]),
        int(record.get("k", DEFAULT_K)),
        None if min_side is None else int(min_side),
        profiles,
        None if profile is None else float(profile["threshold"]),
        None if colour_share is None else float(colour_share),
        None if profile is None or profile.get("min_detail") is None else float(profile["min_detail"]),
        card.spec.image_size,
        _joint_threshold(card, profile, profiles, len(bank)),
    )


def _joint_threshold(
    card: ModelCard, record: dict[str, Any] | None, profiles: ProfileBank | None, bank_size: int
) -> float | None:
    """The joint rule's threshold, when the card records one; its profiles must name rows of the bank."""
    joint = None if record is None else record.get("joint")
    if joint is None:
        return None
    rows = None if profiles is None else profiles.bank_rows
    if rows is None or len(rows) == 0 or rows.min() < 0 or rows.max() >= bank_size:
        raise OpenSetError(f"The card of {card.name} {card.version} has a joint rule but its profiles "
                           f"do not name rows of its bank of {bank_size}.")  # fmt: skip
    return float(joint["threshold"])
