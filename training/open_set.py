"""The "not recognised" gate of an exported model: its reference bank and novelty threshold.

After export, the training split is embedded through the server's own engine and decoder (the scoring
path of `verity eval`), subsampled into bank.npz beside model.onnx, and the validation split's novelty
against that bank sets the threshold for a stated rate of in-distribution images flagged
(`inference.open_set.choose_novelty_threshold`). The card, in the ONNX metadata and card.json, then
records the gate; the served model loads it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.bank import BANK_FILE, DEFAULT_K, MAX_REFERENCES, build_bank, novelty, save_bank
from verity.inference.card import ModelCard
from verity.inference.engine import METADATA_CARD_KEY
from verity.inference.open_set import (
    DEFAULT_NOVELTY_RATE,
    choose_novelty_threshold,
    envelope_side,
    novelty_record,
)
from verity.inference.vocabulary import LABELS
from verity.training.eval_samples import Sample, load_samples, split_params_for
from verity.training.scoring import OnnxScorer, score_samples


@dataclass(frozen=True)
class EmbeddedSplit:
    embeddings: np.ndarray  # N x D, as served
    samples: list[Sample]  # the images they belong to
    shorter_sides: np.ndarray  # N, each decoded image's shorter side in pixels


def embed_split(scorer: OnnxScorer, data: str | Path, split: str, progress: bool = False) -> EmbeddedSplit:
    """The embeddings of one split of `data`, with their samples and sizes."""
    params = split_params_for(scorer.path)
    loaded = load_samples(data, split, scorer.spec.modality, params)
    scored = score_samples(scorer, loaded.samples, progress=progress)
    if scored.embeddings is None:
        raise ValueError(f"{scorer.path} has no embedding output: export it again with this version.")
    assert scored.shorter_sides is not None  # score_samples always measures them
    samples = [loaded.samples[i] for i in scored.indices]
    return EmbeddedSplit(scored.embeddings, samples, scored.shorter_sides)


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
    """Writes bank.npz beside `onnx_path` from the training split of `data`, chooses the novelty
    threshold on its validation split, takes the training envelope's size from the training images
    (`open_set.envelope_side`), and records all in the model's card. Returns the record."""
    onnx_path = Path(onnx_path)
    scorer = OnnxScorer(onnx_path)
    train = embed_split(scorer, data, "train", progress)
    val = embed_split(scorer, data, "val", progress)
    card = scorer.engine.card
    bank = build_bank(
        train.embeddings,
        [LABELS[s.target] for s in train.samples],
        [s.product or "" for s in train.samples],
        {"model": card.name, "version": card.version, "data": str(data), "split": "train"},
        max_references=max_references,
        seed=seed,
    )
    save_bank(bank, onnx_path.with_name(BANK_FILE))
    val_novelty = novelty(val.embeddings, bank, min(k, len(bank)))
    threshold = choose_novelty_threshold(val_novelty, rate)
    min_side = envelope_side(train.shorter_sides, scorer.spec.image_size)
    record = novelty_record(
        threshold, rate, val_novelty, bank, k, min_side=min_side, val_sides=val.shorter_sides
    )
    rewrite_card(onnx_path, replace(card, novelty=record))
    return record


def describe(record: dict[str, Any]) -> str:
    """One line for `verity export` and `verity train`."""
    line = (
        f"novelty gate: bank of {record['bank_rows']:,} training images ({record['bank_file']}), "
        f"threshold {record['threshold']:.4f} flags {record['val_rate']:.2%} of {record['val_images']} "
        f"validation images (target {record['target_rate']:.0%})"
    )
    if record.get("min_side"):
        line += f"; an image under {record['min_side']} px on its shorter side is not recognised"
    return line
