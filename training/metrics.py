"""Evaluation figures a reviewer can re-derive: plain numpy, ties handled explicitly.

Conventions: `scores` are calibrated P(counterfeit); `targets` are 0 (genuine) or 1 (counterfeit).
* ROC AUC is the Mann-Whitney statistic with average ranks, so a tie between a genuine and a
  counterfeit score counts one half (the probability a random counterfeit outscores a random genuine).
* PR AUC is average precision: sum over distinct thresholds of (recall step) x precision, with tied
  scores forming one threshold (as scikit-learn's `average_precision_score`).
* Recall at a false-alarm rate: the best recall of any threshold whose false-alarm rate is at or below it.
* ECE: scores in equal-width bins; the mean |observed counterfeit share - mean score| weighted by bin size.
* Verdict figures use the served rule (counterfeit >= alarm, genuine <= clear, uncertain between).
* 95% intervals of ROC AUC and of recall at each false-alarm rate: percentile bootstrap, resampling the
  genuine and the counterfeit scores separately (each resample keeps both classes and the class sizes),
  BOOTSTRAP_RESAMPLES resamples from a fixed seed, so the same scores always give the same interval.
Figures that a split cannot support (AUC with one class) are None, never a made-up number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from verity.inference.vocabulary import LABELS, UNCERTAIN, VERDICTS, verdict_codes

FALSE_ALARM_RATES = (0.001, 0.01, 0.05)
ECE_BINS = 10
DEFAULT_THRESHOLD = 0.5
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Resamples are processed in chunks of about this many matrix cells, so memory stays in the tens of MB
# for any test set size.
_BOOTSTRAP_CELLS = 2_000_000


def _arrays(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if scores.shape != targets.shape:
        raise ValueError(f"Need one target per score: {scores.size} scores, {targets.size} targets.")
    if not np.isfinite(scores).all():
        raise ValueError("Scores contain NaN or infinity.")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("Targets must be 0 (genuine) or 1 (counterfeit).")
    return scores, targets


def _both_classes(targets: np.ndarray) -> bool:
    return bool(targets.any() and not targets.all())


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Rank of a tie group = (first position + last position) / 2, 1-based.
    ends = np.cumsum(counts)
    starts = ends - counts + 1
    return ((starts + ends) / 2.0)[inverse]


def roc_auc(scores: Any, targets: Any) -> float | None:
    """Area under the ROC curve (ties count one half); None when only one class is present."""
    scores, targets = _arrays(scores, targets)
    if not _both_classes(targets):
        return None
    ranks = average_ranks(scores)
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    rank_sum = float(ranks[targets == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _threshold_counts(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t, descending: counterfeits and genuine scored >= t (tied scores grouped)."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_targets = scores[order], targets[order]
    # The last index of each run of equal scores is where a threshold at that score takes effect.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    true_pos = np.cumsum(sorted_targets)[last]
    false_pos = (last + 1) - true_pos
    return sorted_scores[last], true_pos.astype(np.float64), false_pos.astype(np.float64)


def roc_curve(scores: Any, targets: Any) -> dict[str, list[float]]:
    """False-alarm rate (fpr) and recall (tpr) per distinct threshold, from (0, 0) to (1, 1)."""
    scores, targets = _arrays(scores, targets)
    if not _both_classes(targets):
        raise ValueError("A ROC curve needs both genuine and counterfeit examples.")
    thresholds, true_pos, false_pos = _threshold_counts(scores, targets)
    tpr = np.r_[0.0, true_pos / targets.sum()]
    fpr = np.r_[0.0, false_pos / (len(targets) - targets.sum())]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [float("inf"), *thresholds.tolist()]}


def precision_recall_curve(scores: Any, targets: Any) -> dict[str, list[float]]:
    """Precision and recall per distinct threshold, highest threshold first (recall rising)."""
    scores, targets = _arrays(scores, targets)
    if not targets.any():
        raise ValueError("A precision-recall curve needs counterfeit examples.")
    thresholds, true_pos, false_pos = _threshold_counts(scores, targets)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / targets.sum()
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thresholds.tolist()}


def average_precision(scores: Any, targets: Any) -> float | None:
    """PR AUC as average precision: sum of (recall step) x precision; None without counterfeits."""
    scores, targets = _arrays(scores, targets)
    if not targets.any():
        return None
    curve = precision_recall_curve(scores, targets)
    recall = np.r_[0.0, curve["recall"]]
    return float(np.sum(np.diff(recall) * np.asarray(curve["precision"])))


def recall_at_false_alarm_rate(scores: Any, targets: Any, rate: float) -> dict[str, float | None]:
    """Best recall of a threshold whose false-alarm rate is <= `rate`, with that threshold.

    Validation sets with fewer than 1/rate genuine images can only meet the rate with no false alarm
    at all; `achieved_false_alarm_rate` shows what the chosen threshold really gives.
    """
    scores, targets = _arrays(scores, targets)
    if not _both_classes(targets):
        return {"recall": None, "threshold": None, "achieved_false_alarm_rate": None}
    curve = roc_curve(scores, targets)
    fpr, tpr = np.asarray(curve["fpr"]), np.asarray(curve["tpr"])
    allowed = np.nonzero(fpr <= rate + 1e-12)[0]
    best = allowed[np.argmax(tpr[allowed])]  # fpr and tpr both rise, so this is the last allowed point
    threshold = curve["thresholds"][best]
    return {
        "recall": float(tpr[best]),
        "threshold": None if np.isinf(threshold) else float(threshold),
        "achieved_false_alarm_rate": float(fpr[best]),
    }


def _resampled_counts(
    codes: np.ndarray, n_values: int, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(resamples, n_values) counts: how often each distinct score is drawn in each bootstrap resample.

    `codes` are the class's scores as indices into the sorted distinct scores; each resample draws
    len(codes) of them with replacement. Counting per distinct score (one bincount) replaces a sort per
    resample, which keeps 1000 resamples of thousands of scores well under a second.
    """
    draws = codes[rng.integers(0, len(codes), size=(resamples, len(codes)))]
    flat = (np.arange(resamples)[:, None] * n_values + draws).ravel()
    return np.bincount(flat, minlength=resamples * n_values).reshape(resamples, n_values).astype(np.float64)


def _resample_statistics(
    pos: np.ndarray, neg: np.ndarray, rates: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and recall at each rate for resamples given as counts per distinct score (ascending).

    Same definitions as `roc_auc` and `recall_at_false_alarm_rate`: a genuine tied with a counterfeit
    counts one half; recall is the best of any threshold whose false-alarm rate is <= the rate.
    """
    n_pos, n_neg = pos[0].sum(), neg[0].sum()
    below = np.cumsum(neg, axis=1) - neg  # genuine strictly below each distinct score
    auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    # Thresholds at each distinct score, highest first: counts scored at or above it.
    true_pos = np.cumsum(pos[:, ::-1], axis=1)
    false_pos = np.cumsum(neg[:, ::-1], axis=1)
    recalls = np.stack(
        [np.where(false_pos <= (rate + 1e-12) * n_neg, true_pos, 0.0).max(axis=1) / n_pos for rate in rates],
        axis=1,
    )
    return auc, recalls


def bootstrap_intervals(
    scores: Any,
    targets: Any,
    rates: Sequence[float] = FALSE_ALARM_RATES,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, Any] | None:
    """Percentile-bootstrap intervals of ROC AUC and of recall at each false-alarm rate.

    Resampling is stratified by label: genuine and counterfeit scores are each resampled with
    replacement to their own count, so every resample has both classes and the test set's class
    balance. Returns {"roc_auc": [lo, hi], "recall": {"0.01": [lo, hi], ...}}, or None when a class
    is missing or `resamples` is 0.
    """
    scores, targets = _arrays(scores, targets)
    if not _both_classes(targets) or resamples < 1:
        return None
    distinct, codes = np.unique(scores, return_inverse=True)
    pos_codes, neg_codes = codes[targets == 1], codes[targets == 0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // max(len(distinct), len(targets)))
    aucs, recalls = [], []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        pos = _resampled_counts(pos_codes, len(distinct), size, rng)
        neg = _resampled_counts(neg_codes, len(distinct), size, rng)
        auc, recall = _resample_statistics(pos, neg, rates)
        aucs.append(auc)
        recalls.append(recall)
    tails = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    auc_interval = np.percentile(np.concatenate(aucs), tails)
    recall_intervals = np.percentile(np.concatenate(recalls), tails, axis=0)
    return {
        "roc_auc": [float(v) for v in auc_interval],
        "recall": {f"{rate:g}": [float(v) for v in recall_intervals[:, i]] for i, rate in enumerate(rates)},
    }


def reliability_bins(scores: Any, targets: Any, n_bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width score bins with count, mean score and observed counterfeit share (empty bins kept)."""
    scores, targets = _arrays(scores, targets)
    # Bin i holds [i/n, (i+1)/n); a score of exactly 1.0 goes to the last bin.
    index = np.clip((scores * n_bins).astype(np.int64), 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins.append(
            {
                "low": i / n_bins,
                "high": (i + 1) / n_bins,
                "count": count,
                "mean_score": float(scores[members].mean()) if count else None,
                "fraction_counterfeit": float(targets[members].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(scores: Any, targets: Any, n_bins: int = ECE_BINS) -> float | None:
    """ECE of P(counterfeit): sum over bins of (bin share) x |observed share - mean score|."""
    scores, targets = _arrays(scores, targets)
    if scores.size == 0:
        return None
    total = 0.0
    for bin_ in reliability_bins(scores, targets, n_bins):
        if bin_["count"]:
            gap = abs(bin_["fraction_counterfeit"] - bin_["mean_score"])
            total += bin_["count"] / scores.size * gap
    return float(total)


def verdict_figures(scores: Any, targets: Any, alarm: float, clear: float) -> dict[str, Any]:
    """Confusion matrix (true label x verdict) and the rates a station lives with, at the thresholds.

    accuracy: share of all images given the correct definite verdict (uncertain counts as not correct);
    accuracy_decided: the same among images that got a definite verdict.
    """
    scores, targets = _arrays(scores, targets)
    codes = verdict_codes(scores, alarm, clear)
    # Columns in VERDICTS order: genuine 0, counterfeit 1, uncertain 2 (its code is -1).
    columns = np.where(codes == UNCERTAIN, VERDICTS.index("uncertain"), codes)
    matrix = np.zeros((len(LABELS), len(VERDICTS)), dtype=np.int64)
    np.add.at(matrix, (targets, columns), 1)
    decided = int(matrix[:, :2].sum())
    correct = int(matrix[0, 0] + matrix[1, 1])
    n_genuine, n_counterfeit = int(matrix[0].sum()), int(matrix[1].sum())
    return {
        "alarm": float(alarm),
        "clear": float(clear),
        "confusion_matrix": {
            "rows": list(LABELS),
            "columns": list(VERDICTS),
            "counts": matrix.tolist(),
        },
        "accuracy": correct / len(targets) if len(targets) else None,
        "accuracy_decided": correct / decided if decided else None,
        "uncertain_rate": float(matrix[:, 2].sum() / len(targets)) if len(targets) else None,
        "false_alarm_rate": float(matrix[0, 1] / n_genuine) if n_genuine else None,
        "miss_rate": float(matrix[1, 0] / n_counterfeit) if n_counterfeit else None,
        "verdicts": dict(zip(VERDICTS, matrix.sum(axis=0).tolist(), strict=True)),
    }


def _summary(scores: np.ndarray, targets: np.ndarray, alarm: float, clear: float) -> dict[str, Any]:
    return {
        "n": int(len(targets)),
        "n_genuine": int((targets == 0).sum()),
        "n_counterfeit": int(targets.sum()),
        "roc_auc": roc_auc(scores, targets),
        "pr_auc": average_precision(scores, targets),
        **verdict_figures(scores, targets, alarm, clear),
    }


def group_breakdown(
    scores: np.ndarray, targets: np.ndarray, values: Sequence[Any], alarm: float, clear: float
) -> dict[str, dict[str, Any]]:
    """Per value of one grouping (e.g. product): counts, AUCs and verdict figures; missing -> "unknown"."""
    if len(values) != len(targets):
        raise ValueError(f"A group has {len(values)} values for {len(targets)} scores.")
    names = np.array(["unknown" if value is None else str(value) for value in values], dtype=object)
    result = {}
    for name in sorted(set(names.tolist())):
        members = names == name
        figures = _summary(scores[members], targets[members], alarm, clear)
        figures.pop("confusion_matrix")
        result[name] = figures
    return result


def compute_metrics(
    scores: Any,
    targets: Any,
    groups: Mapping[str, Sequence[Any]] | None = None,
    thresholds: dict[str, Any] | None = None,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """Every evaluation figure as plain JSON types.

    `thresholds` is the card's dict ({"alarm", "clear", ...}); without it, one threshold at 0.5 is used
    and "operating_point" says so. `groups` maps a grouping name (product, modality...) to one value per
    score; each gets a breakdown. `roc_auc_ci` and each recall's `recall_ci` are 95% bootstrap
    intervals (`bootstrap_intervals`; None with one class, or with `bootstrap_resamples` 0).
    """
    scores, targets = _arrays(scores, targets)
    if scores.size == 0:
        raise ValueError("No scores to evaluate.")
    if thresholds is None:
        alarm = clear = DEFAULT_THRESHOLD
        operating_point = f"single threshold {DEFAULT_THRESHOLD} (no thresholds given)"
    else:
        alarm, clear = float(thresholds["alarm"]), float(thresholds["clear"])
        operating_point = "model thresholds"
    intervals = bootstrap_intervals(scores, targets, FALSE_ALARM_RATES, bootstrap_resamples)
    recall = {
        f"{rate:g}": {
            **recall_at_false_alarm_rate(scores, targets, rate),
            "recall_ci": intervals["recall"][f"{rate:g}"] if intervals else None,
        }
        for rate in FALSE_ALARM_RATES
    }
    metrics = {
        **_summary(scores, targets, alarm, clear),
        "roc_auc_ci": intervals["roc_auc"] if intervals else None,
        "operating_point": operating_point,
        "recall_at_false_alarm_rate": recall,
        "bootstrap": {
            "method": "percentile bootstrap, resampled within each label",
            "confidence": CONFIDENCE,
            "resamples": bootstrap_resamples,
            "seed": BOOTSTRAP_SEED,
        },
        "ece": expected_calibration_error(scores, targets),
        "ece_bins": ECE_BINS,
        "mean_score": float(scores.mean()),
    }
    metrics["groups"] = {
        name: group_breakdown(scores, targets, values, alarm, clear)
        for name, values in (groups or {}).items()
    }
    if thresholds is not None:  # what the thresholds' validation predicted for this set's size
        from verity.training.calibrate import predicted_rates

        metrics["predicted_from_validation"] = predicted_rates(
            thresholds, metrics["n_genuine"], metrics["n_counterfeit"]
        )
    return metrics
