"""Temperature scaling and threshold choice on validation data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from verity.datasets.manifest import ManifestRow
from verity.inference.engine import Thresholds, calibrated_scores
from verity.training.calibrate import (
    MIN_TEMPERATURE,
    ThresholdError,
    card_warnings,
    choose_thresholds,
    clopper_pearson,
    fit_temperature,
    operating_point,
    predicted_rate_interval,
    predicted_rates,
    sample_size_warnings,
    temperature_nll,
    validation_group_warnings,
    validation_groups,
    validation_size_warnings,
)


def _synthetic_logits(
    true_temperature: float, n: int = 20000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits / T): the NLL optimum is then T (up to sampling noise)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, 2))
    probabilities = calibrated_scores(logits, true_temperature)
    targets = (rng.random(n) < probabilities).astype(np.int64)
    return logits, targets


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(true_temperature: float) -> None:
    logits, targets = _synthetic_logits(true_temperature)
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    # It is the minimum: nudging T either way raises the NLL.
    best = temperature_nll(logits, targets, fitted)
    assert best <= temperature_nll(logits, targets, fitted * 1.1)
    assert best <= temperature_nll(logits, targets, fitted / 1.1)


def test_fit_temperature_on_perfect_separation_stays_finite() -> None:
    # Every validation image right with a logit margin of 4: without smoothing T would run to 0.
    logits = np.array([[2.0, -2.0], [-2.0, 2.0]] * 10)
    targets = np.array([0, 1] * 10)
    fitted = fit_temperature(logits, targets)
    assert fitted > MIN_TEMPERATURE
    # The fitted chance of being wrong is Laplace's 1 / (n + 2) for n = 20.
    wrong = calibrated_scores(logits[:1], fitted)[0]
    assert wrong == pytest.approx(1 / 22, rel=1e-3)


def test_smoothed_nll_by_hand() -> None:
    logits = np.array([[0.0, np.log(3.0)]])  # softmax: 1/4, 3/4
    assert temperature_nll(logits, np.array([1]), 1.0) == pytest.approx(-np.log(0.75))
    expected = -(0.9 * np.log(0.75) + 0.1 * np.log(0.25))
    assert temperature_nll(logits, np.array([1]), 1.0, smoothing=0.1) == pytest.approx(expected)


def test_fit_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))


def _validation_scores(
    seed: int = 1, n_genuine: int = 2000, n_counterfeit: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    genuine = rng.beta(2, 6, n_genuine)
    counterfeit = rng.beta(6, 2, n_counterfeit)
    return np.concatenate([genuine, counterfeit]), np.concatenate(
        [np.zeros(n_genuine), np.ones(n_counterfeit)]
    )


@pytest.mark.parametrize(("far", "miss"), [(0.01, 0.05), (0.001, 0.01), (0.05, 0.2)])
def test_thresholds_meet_their_targets_on_validation(far: float, miss: float) -> None:
    scores, targets = _validation_scores()
    result = choose_thresholds(scores, targets, far, miss)
    point = operating_point(scores, targets, result["alarm"], result["clear"])
    assert point["false_alarm_rate"] <= far
    assert point["miss_rate"] <= miss
    assert result["val_false_alarm_rate"] == point["false_alarm_rate"]
    assert result["val_miss_rate"] == point["miss_rate"]
    assert 0.0 <= result["clear"] <= result["alarm"] <= 1.0
    Thresholds(result["alarm"], result["clear"])  # what the engine will build from the card
    genuine = np.sort(scores[targets == 0])
    counterfeit = np.sort(scores[targets == 1])
    # "Lowest alarm": one more false alarm than allowed sits just below it.
    allowed_alarms = int(np.floor(far * len(genuine) + 1e-9))
    assert genuine[-(allowed_alarms + 1)] < result["alarm"]
    assert (genuine >= result["alarm"]).sum() == allowed_alarms or result["merged"]
    # "Highest clear": the first counterfeit beyond the allowed misses sits just above it.
    allowed_misses = int(np.floor(miss * len(counterfeit) + 1e-9))
    assert counterfeit[allowed_misses] > result["clear"]


def test_thresholds_hand_made_case() -> None:
    # 10 genuine, 10 counterfeit. Targets 10% / 10%: one false alarm and one miss allowed.
    genuine = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.9]
    counterfeit = [0.3, 0.5, 0.55, 0.65, 0.7, 0.75, 0.8, 0.85, 0.95, 0.99]
    scores = np.array(genuine + counterfeit)
    targets = np.array([0] * 10 + [1] * 10)
    result = choose_thresholds(scores, targets, 0.1, 0.1)
    # Alarm above the second highest genuine (0.6), middle of the gap to the next score (0.65).
    assert result["alarm"] == pytest.approx(0.625)
    # Clear below the second lowest counterfeit (0.5), middle of the gap to the next lower score (0.4).
    assert result["clear"] == pytest.approx(0.45)
    assert result["val_false_alarm_rate"] == pytest.approx(0.1)
    assert result["val_miss_rate"] == pytest.approx(0.1)
    assert result["val_uncertain_rate"] == pytest.approx(3 / 20)  # 0.5, 0.55 (counterfeit), 0.6 (genuine)
    assert not result["merged"]


def test_separable_validation_gives_one_threshold() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    targets = np.array([0, 0, 0, 1, 1, 1])
    result = choose_thresholds(scores, targets)
    # Neither a false alarm nor a miss is allowed with 3 per class: both sit mid-gap between 0.3 and 0.7.
    assert result["alarm"] == result["clear"] == pytest.approx(0.5)
    assert result["val_false_alarm_rate"] == 0.0 and result["val_miss_rate"] == 0.0
    assert result["val_uncertain_rate"] == 0.0


def test_clear_above_alarm_is_merged() -> None:
    # 20 genuine at or below 0.3 (no false alarm allowed), 20 counterfeits from 0.6 (one miss allowed):
    # the clear threshold would sit above the alarm threshold, so both become their midpoint.
    genuine = np.linspace(0.01, 0.3, 20)
    counterfeit = np.linspace(0.6, 0.99, 20)
    scores = np.concatenate([genuine, counterfeit])
    targets = np.array([0] * 20 + [1] * 20)
    result = choose_thresholds(scores, targets, 0.01, 0.05)
    assert result["merged"]
    unmerged_alarm = (0.3 + 0.6) / 2
    unmerged_clear = (counterfeit[0] + counterfeit[1]) / 2
    assert result["alarm"] == result["clear"] == pytest.approx((unmerged_alarm + unmerged_clear) / 2)
    assert result["val_false_alarm_rate"] == 0.0 and result["val_miss_rate"] == 0.0


def test_refuses_without_counterfeits() -> None:
    with pytest.raises(ThresholdError, match="no counterfeits"):
        choose_thresholds(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]))


def test_refuses_without_genuine() -> None:
    with pytest.raises(ThresholdError, match="no genuine"):
        choose_thresholds(np.array([0.7, 0.8]), np.array([1, 1]))


def test_threshold_error_is_a_value_error_and_checks_inputs() -> None:
    assert issubclass(ThresholdError, ValueError)
    with pytest.raises(ThresholdError, match="probabilities"):
        choose_thresholds(np.array([0.1, 1.5]), np.array([0, 1]))
    with pytest.raises(ThresholdError, match="one target per score"):
        choose_thresholds(np.array([0.1, 0.5]), np.array([0]))
    with pytest.raises(ThresholdError, match="strictly between"):
        choose_thresholds(np.array([0.1, 0.5]), np.array([0, 1]), target_false_alarm_rate=0.0)


def test_clopper_pearson_known_values() -> None:
    assert clopper_pearson(0, 100) == (0.0, pytest.approx(0.0362, abs=1e-4))
    assert clopper_pearson(5, 100) == (pytest.approx(0.0164, abs=1e-4), pytest.approx(0.1128, abs=1e-4))
    assert clopper_pearson(1, 10) == (pytest.approx(0.00253, abs=1e-5), pytest.approx(0.4450, abs=1e-4))
    assert clopper_pearson(100, 100) == (pytest.approx(0.9638, abs=1e-4), 1.0)
    # 0 of n, one-sided 95% (two-sided 90%): 1 - 0.05 ** (1 / n), about 3 / n.
    assert clopper_pearson(0, 300, 0.90)[1] == pytest.approx(1 - 0.05 ** (1 / 300))
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(3, 2)
    with pytest.raises(ValueError, match="trials >= 1"):
        clopper_pearson(0, 0)


def test_thresholds_carry_exact_intervals_of_their_validation_rates() -> None:
    genuine = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.9]
    counterfeit = [0.3, 0.5, 0.55, 0.65, 0.7, 0.75, 0.8, 0.85, 0.95, 0.99]
    result = choose_thresholds(np.array(genuine + counterfeit), np.array([0] * 10 + [1] * 10), 0.1, 0.1)
    assert result["val_false_alarms"] == 1 and result["val_misses"] == 1
    assert result["n_val_genuine"] == 10 and result["n_val_counterfeit"] == 10
    assert result["val_false_alarm_rate_ci"] == pytest.approx([0.00253, 0.4450], abs=1e-4)
    assert result["val_miss_rate_ci"] == pytest.approx([0.00253, 0.4450], abs=1e-4)
    scores, targets = _validation_scores()
    result = choose_thresholds(scores, targets, 0.01, 0.05)
    low, high = result["val_false_alarm_rate_ci"]
    assert low <= result["val_false_alarm_rate"] <= high
    assert result["val_false_alarms"] == round(result["val_false_alarm_rate"] * result["n_val_genuine"])
    low, high = result["val_miss_rate_ci"]
    assert low <= result["val_miss_rate"] <= high


def test_the_predicted_interval_holds_a_new_sets_rate_where_the_validation_interval_does_not() -> None:
    """Thresholds chosen on 157 validation images, then 157 new ones from the same distribution: the
    new set's false-alarm rate lies in the predicted interval at least 95% of the time (it is
    conservative, the counts being whole), while the validation rate's Clopper-Pearson interval misses
    it far more often (0 false alarms among the new images is outside [0.02%, 3.5%])."""
    rng = np.random.default_rng(7)
    inside_predicted = inside_validation = 0
    trials = 1000
    for _ in range(trials):
        scores = rng.normal(size=(2, 157))
        val = np.concatenate([scores[0], rng.normal(2.0, 1.0, 60)])
        targets = np.array([0] * 157 + [1] * 60)
        thresholds = choose_thresholds(1 / (1 + np.exp(-val)), targets, 0.01, 0.05)
        new_rate = float((1 / (1 + np.exp(-scores[1])) >= thresholds["alarm"]).mean())
        low, high = predicted_rates(thresholds, 157, 60)["false_alarm_rate"]
        inside_predicted += low <= new_rate <= high
        low, high = thresholds["val_false_alarm_rate_ci"]
        inside_validation += low <= new_rate <= high
    assert inside_predicted / trials >= 0.95
    assert inside_validation / trials < 0.85
    assert predicted_rate_interval(1, 157, 157) == pytest.approx((0.0, 7 / 157))
    assert predicted_rate_interval(0, 16, 20) == pytest.approx((0.0, 5 / 20))
    with pytest.raises(ValueError):
        predicted_rate_interval(3, 2, 10)
    assert predicted_rates({"alarm": 0.5}, 10, 10) is None  # thresholds written by hand: nothing to say


def _rows(n_genuine: int, n_counterfeit: int) -> list[ManifestRow]:
    rows = [ManifestRow(f"g{i}.png", "genuine", "photo", split="val") for i in range(n_genuine)]
    rows += [ManifestRow(f"c{i}.png", "counterfeit", "photo", split="val") for i in range(n_counterfeit)]
    return rows + [ManifestRow("t.png", "genuine", "photo", split="train")] * 1000  # not validation


def _cases(label: str, count: int, cases: int, split: str = "val") -> list[ManifestRow]:
    """`count` images of `label` spread over `cases` case groups."""
    return [
        ManifestRow(f"{label}{split}{i}.png", label, "photo", case_id=f"exp{i % cases}", split=split)
        for i in range(count)
    ]


def test_validation_from_few_cases_is_named_in_a_warning() -> None:
    """Magnetic tiles' validation is one capture session: its rate interval cannot speak for another."""
    one_session = _cases("counterfeit", 66, 5) + _cases("genuine", 157, 1)  # genuine comes first anyway
    one_session += _cases("genuine", 600, 6, "train")  # training's cases are not validation's
    five = [f"case:exp{i}" for i in range(5)]
    assert list(validation_groups(one_session).items()) == [("genuine", ["case:exp0"]), ("counterfeit", five)]
    (warning,) = validation_group_warnings(one_session)
    assert warning.startswith("validation's 157 genuine images come from 1 group (case exp0): the false")
    assert "at least 5 groups in validation" in warning
    few = _cases("genuine", 40, 4) + _cases("counterfeit", 40, 2)
    assert [w.split(":")[0] for w in validation_group_warnings(few)] == [
        "validation's 40 genuine images come from 4 groups (case exp0, case exp1, case exp2, case exp3)",
        "validation's 40 counterfeit images come from 2 groups (case exp0, case exp1)",
    ]
    assert "the miss interval" in validation_group_warnings(few)[1]
    assert validation_group_warnings(_cases("genuine", 40, 5) + _cases("counterfeit", 40, 40)) == []
    # Images split one by one (no case, no product) are independent draws: nothing to warn about, and
    # a label with any such image is not counted in cases.
    assert validation_group_warnings(_rows(10, 10)) == []
    assert validation_groups(_cases("genuine", 10, 1) + _rows(1, 0)) == {}
    # A product groups images as a case does.
    by_product = [ManifestRow(f"{i}.png", "genuine", "xray", product="phones", split="val") for i in range(9)]
    assert validation_groups(by_product) == {"genuine": ["product:phones"]}
    assert "come from 1 group (product phones)" in validation_group_warnings(by_product)[0]


def test_the_card_carries_the_validation_case_warning() -> None:
    from verity.training.artifacts import Calibration, calibration_warnings

    rows = _cases("genuine", 300, 1) + _cases("counterfeit", 60, 10)
    scores, targets = _validation_scores(n_genuine=300, n_counterfeit=60)
    calibration = Calibration(1.0, choose_thresholds(scores, targets), {}, ["weak run: an example"])
    warnings = calibration_warnings(SimpleNamespace(rows=rows), calibration)
    assert warnings == (*validation_group_warnings(rows), "weak run: an example")
    assert len(warnings) == 2 and warnings[0].startswith("validation's 300 genuine images come from 1 group")


def test_validation_size_warnings_follow_the_rule_of_three() -> None:
    config = SimpleNamespace(target_false_alarm_rate=0.01, target_miss_rate=0.05)
    assert validation_size_warnings(_rows(300, 60), config) == []
    warnings = validation_size_warnings(_rows(299, 60), config)
    assert len(warnings) == 1 and "299 genuine" in warnings[0] and "300" in warnings[0]
    assert "1.0%" in warnings[0]  # 0 of 299: one-sided upper bound just above the 1% target
    warnings = validation_size_warnings(_rows(120, 20), config)
    assert [w.split(",")[0] for w in warnings] == [
        "validation holds 120 genuine images",
        "validation holds 20 counterfeit images",
    ]
    assert "fewer than the 60" in warnings[1] and "--val-fraction" in warnings[1]
    assert (
        validation_size_warnings(
            _rows(30, 6), SimpleNamespace(target_false_alarm_rate=0.1, target_miss_rate=0.5)
        )
        == []
    )
    assert sample_size_warnings(0, 100, 0.01, 0.05)[0].startswith("validation holds 0 genuine")
    # The card derives the same warnings from choose_thresholds' counts and targets.
    scores, targets = _validation_scores(n_genuine=150, n_counterfeit=500)
    thresholds = choose_thresholds(scores, targets, 0.01, 0.05)
    assert card_warnings(thresholds) == sample_size_warnings(150, 500, 0.01, 0.05)
    assert len(card_warnings(thresholds)) == 1
    assert card_warnings({"alarm": 0.7, "clear": 0.3}) == []
