"""Calibration and decision thresholds, both fit on validation data.

* `fit_temperature`: one scalar T that minimises the negative log-likelihood of softmax(logits / T)
  on validation (Guo et al., 2017). It changes no ranking, so ROC AUC is untouched; it makes the
  score an honest probability.
* `choose_thresholds`: the alarm threshold (counterfeit at or above) for a target false-alarm rate and
  the clear threshold (genuine at or below) for a target miss rate; scores between answer `uncertain`.

Both refuse, with a reason, to work from data that cannot support them: a threshold chosen without a
single counterfeit in validation would be a number with nothing behind it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from verity.datasets.split import group_key
from verity.inference.vocabulary import LABELS, UNCERTAIN, verdict_codes

# Bounds for T. A model that separates validation perfectly drives the NLL optimum to T -> 0; we stop
# at a bound instead of returning a temperature that turns every score into exactly 0 or 1.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
CONFIDENCE = 0.95
# With no false alarm among n genuine images the 95% upper bound on the false-alarm rate is about 3/n
# (the "rule of three"), so fewer than 3/target genuine images cannot show the target is met even
# when the model makes no false alarm at all. The same holds for counterfeits and the miss rate.
RULE_OF_THREE = 3.0
# The rate intervals count validation images as independent draws. Images of one case (a batch, a site,
# a capture session) share its conditions, so images of another case can show a rate the validation
# case never did: on magnetic tiles, validation (all of one capture session, 157 genuine) predicted 0-4.5%
# false alarms on 157 test images of another session, which gave 5.7-7.6% for three models in nine. Fewer
# case groups than this among a label's validation images earn a warning (`validation_group_warnings`).
MIN_VALIDATION_GROUPS = 5


class ThresholdError(ValueError):
    """Thresholds cannot be chosen from this validation data; the message says why."""


def _check_logits(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, classes) with at least 2 classes, got {logits.shape}.")
    if logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(
            f"Need as many targets as logit rows (and at least one): {logits.shape[0]} vs {targets.size}."
        )
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity; the model diverged or the inputs are broken.")
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets must be class indices in 0..{logits.shape[1] - 1}.")
    return logits, targets


def temperature_nll(
    logits: np.ndarray, targets: np.ndarray, temperature: float, smoothing: float = 0.0
) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / temperature).

    With `smoothing` eps the target distribution puts 1 - eps on the labelled class and spreads eps over
    the others (cross-entropy against soft targets).
    """
    logits, targets = _check_logits(logits, targets)
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    log_probabilities = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    labelled = log_probabilities[np.arange(len(targets)), targets]
    if not smoothing:
        return float(-np.mean(labelled))
    others = (log_probabilities.sum(axis=1) - labelled) / (logits.shape[1] - 1)
    return float(-np.mean((1.0 - smoothing) * labelled + smoothing * others))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises validation NLL, within [MIN_TEMPERATURE, MAX_TEMPERATURE].

    Targets are smoothed by Laplace's rule of succession, eps = 1 / (n + 2): a model that is right on all
    n validation images is still credited with about that chance of being wrong on the next one. Without
    it a perfectly separated validation set drives T to 0 and every score to exactly 0 or 1; with n in the
    thousands the change to the fitted T is negligible.

    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search over log T finds the
    optimum without gradients or extra dependencies.
    """
    logits, targets = _check_logits(logits, targets)
    smoothing = 1.0 / (len(targets) + 2)
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def nll(log_t: float) -> float:
        return temperature_nll(logits, targets, math.exp(log_t), smoothing)

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-6:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    best = (a + b) / 2.0
    # The optimum may sit on a bound (perfect separation); compare with the bounds explicitly.
    candidates = [(nll(best), best), (nll(low), low), (nll(high), high)]
    return float(math.exp(min(candidates)[1]))


def _check_scores(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if scores.shape != targets.shape:
        raise ThresholdError(f"Need one target per score: {scores.size} scores, {targets.size} targets.")
    if not np.isfinite(scores).all() or scores.min(initial=0.0) < 0.0 or scores.max(initial=0.0) > 1.0:
        raise ThresholdError("Scores must be probabilities in [0, 1] (calibrated P(counterfeit)).")
    if not np.isin(targets, (0, 1)).all():
        raise ThresholdError("Targets must be 0 (genuine) or 1 (counterfeit).")
    counterfeits, genuine = int(targets.sum()), int((targets == 0).sum())
    if counterfeits == 0:
        raise ThresholdError(
            f"Validation holds no counterfeits ({genuine} genuine images): the miss rate cannot be measured, "
            "so no clear threshold can be chosen. Add confirmed counterfeits to the validation split."
        )
    if genuine == 0:
        raise ThresholdError(
            f"Validation holds no genuine images ({counterfeits} counterfeits): the false-alarm rate cannot "
            "be measured, so no alarm threshold can be chosen. Add genuine images to the validation split."
        )
    return scores, targets


def _check_rate(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ThresholdError(f"{name} must lie strictly between 0 and 1, got {value}.")
    return float(value)


def _alarm_threshold(scores: np.ndarray, targets: np.ndarray, rate: float) -> float:
    """Lowest threshold with false-alarm rate (genuine scored >= t) <= rate on validation.

    With k = floor(rate * n_genuine) false alarms allowed, t must lie above the (k+1)-th highest genuine
    score. Every t between that score and the next higher validation score gives the same validation
    figures; we take the middle of that gap so a tiny score drift (float32 ONNX vs torch, a recompressed
    JPEG) does not flip a validation image across the threshold.
    """
    genuine = np.sort(scores[targets == 0])[::-1]
    allowed = int(math.floor(rate * len(genuine) + 1e-9))
    if allowed >= len(genuine):
        return 0.0
    bound = genuine[allowed]
    above = scores[scores > bound]
    upper = float(above.min()) if above.size else 1.0
    return (float(bound) + upper) / 2.0


def _clear_threshold(scores: np.ndarray, targets: np.ndarray, rate: float) -> float:
    """Highest threshold with miss rate (counterfeit scored <= t) <= rate on validation (mirror image)."""
    counterfeits = np.sort(scores[targets == 1])
    allowed = int(math.floor(rate * len(counterfeits) + 1e-9))
    if allowed >= len(counterfeits):
        return 1.0
    bound = counterfeits[allowed]
    below = scores[scores < bound]
    lower = float(below.max()) if below.size else 0.0
    return (float(bound) + lower) / 2.0


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial proportion, e.g. 5 of 100 false alarms.

    The bounds are beta quantiles: lower Beta(a/2; k, n-k+1), upper Beta(1-a/2; k+1, n-k), with the lower
    bound 0 at k = 0 and the upper 1 at k = n. Conservative: it covers at least `confidence` for any n.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"Need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}.")
    from scipy.stats import beta  # imported here: scipy takes a while to load and only cards need it

    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def predicted_rate_interval(
    events: int, trials: int, new_trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Where the rate of `new_trials` new images will lie, given `events` of `trials` on validation: the
    central `confidence` interval of the beta-binomial predictive distribution (a uniform prior on the
    rate, updated by validation, then the new images' own binomial draw).

    Why not the validation rate's Clopper-Pearson interval: that bounds the rate, not what a test set of
    m images shows. It leaves out the test set's own sampling, so 0 false alarms in 157 new images lies
    outside [0.02%, 3.5%] (1 of 157 on validation) although it is the likeliest single outcome. The
    predictive interval holds both draws and is what a test or a new station's rate is compared with."""
    if trials < 1 or new_trials < 1 or not 0 <= events <= trials:
        raise ValueError(f"Need 0 <= events <= trials, trials >= 1 and new_trials >= 1, got {events} of "
                         f"{trials} and {new_trials}.")  # fmt: skip
    from scipy.stats import betabinom  # imported here, as in clopper_pearson

    predictive = betabinom(new_trials, events + 1, trials - events + 1)
    tail = (1.0 - confidence) / 2
    return float(predictive.ppf(tail)) / new_trials, float(predictive.ppf(1.0 - tail)) / new_trials


def predicted_rates(thresholds: dict[str, Any], n_genuine: int, n_counterfeit: int) -> dict[str, Any] | None:
    """What the card's validation predicts for a set of `n_genuine` and `n_counterfeit` images at its
    thresholds (`predicted_rate_interval`); None when the thresholds carry no validation counts."""
    keys = ("val_false_alarms", "n_val_genuine", "val_misses", "n_val_counterfeit")
    if any(thresholds.get(key) is None for key in keys):
        return None
    predicted: dict[str, Any] = {"confidence": CONFIDENCE}
    for rate, events, trials, new in (
        ("false_alarm_rate", "val_false_alarms", "n_val_genuine", n_genuine),
        ("miss_rate", "val_misses", "n_val_counterfeit", n_counterfeit),
    ):
        usable = new >= 1 and thresholds[trials] >= 1
        predicted[rate] = (
            list(predicted_rate_interval(thresholds[events], thresholds[trials], new)) if usable else None
        )
    return predicted


def sample_size_warnings(
    n_genuine: int, n_counterfeit: int, target_false_alarm_rate: float, target_miss_rate: float
) -> list[str]:
    """Warnings when validation is too small to show the target rates are met (see RULE_OF_THREE)."""
    warnings = []
    for n, rate, images, figure, error in (
        (n_genuine, target_false_alarm_rate, "genuine", "false-alarm", "false alarm"),
        (n_counterfeit, target_miss_rate, "counterfeit", "miss", "miss"),
    ):
        needed = math.ceil(RULE_OF_THREE / rate - 1e-9)
        if n >= needed:
            continue
        # One-sided 95% bound (the upper end of a two-sided 90% interval), the one the rule of three
        # approximates: at n = needed it falls just below the target.
        bound = f"{100 * clopper_pearson(0, n, 0.90)[1]:.1f}%" if n else "100%"
        warnings.append(
            f"validation holds {n} {images} images, fewer than the {needed} (3 / {rate:g}) needed to "
            f"show a {figure} rate at or below {100 * rate:g}%: even with no {error} at all its "
            f"one-sided 95% upper bound is {bound}. Add {images} images to the validation split "
            "(or raise --val-fraction)."
        )
    return warnings


def validation_size_warnings(rows: Iterable[Any], config: Any) -> list[str]:
    """`sample_size_warnings` for a training run: manifest rows with splits, and its TrainConfig
    (target_false_alarm_rate, target_miss_rate). Printed when training starts, kept in the card."""
    labels = [row.label for row in rows if row.split == "val"]
    return sample_size_warnings(
        labels.count("genuine"),
        labels.count("counterfeit"),
        float(config.target_false_alarm_rate),
        float(config.target_miss_rate),
    )


def validation_groups(rows: Iterable[Any]) -> dict[str, list[str]]:
    """Each label's case groups among the validation rows (`datasets.split.group_key`, the unit the
    split keeps together), genuine first, each in first-seen order; a label with any row not in a case or
    product is left out, since its images were split one by one."""
    keys: dict[str, list[str]] = {}
    ungrouped: set[str] = set()
    for row in rows:
        if row.split != "val":
            continue
        key = group_key(row)
        if key.startswith("file:"):
            ungrouped.add(row.label)
        elif key not in keys.setdefault(row.label, []):
            keys[row.label].append(key)
    return {label: keys[label] for label in LABELS if label in keys and label not in ungrouped}


def validation_group_warnings(rows: Iterable[Any]) -> list[str]:
    """Warnings when a label's validation images come from fewer than MIN_VALIDATION_GROUPS case groups:
    the card's interval for its rate then speaks for more images of those cases, not for another case."""
    rows = list(rows)
    warnings = []
    for label, groups in validation_groups(rows).items():
        if len(groups) >= MIN_VALIDATION_GROUPS:
            continue
        images = sum(1 for row in rows if row.split == "val" and row.label == label)
        figure = "false-alarm" if label == "genuine" else "miss"
        named = ", ".join(key.replace(":", " ", 1) for key in groups)  # "case exp3", "product phones"
        warnings.append(
            f"validation's {images} {label} images come from {len(groups)} group"
            f"{'' if len(groups) == 1 else 's'} ({named}): the {figure} interval counts them as "
            "independent, so images of another group (a new batch, site or scanner) may show a rate "
            f"outside it. Put images of at least {MIN_VALIDATION_GROUPS} groups in validation (cases, or "
            "products where no case is given)."
        )
    return warnings


def card_warnings(thresholds: dict[str, Any]) -> list[str]:
    """`sample_size_warnings` from a card's thresholds (choose_thresholds' counts and targets); none
    when the thresholds do not carry the validation counts (e.g. written by hand)."""
    keys = ("n_val_genuine", "n_val_counterfeit", "target_false_alarm_rate", "target_miss_rate")
    if any(thresholds.get(key) is None for key in keys):
        return []
    return sample_size_warnings(*(thresholds[key] for key in keys))


def operating_point(scores: Any, targets: Any, alarm: float, clear: float) -> dict[str, float]:
    """False-alarm, miss, uncertain and recall rates of a threshold pair, by the serving verdict rule."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    codes = verdict_codes(scores, alarm, clear)
    genuine, counterfeit = targets == 0, targets == 1

    def share(mask: np.ndarray, within: np.ndarray) -> float:
        return float((mask & within).sum() / within.sum()) if within.any() else float("nan")

    return {
        "false_alarm_rate": share(codes == 1, genuine),
        "miss_rate": share(codes == 0, counterfeit),
        "recall": share(codes == 1, counterfeit),
        "uncertain_rate": float((codes == UNCERTAIN).mean()) if codes.size else float("nan"),
    }


def choose_thresholds(
    scores: Any,
    targets: Any,
    target_false_alarm_rate: float = 0.01,
    target_miss_rate: float = 0.05,
) -> dict[str, Any]:
    """Chooses the alarm and clear thresholds on validation scores; returns the card's "thresholds".

    alarm: the lowest threshold whose validation false-alarm rate is <= the target (most counterfeits
    caught for the false alarms we accept). clear: the highest threshold whose validation miss rate is
    <= the target (most genuine goods cleared for the misses we accept). Between them: `uncertain`.

    When clear > alarm the model separates validation well enough that one threshold meets both targets:
    any t in [alarm, clear] does, so both become their midpoint, the uncertain band is empty, and
    "merged" is True. Raises ThresholdError when validation lacks either class.
    """
    far = _check_rate("target_false_alarm_rate", target_false_alarm_rate)
    miss = _check_rate("target_miss_rate", target_miss_rate)
    scores, targets = _check_scores(scores, targets)
    alarm = _alarm_threshold(scores, targets, far)
    clear = _clear_threshold(scores, targets, miss)
    merged = clear > alarm
    if merged:
        alarm = clear = (alarm + clear) / 2.0
    point = operating_point(scores, targets, alarm, clear)
    n_genuine, n_counterfeit = int((targets == 0).sum()), int(targets.sum())
    codes = verdict_codes(scores, alarm, clear)
    false_alarms = int(((codes == 1) & (targets == 0)).sum())
    misses = int(((codes == 0) & (targets == 1)).sum())
    return {
        "alarm": float(alarm),
        "clear": float(clear),
        "target_false_alarm_rate": far,
        "target_miss_rate": miss,
        "val_false_alarm_rate": point["false_alarm_rate"],
        "val_miss_rate": point["miss_rate"],
        # What those validation rates can tell about new images: exact 95% binomial intervals.
        "val_false_alarms": false_alarms,
        "val_misses": misses,
        "val_false_alarm_rate_ci": list(clopper_pearson(false_alarms, n_genuine)),
        "val_miss_rate_ci": list(clopper_pearson(misses, n_counterfeit)),
        "val_recall": point["recall"],
        "val_uncertain_rate": point["uncertain_rate"],
        "n_val_genuine": n_genuine,
        "n_val_counterfeit": n_counterfeit,
        "merged": merged,
        # One false alarm moves the validation rate by 1/n_genuine: with fewer than 1/target genuine
        # images the target can only be met by allowing none, and the figure is coarse.
        "false_alarm_resolution": 1.0 / n_genuine,
        "miss_resolution": 1.0 / n_counterfeit,
    }
