"""What an evaluation writes and prints besides metrics.json: predictions.csv, the worst errors that
report.html shows (training/report.py draws it), and the summary `verity eval` prints.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.heatmap import over_input
from verity.inference.preprocess import load_for_model
from verity.inference.spec import PreprocessSpec
from verity.inference.vocabulary import LABELS, VERDICTS, verdict_codes
from verity.training.eval_samples import LoadedData, Sample
from verity.training.scoring import ScoredSet, Scorer

WORST_ERRORS = 12


def worst_errors(scores: np.ndarray, targets: np.ndarray, count: int = WORST_ERRORS) -> list[int]:
    """Positions of the most confident mistakes: largest |target - score|, wrong side of 0.5 first."""
    distance = np.abs(targets - scores)
    order = np.argsort(-distance, kind="mergesort")
    return [int(i) for i in order[:count] if distance[i] > 0.5] or [int(i) for i in order[: min(count, 4)]]


PREDICTION_COLUMNS = (
    "path", "label", "modality", "product", "score", "verdict", "logit_genuine", "logit_counterfeit",
    "classifier_verdict", "recognised", "reasons",
)  # fmt: skip


def write_predictions(path: Path, samples: list[Sample], scored: ScoredSet) -> None:
    """predictions.csv: one row per evaluated image, the pipeline's result as the service would answer
    it (`verdict` by the open-set rule, `reasons` joined by commas, `recognised` empty without a gate)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for index, result in zip(scored.indices, scored.results, strict=True):
            sample = samples[index]
            writer.writerow(
                [
                    str(sample.path),
                    LABELS[sample.target],
                    sample.modality or "",
                    sample.product or "",
                    f"{result.score:.6f}",
                    result.verdict,
                    f"{result.output.logits[0]:.6f}",
                    f"{result.output.logits[1]:.6f}",
                    result.classifier_verdict,
                    "" if result.recognised is None else str(result.recognised).lower(),
                    ",".join(result.reasons),
                ]
            )


def report_examples(
    samples: list[Sample],
    scored: ScoredSet,
    spec: PreprocessSpec,
    thresholds: dict[str, Any] | None,
    count: int,
    alignment: str,
) -> list[dict[str, Any]]:
    """The worst errors with their model input (re-decoded: only a dozen) and their CAM over it, where
    the model's cells lie (`alignment`: heatmap.over_input), as the server draws it."""
    targets = np.array([samples[i].target for i in scored.indices])
    alarm, clear = (thresholds["alarm"], thresholds["clear"]) if thresholds else (0.5, 0.5)
    examples = []
    for position in worst_errors(scored.scores, targets, count):
        sample = samples[scored.indices[position]]
        code = int(verdict_codes(scored.scores[position], alarm, clear))
        cam = scored.cams[position]
        examples.append(
            {
                "image": load_for_model(sample.path, spec),
                "cam": None if cam is None else over_input(cam, spec.image_size, alignment),
                "score": float(scored.scores[position]),
                "label": LABELS[sample.target],
                "verdict": VERDICTS[code],
                "caption": f"{sample.path.name}" + (f" ({sample.product})" if sample.product else ""),
            }
        )
    return examples


def write_html_report(
    path: Path, scorer: Scorer, loaded: LoadedData, scored: ScoredSet, result: dict[str, Any], worst: int
) -> Path:
    """report.html: the metrics of `result`, the score distributions and the `worst` errors."""
    from verity.training.report import write_report

    targets = np.array([loaded.samples[i].target for i in scored.indices])
    alignment = scorer.engine.feature_alignment
    examples = report_examples(loaded.samples, scored, scorer.spec, scorer.card_thresholds, worst, alignment)
    details = {"model": result["model"], "data": result["data"]}
    title = f"{scorer.name} {scorer.version} on {loaded.description}"
    return write_report(path, result["metrics"], scored.scores, targets, examples, title, details,
                        warnings=scorer.card_warnings)  # fmt: skip


def _figure(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(bounds: list[float] | None, digits: int = 4) -> str:
    """The " [lo, hi]" that follows a figure, or nothing when no interval could be computed."""
    return "" if not bounds else f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _interval_note(metrics: dict[str, Any]) -> list[str]:
    """One line saying what the brackets are, when any are printed."""
    bootstrap = metrics.get("bootstrap") or {}
    if not metrics.get("roc_auc_ci"):
        return []
    return [
        f"  intervals         [lo, hi] are {100 * bootstrap.get('confidence', 0.95):g}% percentile "
        f"bootstrap intervals ({bootstrap.get('resamples')} resamples within each label)"
    ]


def open_set_lines(result: dict[str, Any]) -> list[str]:
    """The novelty gate's and the reference check's figures, when the evaluation has them."""
    lines = []
    open_set = result.get("open_set") or {}
    for name, figures in (("evaluated", open_set.get("evaluated")), ("--ood", open_set.get("ood"))):
        if figures:
            small = figures.get("under_min_side")
            lines.append(
                f"  not recognised    {_percent(figures['not_recognised_rate'])} of {figures['images']} "
                f"{'evaluated' if name == 'evaluated' else 'out-of-distribution'} images (novelty > "
                f"{figures['threshold']:.4f}; median {_figure(figures['novelty_median'])}"
                f"{f'; {small} smaller than any training image' if small else ''})"
            )
            if figures.get("validation_in_bank"):
                lines.append(
                    f"    (not an estimate: the gate's bank holds the {figures['validation_in_bank']} "
                    "validation images, joined after its thresholds were chosen; evaluate --split test)"
                )
        for kind, part in ((figures or {}).get("by_folder") or {}).items():
            lines.append(f"    {kind:<24} {_percent(part['not_recognised_rate'])} of {part['images']}")
    unseen = result.get("unseen")
    if unseen:
        counts = unseen["images"]
        lines.append(
            f"  reference check   {counts['checked']} images checked, {counts['abstained']} abstained "
            f"(too few references), {counts['no_references']} products without references"
        )
        for rate, scorers in unseen["recall_at_false_alarm_rate"].items():
            figures = ", ".join(f"{name} {_figure(entry['recall'], 3)}" for name, entry in scorers.items())
            lines.append(f"  recall at {_percent(float(rate))} FAR  {figures}")
        served = unseen["served_rule"]
        lines.append(
            f"  served rule       classifier OR reference mismatch: recall {_percent(served['recall'])}, "
            f"false alarms {_percent(served['false_alarm_rate'])} (classifier alone: recall "
            f"{_percent(served['classifier_only_recall'])})"
        )
    return lines


def _predicted_lines(metrics: dict[str, Any]) -> list[str]:
    """What the thresholds' validation predicted for a set of this size, and whether this one is in it:
    a rate outside says these images are not like validation's (another station, a drift), or the
    validation split was too small to say."""
    predicted = metrics.get("predicted_from_validation")
    if not predicted:
        return []
    parts = []
    for rate, name in (("false_alarm_rate", "false alarms"), ("miss_rate", "misses")):
        bounds, value = predicted.get(rate), metrics.get(rate)
        if bounds is None or value is None:
            continue
        inside = "within" if bounds[0] <= value <= bounds[1] else "OUTSIDE"
        parts.append(f"{name} {_percent(bounds[0])}-{_percent(bounds[1])} ({inside})")
    if not parts:
        return []
    share = f"{100 * predicted['confidence']:g}%"
    return [f"  validation predicted, {share} for this many images: " + ", ".join(parts)]


def format_summary(result: dict[str, Any]) -> str:
    """A readable summary, ROC AUC first; figures match metrics.json."""
    model, data, metrics = result["model"], result["data"], result["metrics"]
    auc_note = "" if metrics["roc_auc"] is not None else " (needs both genuine and counterfeit images)"
    recall = metrics["recall_at_false_alarm_rate"]
    counts = metrics["confusion_matrix"]["counts"]
    lines = [
        f"verity eval: {model['name']} {model['version']} ({model['kind']}) on {data['description']}",
        f"  images            {metrics['n']} evaluated ({metrics['n_genuine']} genuine, "
        f"{metrics['n_counterfeit']} counterfeit), {data['n_failed']} unreadable",
        f"  ROC AUC           {_figure(metrics['roc_auc'])}{_interval(metrics.get('roc_auc_ci'))}{auc_note}",
        f"  PR AUC            {_figure(metrics['pr_auc'])}",
        f"  accuracy          {_percent(metrics['accuracy'])} "
        f"(of decided: {_percent(metrics['accuracy_decided'])}, "
        f"uncertain: {_percent(metrics['uncertain_rate'])}) at alarm {metrics['alarm']:.4f} / clear "
        f"{metrics['clear']:.4f} [{metrics['operating_point']}]",
        f"  false alarms      {_percent(metrics['false_alarm_rate'])}   "
        f"misses {_percent(metrics['miss_rate'])}",
        *_predicted_lines(metrics),
        *(
            f"  {'recall at FAR' if number == 0 else '':<18}{_percent(float(rate)):>5}: "
            f"{_figure(entry['recall'], 3)}{_interval(entry.get('recall_ci'), 3)}"
            for number, (rate, entry) in enumerate(recall.items())
        ),
        f"  ECE               {_figure(metrics['ece'])} ({metrics['ece_bins']} bins)",
        *_interval_note(metrics),
        "  confusion         true \\ verdict   genuine  counterfeit  uncertain",
        f"                    genuine         {counts[0][0]:>7}  {counts[0][1]:>11}  {counts[0][2]:>9}",
        f"                    counterfeit     {counts[1][0]:>7}  {counts[1][1]:>11}  {counts[1][2]:>9}",
    ]
    for group, values in metrics["groups"].items():
        if list(values) == ["unknown"] or (len(values) < 2 and group != "product"):
            continue  # nothing to break down
        lines.append(f"  per {group}:")
        for name, figures in values.items():
            lines.append(
                f"    {name:<24} n={figures['n']:<6} ROC AUC {_figure(figures['roc_auc'])}  "
                f"accuracy {_percent(figures['accuracy'])}  uncertain {_percent(figures['uncertain_rate'])}"
            )
    lines += open_set_lines(result)
    lines += [f"  note: {note}" for note in data["notes"]]
    lines += [f"  unreadable: {entry['path']}: {entry['error']}" for entry in data["failed"][:5]]
    lines += [f"  wrote {path}" for path in result["outputs"].values()]
    return "\n".join(lines)
