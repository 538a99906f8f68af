"""Verity's vocabulary, defined once: labels, modalities, splits, verdicts, the length of a name, the
split defaults and the verdict rule.

Data, training, evaluation and serving all import these names from here, so a manifest, a model card and
an API answer can never disagree on what a label or a verdict is called. It lives in `inference` because
that is the one package every other one may import (`api` may import nothing else).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# A label's index is the class index of the model's logits and a row's target; the score is the
# calibrated probability of LABELS[1].
LABELS = ("genuine", "counterfeit")
COUNTERFEIT = LABELS[1]  # the label (and the verdict) that raises an alarm and a seizure alert
# What an officer may confirm about a verdict (POST /v1/feedback): a label, or "unsure" (cannot tell),
# which is recorded and shown but never becomes training data (api.feedback.export_confirmed).
FEEDBACK_LABELS = (*LABELS, "unsure")
UNSURE = "unsure"
MODALITIES = ("photo", "xray")
SPLITS = ("train", "val", "test")
# The answers the service gives. A verdict code indexes this tuple: 0 genuine and 1 counterfeit (the
# label index, so code == target means right), UNCERTAIN (-1) the last entry.
VERDICTS = ("genuine", "counterfeit", "uncertain")
UNCERTAIN = -1
# Why a verdict is what it is (`reasons` of every answer; inference.open_set.open_set_verdict): which
# checks alarmed for a counterfeit, why the service abstained for an uncertain, none for a genuine.
# A `not_recognised` answer also names its cause, one an officer can act on: the image is unlike any
# training image (inspect it), smaller than any (send the whole scan or a closer photo), another kind of
# image than the model's modality (a colour photo sent as X-ray, an X-ray sent as photo: send it to the
# right model), or another scanner's colour scheme than training (export it as the model's was trained).
NOT_RECOGNISED_CAUSES = (
    "unlike_training", "smaller_than_training", "other_modality", "other_colour_scheme",
)  # fmt: skip
REASONS = (
    "classifier", "reference_mismatch", "not_recognised", *NOT_RECOGNISED_CAUSES, "classifier_uncertain",
)  # fmt: skip
# The product reference check's outcome: near enough the product's genuine references, too far, or no
# answer because the product has fewer references than its calibration needs.
REFERENCE_STATUSES = ("match", "mismatch", "abstained")

# The most characters of a product or model name. A name becomes a folder of the reference store, a field
# of every audit row and listing, and a form or query field of the API: the store's patterns
# (inference.references) and the API's max_length are all this one number.
NAME_MAX = 64

# How rows without a split are split (grouped by case or product, stratified by label). Ingest, training
# and evaluation must share them: if evaluation re-split differently from training, test images would
# have been trained on.
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
DEFAULT_SPLIT_SEED = 0


class NonFiniteScore(ValueError):
    """A score that is NaN or infinite: no verdict may be given on it, nor recorded (a NaN compares
    false with both thresholds, so the rule alone would call it uncertain)."""

    def __init__(self, score: float) -> None:
        super().__init__(f"The model gave the score {score!r}; only a finite score has a verdict.")
        self.score = score


def finite_score(score: float) -> float:
    """The score as a float, or NonFiniteScore: what serving checks before the verdict rule."""
    value = float(score)
    if not math.isfinite(value):
        raise NonFiniteScore(value)
    return value


def verdict_codes(scores: Any, alarm: float, clear: float) -> np.ndarray:
    """Verdict codes per score: 1 counterfeit (score >= alarm), 0 genuine (score <= clear), UNCERTAIN
    between. Alarm is checked first, so with alarm == clear a score at the threshold is counterfeit."""
    scores = np.asarray(scores, dtype=np.float64)
    codes = np.full(scores.shape, UNCERTAIN, dtype=np.int64)
    codes[scores <= clear] = 0
    codes[scores >= alarm] = 1
    return codes


def verdict_names(codes: Any) -> list[str]:
    """The VERDICTS name of each code, e.g. [1, -1] -> ["counterfeit", "uncertain"]."""
    return [VERDICTS[int(code)] for code in np.asarray(codes).reshape(-1)]
