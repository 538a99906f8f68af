"""The accuracy gate an INT8 model must pass before it is written beside the fp32 one.

It compares the two models on the validation images: ROC AUC may drop by at most AUC_TOLERANCE (0.005)
and the verdicts (with the model's own thresholds) must agree on at least MIN_AGREEMENT (99%) of
images. A model with an `embedding` output must also keep it: the mean cosine similarity of the fp32
and INT8 embeddings of the same image must be at least EMBEDDING_MIN_COSINE (0.98), and the gate reports
the worst image's and how often each image's nearest other image (by cosine) stays the same; with a
novelty gate, how often both models recognise an image alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from verity.inference.engine import OnnxEngine, Prediction
from verity.inference.open_set import NoveltyGate

AUC_TOLERANCE = 0.005
MIN_AGREEMENT = 0.99
EMBEDDING_MIN_COSINE = 0.98


class QuantizationError(RuntimeError):
    """Quantization could not run (no usable validation images, a graph onnxruntime cannot quantize)."""


def _predict_all(engine: OnnxEngine, inputs: np.ndarray, batch_size: int = 32) -> list[Prediction]:
    predictions = []
    for start in range(0, len(inputs), batch_size):
        predictions.extend(engine.predict(inputs[start : start + batch_size]))
    return predictions


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine similarity of two models' embeddings of the same images (rows, L2-normalised), and the
    share of images whose nearest other image is the same under both (the identity kNN relies on)."""
    cosine = np.sum(reference.astype(np.float64) * candidate, axis=1)
    result = {"embedding_cosine_mean": float(cosine.mean()), "embedding_cosine_min": float(cosine.min())}
    nearest = []
    for embeddings in (reference, candidate):
        similarity = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
        np.fill_diagonal(similarity, -np.inf)  # an image's nearest other image, not itself
        nearest.append(similarity.argmax(axis=1))
    return {**result, "embedding_nn_agreement": float(np.mean(nearest[0] == nearest[1]))}


def accuracy_gate(
    reference: OnnxEngine,
    candidate: OnnxEngine,
    inputs: np.ndarray,
    targets: np.ndarray,
    auc_tolerance: float = AUC_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """ROC AUC of both models and their verdict agreement on the same inputs; `passed` applies the rule."""
    from verity.training.metrics import roc_auc

    ref, new = _predict_all(reference, inputs), _predict_all(candidate, inputs)
    ref_scores, new_scores = np.array([p.score for p in ref]), np.array([p.score for p in new])
    auc_ref, auc_new = roc_auc(ref_scores, targets), roc_auc(new_scores, targets)
    # The classifier's verdicts: the novelty gate is judged on its own (recognised_agreement).
    ref_verdicts = [reference.thresholds.verdict(p.score) for p in ref]
    new_verdicts = [candidate.thresholds.verdict(p.score) for p in new]
    agreement = float(np.mean([a == b for a, b in zip(ref_verdicts, new_verdicts, strict=True)]))
    reasons = []
    if auc_ref is None or auc_new is None:
        reasons.append("ROC AUC needs both genuine and counterfeit images in the validation set")
        auc_drop = None
    else:
        auc_drop = float(auc_ref - auc_new)
        if auc_drop > auc_tolerance:
            reasons.append(f"ROC AUC drops by {auc_drop:.4f} > {auc_tolerance:g}")
    if agreement < min_agreement:
        reasons.append(f"verdict agreement {agreement:.2%} < {min_agreement:.0%}")
    embedding = _embedding_gate(ref, new, reference.novelty_gate, candidate.novelty_gate)
    if embedding and embedding["embedding_cosine_mean"] < EMBEDDING_MIN_COSINE:
        reasons.append(
            f"embedding cosine similarity {embedding['embedding_cosine_mean']:.4f} < {EMBEDDING_MIN_COSINE:g}"
        )
    # The novelty gate's distances are small (a few thousandths for in-distribution images), so INT8
    # noise in the embedding can flip recognised where the classifier's verdicts all agree.
    recognised = embedding.get("recognised_agreement")
    if recognised is not None and recognised < min_agreement:
        reasons.append(f"recognised agreement {recognised:.2%} < {min_agreement:.0%}")
    return {
        "passed": not reasons,
        "reasons": reasons,
        "images": int(len(inputs)),
        "auc_fp32": auc_ref,
        "auc_int8": auc_new,
        "auc_drop": auc_drop,
        "auc_tolerance": auc_tolerance,
        "verdict_agreement": agreement,
        "min_agreement": min_agreement,
        "max_abs_score_diff": float(np.abs(ref_scores - new_scores).max()),
        **embedding,
    }


def _embedding_gate(
    reference: list[Prediction],
    candidate: list[Prediction],
    reference_gate: NoveltyGate | None,
    candidate_gate: NoveltyGate | None,
) -> dict[str, float]:
    """`embedding_agreement` with its floor, or nothing when the models have no embedding output."""
    if reference[0].embedding is None:
        return {}
    if candidate[0].embedding is None:
        raise QuantizationError("The INT8 model lost the fp32 model's embedding output.")
    agreement = embedding_agreement(
        np.stack([p.embedding for p in reference if p.embedding is not None]),
        np.stack([p.embedding for p in candidate if p.embedding is not None]),
    )
    if reference_gate is not None and candidate_gate is not None:  # how often INT8 recognises alike
        agreement["recognised_agreement"] = float(
            np.mean(_recognised(reference, reference_gate) == _recognised(candidate, candidate_gate))
        )
    return {**agreement, "embedding_min_cosine": EMBEDDING_MIN_COSINE}


def _recognised(predictions: list[Prediction], gate: NoveltyGate) -> np.ndarray:
    """Whether each image is within the gate by novelty (as `inference.pipeline.judge` tests it)."""
    distances = gate.novelty(np.stack([p.embedding for p in predictions if p.embedding is not None]))
    return np.array([gate.recognised(float(d)) for d in distances])
