"""inference.vocabulary: the names and the verdict rule every package shares, and the split defaults."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

from verity.inference.engine import Thresholds
from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    FEEDBACK_LABELS,
    LABELS,
    MODALITIES,
    REASONS,
    REFERENCE_STATUSES,
    UNCERTAIN,
    VERDICTS,
    verdict_codes,
    verdict_names,
)


def test_verdict_rule_at_and_between_the_thresholds() -> None:
    scores = [0.0, 0.3, 0.30001, 0.5, 0.79999, 0.8, 1.0]
    codes = verdict_codes(scores, alarm=0.8, clear=0.3)
    assert codes.tolist() == [0, 0, UNCERTAIN, UNCERTAIN, UNCERTAIN, 1, 1]
    assert verdict_names([0, 1, UNCERTAIN]) == ["genuine", "counterfeit", "uncertain"]
    # One threshold (alarm == clear, a merged pair): a score on it is an alarm, alarm is checked first.
    merged = verdict_codes([0.49, 0.5, 0.51], alarm=0.5, clear=0.5)
    assert verdict_names(merged) == ["genuine", "counterfeit", "counterfeit"]
    assert verdict_codes(np.full((2, 3), 0.5), 0.6, 0.4).shape == (2, 3)


@pytest.mark.parametrize(("alarm", "clear"), [(0.8, 0.3), (0.5, 0.5), (1.0, 0.0), (0.6, 0.59)])
def test_served_verdicts_and_evaluated_verdicts_are_one_rule(alarm: float, clear: float) -> None:
    """The engine's per-score verdict, calibration's operating point and evaluation's confusion matrix
    all come from `verdict_codes`, so a model card's figures are the verdicts the service gives."""
    from verity.training.calibrate import operating_point
    from verity.training.metrics import verdict_figures

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.random(200), [alarm, clear, 0.0, 1.0]])
    targets = rng.integers(0, 2, scores.size)
    served = [Thresholds(alarm=alarm, clear=clear).verdict(float(score)) for score in scores]
    assert served == verdict_names(verdict_codes(scores, alarm, clear))

    figures = verdict_figures(scores, targets, alarm, clear)
    assert figures["confusion_matrix"]["columns"] == list(VERDICTS)
    assert figures["confusion_matrix"]["rows"] == list(LABELS)
    assert figures["verdicts"] == {name: served.count(name) for name in VERDICTS}
    point = operating_point(scores, targets, alarm, clear)
    assert point["uncertain_rate"] == pytest.approx(served.count("uncertain") / len(served))


def test_the_api_schema_lists_the_vocabulary() -> None:
    """api/schemas.py spells the names as Literal types for OpenAPI; they must be these."""
    from verity.api.schemas import (
        FeedbackLabel,
        HistoryVerdict,
        Label,
        Modality,
        Reason,
        ReferenceStatus,
        Verdict,
    )

    assert typing.get_args(Verdict) == VERDICTS
    assert typing.get_args(Label) == LABELS
    assert typing.get_args(FeedbackLabel) == FEEDBACK_LABELS and FEEDBACK_LABELS[:2] == LABELS
    assert typing.get_args(HistoryVerdict) == (*VERDICTS, "not_recognised")
    assert typing.get_args(Modality) == MODALITIES
    assert typing.get_args(Reason) == REASONS
    assert typing.get_args(ReferenceStatus) == REFERENCE_STATUSES


def test_ingest_train_and_eval_split_with_the_same_defaults() -> None:
    """If one side's defaults drifted, evaluation would re-split differently from training and test
    images would have been trained on."""
    from verity.datasets.ingest import IngestOptions
    from verity.datasets.rows import load_rows
    from verity.training.config import TrainConfig
    from verity.training.eval_samples import SplitParams

    defaults = (DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
    assert defaults == (0.15, 0.15, 0)
    config = TrainConfig()
    assert (config.val_fraction, config.test_fraction, config.seed) == defaults
    evaluation = SplitParams()
    assert (evaluation.val_fraction, evaluation.test_fraction, evaluation.seed) == defaults
    options = IngestOptions()
    assert (options.val, options.test, options.seed) == defaults
    parameters = inspect.signature(load_rows).parameters
    assert tuple(parameters[name].default for name in ("val", "test", "seed")) == defaults


def test_ingest_help_prints_the_split_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from verity.datasets.cli import ingest_main

    with pytest.raises(SystemExit):
        ingest_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"validation ({DEFAULT_VAL_FRACTION})" in text and f"test ({DEFAULT_TEST_FRACTION})" in text
    assert f"split seed ({DEFAULT_SPLIT_SEED})" in text
