"""Evaluation figures against a hand-made score set whose values were worked out by hand."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from verity.training.metrics import (
    FALSE_ALARM_RATES,
    _resample_statistics,
    _resampled_counts,
    average_precision,
    average_ranks,
    bootstrap_intervals,
    compute_metrics,
    expected_calibration_error,
    recall_at_false_alarm_rate,
    roc_auc,
    roc_curve,
    verdict_figures,
)

# Four counterfeits and five genuine, with a three-way tie at 0.5 (one counterfeit, two genuine).
COUNTERFEIT = [0.9, 0.8, 0.5, 0.3]
GENUINE = [0.7, 0.5, 0.2, 0.1, 0.5]
SCORES = np.array(COUNTERFEIT + GENUINE)
TARGETS = np.array([1] * 4 + [0] * 5)


def test_roc_auc_hand_computed_with_ties() -> None:
    # Pairs won by each counterfeit over the 5 genuine (a tie counts 1/2):
    # 0.9 -> 5, 0.8 -> 5, 0.5 -> 2 wins + 2 ties = 3, 0.3 -> 2. Total 15 of 20 pairs.
    assert roc_auc(SCORES, TARGETS) == pytest.approx(15 / 20)


def test_roc_auc_matches_pairwise_definition_on_heavy_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60) / 4.0  # only five distinct values: ties everywhere
    targets = (rng.random(60) < 0.4).astype(int)
    positives, negatives = scores[targets == 1], scores[targets == 0]
    pairwise = np.mean(
        [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)]
    )
    assert roc_auc(scores, targets) == pytest.approx(pairwise)
    assert roc_auc(1 - scores, targets) == pytest.approx(1 - pairwise)


def test_roc_auc_undefined_with_one_class() -> None:
    assert roc_auc([0.1, 0.9], [0, 0]) is None
    assert compute_metrics([0.1, 0.9], [0, 0])["roc_auc"] is None


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([0.5, 0.1, 0.5, 0.9])).tolist() == [2.5, 1.0, 2.5, 4.0]


def test_average_precision_hand_computed() -> None:
    # Distinct thresholds, descending: 0.9 (TP 1, FP 0), 0.8 (2, 0), 0.7 (2, 1), 0.5 (3, 3), 0.3 (4, 3)...
    # Recall rises by 1/4 at 0.9, 0.8, 0.5 and 0.3 with precision 1, 1, 3/6 and 4/7.
    expected = 0.25 * (1 + 1 + 3 / 6 + 4 / 7)
    assert average_precision(SCORES, TARGETS) == pytest.approx(expected)


def test_roc_curve_groups_tied_scores() -> None:
    curve = roc_curve(SCORES, TARGETS)
    points = list(zip(curve["fpr"], curve["tpr"], strict=True))
    # The tie at 0.5 is one step: from (1/5, 2/4) straight to (3/5, 3/4).
    assert (0.2, 0.5) in points and (0.6, 0.75) in points
    assert not any(np.isclose(f, 0.4) for f, _ in points)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)


def test_recall_at_false_alarm_rates() -> None:
    # With 5 genuine, rates below 20% allow no false alarm: best threshold 0.8 catches 2 of 4.
    for rate in (0.001, 0.01, 0.05):
        result = recall_at_false_alarm_rate(SCORES, TARGETS, rate)
        assert result == {"recall": 0.5, "threshold": 0.8, "achieved_false_alarm_rate": 0.0}
    assert recall_at_false_alarm_rate(SCORES, TARGETS, 0.2)["recall"] == 0.5
    # 60% allows three false alarms: the threshold 0.3 catches all four.
    assert recall_at_false_alarm_rate(SCORES, TARGETS, 0.6) == {
        "recall": 1.0,
        "threshold": 0.3,
        "achieved_false_alarm_rate": 0.6,
    }


def test_expected_calibration_error_known_cases() -> None:
    # Bin [0.1, 0.2): mean score 0.15, observed 1/4 -> gap 0.10; bin [0.8, 0.9): 0.85 vs 1.0 -> 0.15.
    scores = [0.15] * 4 + [0.85] * 4
    targets = [0, 0, 0, 1] + [1] * 4
    assert expected_calibration_error(scores, targets) == pytest.approx(0.5 * 0.10 + 0.5 * 0.15)
    # Perfectly calibrated: a quarter of the 0.25 scores and three quarters of the 0.75 ones are counterfeit.
    assert expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == pytest.approx(0.0)
    # A score of exactly 1.0 lands in the last bin, not outside.
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)


def test_verdict_figures_and_confusion_matrix() -> None:
    figures = verdict_figures(SCORES, TARGETS, alarm=0.6, clear=0.4)
    # genuine: 0.7 alarm, 0.5 x2 uncertain, 0.2 and 0.1 cleared;
    # counterfeit: 0.9 and 0.8 alarm, 0.5 uncertain, 0.3 missed.
    assert figures["confusion_matrix"]["counts"] == [[2, 1, 2], [1, 2, 1]]
    assert figures["confusion_matrix"]["columns"] == ["genuine", "counterfeit", "uncertain"]
    assert figures["accuracy"] == pytest.approx(4 / 9)
    assert figures["accuracy_decided"] == pytest.approx(4 / 6)
    assert figures["uncertain_rate"] == pytest.approx(3 / 9)
    assert figures["false_alarm_rate"] == pytest.approx(1 / 5)
    assert figures["miss_rate"] == pytest.approx(1 / 4)
    assert figures["verdicts"] == {"genuine": 3, "counterfeit": 3, "uncertain": 3}


def test_compute_metrics_with_groups_is_json_and_consistent() -> None:
    products = ["A", "A", "B", "B", "A", "B", "A", "B", None]
    modalities = ["photo"] * 9
    metrics = compute_metrics(
        SCORES,
        TARGETS,
        groups={"product": products, "modality": modalities},
        thresholds={"alarm": 0.6, "clear": 0.4},
    )
    json.dumps(metrics)  # plain JSON types only
    assert metrics["roc_auc"] == pytest.approx(0.75)
    assert metrics["n"] == 9 and metrics["n_counterfeit"] == 4
    assert set(metrics["recall_at_false_alarm_rate"]) == {"0.001", "0.01", "0.05"}
    assert metrics["operating_point"] == "model thresholds"
    assert set(metrics["groups"]["product"]) == {"A", "B", "unknown"}
    assert metrics["groups"]["modality"]["photo"]["roc_auc"] == pytest.approx(0.75)
    group_a = metrics["groups"]["product"]["A"]
    # A: counterfeits 0.9, 0.8; genuine 0.7, 0.2 -> every pair won.
    assert group_a["roc_auc"] == 1.0 and group_a["n"] == 4
    assert metrics["groups"]["product"]["unknown"]["roc_auc"] is None
    assert compute_metrics(SCORES, TARGETS)["operating_point"].startswith("single threshold 0.5")


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one target per score"):
        roc_auc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0 \\(genuine\\) or 1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="No scores"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="values for"):
        compute_metrics(SCORES, TARGETS, groups={"product": ["A"]})


def _scored_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n scores, about half counterfeit, overlapping (ROC AUC near 0.9)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < 0.5).astype(np.int64)
    return 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.0, n) + 1.8 * targets))), targets


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data() -> None:
    widths = []
    for n in (200, 3200):
        scores, targets = _scored_set(n)
        intervals = bootstrap_intervals(scores, targets)
        low, high = intervals["roc_auc"]
        assert low < roc_auc(scores, targets) < high
        for rate in ("0.01", "0.05"):
            low_r, high_r = intervals["recall"][rate]
            assert low_r <= recall_at_false_alarm_rate(scores, targets, float(rate))["recall"] <= high_r
        widths.append(high - low)
    # The interval shrinks like 1/sqrt(n): 16 times the data, about a quarter of the width.
    assert widths[1] < widths[0] / 2.5


def test_bootstrap_resamples_match_the_point_definitions_and_keep_both_classes() -> None:
    """Each resample's AUC and recall, computed from counts, equal roc_auc / recall_at_false_alarm_rate
    on that resample written out; every resample holds each class at its own size."""
    scores, targets = _scored_set(60, seed=3)
    scores = np.round(scores, 1)  # heavy ties
    distinct, codes = np.unique(scores, return_inverse=True)
    rng = np.random.default_rng(5)
    pos = _resampled_counts(codes[targets == 1], len(distinct), 20, rng)
    neg = _resampled_counts(codes[targets == 0], len(distinct), 20, rng)
    assert (pos.sum(axis=1) == targets.sum()).all() and (neg.sum(axis=1) == (targets == 0).sum()).all()
    auc, recalls = _resample_statistics(pos, neg, FALSE_ALARM_RATES)
    for b in range(20):
        sample = np.r_[np.repeat(distinct, pos[b].astype(int)), np.repeat(distinct, neg[b].astype(int))]
        labels = np.r_[np.ones(int(pos[b].sum())), np.zeros(int(neg[b].sum()))]
        assert auc[b] == pytest.approx(roc_auc(sample, labels))
        for i, rate in enumerate(FALSE_ALARM_RATES):
            assert recalls[b, i] == pytest.approx(recall_at_false_alarm_rate(sample, labels, rate)["recall"])
    # One counterfeit among many genuine: an unstratified resample would often lose it; ours never does.
    one = bootstrap_intervals([0.9, *np.linspace(0.0, 0.8, 30)], [1] + [0] * 30)
    assert one is not None and one["roc_auc"] == [1.0, 1.0]


def test_bootstrap_is_reproducible_fast_and_undefined_with_one_class() -> None:
    import time

    scores, targets = _scored_set(3000, seed=1)
    started = time.perf_counter()
    first = bootstrap_intervals(scores, targets, resamples=1000)
    assert time.perf_counter() - started < 1.5  # about 0.1 s here; "well under a second" with slack
    assert bootstrap_intervals(scores, targets, resamples=1000) == first
    assert bootstrap_intervals(scores, targets, seed=1) != first
    assert bootstrap_intervals([0.2, 0.4], [0, 0]) is None
    assert bootstrap_intervals(scores, targets, resamples=0) is None


def test_compute_metrics_carries_the_intervals() -> None:
    scores, targets = _scored_set(400)
    metrics = compute_metrics(scores, targets)
    low, high = metrics["roc_auc_ci"]
    assert low < metrics["roc_auc"] < high
    for entry in metrics["recall_at_false_alarm_rate"].values():
        assert len(entry["recall_ci"]) == 2 and entry["recall_ci"][0] <= entry["recall_ci"][1]
    assert metrics["bootstrap"]["resamples"] == 1000 and metrics["bootstrap"]["confidence"] == 0.95
    assert json.loads(json.dumps(metrics)) == metrics
    single = compute_metrics([0.1, 0.3], [0, 0])
    assert single["roc_auc_ci"] is None
    assert all(e["recall_ci"] is None for e in single["recall_at_false_alarm_rate"].values())
    assert compute_metrics(scores, targets, bootstrap_resamples=0)["roc_auc_ci"] is None
