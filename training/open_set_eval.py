"""`verity eval`'s open-set figures, beside the closed-set ones: how often the novelty gate flags the
evaluated images and an out-of-distribution folder, and recall on counterfeits of kinds the model never
saw, for the classifier alone, the product reference check alone, and both fused.

Fusion. The served rule alarms when either check alarms at its own threshold. To draw one curve for the
pair, each score is turned into its rank among the evaluated genuine images (the share of genuine images
scoring below it), and the fused score is the larger rank: sweeping one threshold on it moves both
checks to the same genuine tail rate at once, so "recall at 1% false alarms" means the same for the
fused curve as for each check alone. The served thresholds' own operating point is reported as well.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.decode import IMAGE_SUFFIXES
from verity.inference.engine import Engine, Prediction
from verity.inference.open_set import NoveltyGate
from verity.inference.pipeline import ProductCheck, Scored
from verity.inference.references.check import ReferenceCheck
from verity.inference.references.store import ReferenceStore
from verity.inference.tiling import TilingOptions
from verity.inference.vocabulary import NOT_RECOGNISED_CAUSES
from verity.training.eval_samples import Sample
from verity.training.scoring import OnnxScorer, ProductChecks, ScoredSet, score_samples

FALSE_ALARM_RATES = (0.01,)


def not_recognised_rate(results: list[Scored], gate: NoveltyGate) -> dict[str, Any]:
    """The share of these images the pipeline did not recognise (`judge`'s decision, by every rule of
    the gate), how many for each cause, and the spread of their novelty."""
    distances = np.array([r.novelty for r in results if r.novelty is not None], dtype=np.float64)
    flagged = [r for r in results if r.recognised is False]
    causes = Counter(r.reasons[1] if len(r.reasons) > 1 else "unlike_training" for r in flagged)
    return {
        "images": len(results),
        "not_recognised": len(flagged),
        "by_cause": {cause: causes[cause] for cause in NOT_RECOGNISED_CAUSES if causes[cause]},
        "beyond_threshold": int((distances > gate.threshold).sum()),
        "under_min_side": causes["smaller_than_training"],
        "not_recognised_rate": len(flagged) / len(results) if results else None,
        "novelty_median": float(np.median(distances)) if len(distances) else None,
        "novelty_p99": float(np.quantile(distances, 0.99)) if len(distances) else None,
        "threshold": gate.threshold,
    }


def ood_samples(folder: str | Path) -> list[Sample]:
    """Every image file below `folder` (by suffix), as unlabelled samples; the first subfolder is kept
    as the sample's source, so figures can be given per kind."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--ood {folder}: not a folder.")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"--ood {folder}: no image files in it.")
    def kind(path: Path) -> str | None:
        parts = path.relative_to(root).parts
        return parts[0] if len(parts) > 1 else None

    return [Sample(path, 0, source=kind(path)) for path in paths]


def ood_figures(scorer: OnnxScorer, folder: str | Path, tiling: TilingOptions) -> dict[str, Any]:
    """The not-recognised rate on an out-of-distribution folder, overall and per first subfolder."""
    gate = scorer.engine.novelty_gate
    if gate is None:
        raise ValueError(f"{scorer.path} has no novelty gate: export it with --bank-data to measure --ood.")
    samples = ood_samples(folder)
    scored = score_samples(scorer, samples, progress=False, tiling=tiling)
    if scored.embeddings is None:
        raise ValueError(f"None of the {len(samples)} images in {folder} could be scored.")
    figures = {"folder": str(folder), **not_recognised_rate(scored.results, gate)}
    figures["failed"] = len(scored.failures)
    kinds = [samples[i].source or "." for i in scored.indices]
    if len(set(kinds)) > 1:
        pairs = list(zip(scored.results, kinds, strict=True))
        figures["by_folder"] = {
            kind: not_recognised_rate([result for result, of in pairs if of == kind], gate)
            for kind in sorted(set(kinds))
        }
    return figures


def genuine_rank(values: np.ndarray, genuine: np.ndarray) -> np.ndarray:
    """The share of genuine values strictly below each value (NaN, an abstained check, ranks 0)."""
    reference = np.sort(genuine[np.isfinite(genuine)])
    below = np.searchsorted(reference, np.nan_to_num(values, nan=-np.inf), side="left")
    return np.where(np.isfinite(values), below / max(1, len(reference)), 0.0)


def recall_at(scores: np.ndarray, targets: np.ndarray, rate: float) -> dict[str, Any]:
    """Recall on counterfeits at the strictest threshold whose false-alarm rate on genuine images is at
    most `rate` (ties at the threshold count as alarms)."""
    genuine, counterfeit = scores[targets == 0], scores[targets == 1]
    if not len(genuine) or not len(counterfeit):
        return {"recall": None, "false_alarm_rate": None, "threshold": None}
    candidates = np.unique(np.concatenate([genuine, counterfeit, [np.inf]]))
    best = {"recall": 0.0, "false_alarm_rate": 0.0, "threshold": float("inf")}
    for threshold in candidates[::-1]:  # from the strictest down, while false alarms stay within rate
        far = float(np.mean(genuine >= threshold))
        if far > rate:
            break
        best = {"recall": float(np.mean(counterfeit >= threshold)), "false_alarm_rate": far,
                "threshold": float(threshold)}
    return best


def product_checks(engine: Engine, store: ReferenceStore) -> ProductChecks:
    """For each sample, the check against its own product's genuine references (None when it names no
    product, or one without references for this model)."""
    enrolled = {product for product, count in store.products(engine.name).items() if count}

    def for_sample(sample: Sample) -> ProductCheck | None:
        product = sample.product
        if not product or product not in enrolled:
            return None

        def check(output: Prediction) -> ReferenceCheck:
            assert output.embedding is not None  # the pipeline asks only for an output with one
            return store.check(engine, product, output.embedding, output.patches)

        return check

    return for_sample


def reference_margins(samples: list[Sample], scored: ScoredSet) -> tuple[np.ndarray, dict[str, int]]:
    """Each image's reference-check margin against its own product, as the pipeline checked it (NaN when
    the product has too few references, none, or the image names no product), and how many images fell
    in each case."""
    margins = np.full(len(scored.indices), np.nan)
    counts = {"checked": 0, "abstained": 0, "no_references": 0, "no_product": 0}
    for row, (index, result) in enumerate(zip(scored.indices, scored.results, strict=True)):
        check = result.reference
        if not samples[index].product:
            counts["no_product"] += 1
        elif check is None:
            counts["no_references"] += 1
        elif check.margin is None:
            counts["abstained"] += 1
        else:
            counts["checked"] += 1
            margins[row] = check.margin
    return margins, counts


def unseen_figures(
    scorer: OnnxScorer,
    samples: list[Sample],
    scored: ScoredSet,
    rates: tuple[float, ...] = FALSE_ALARM_RATES,
) -> dict[str, Any]:
    """Recall at each false-alarm rate for the classifier, the reference check and both fused, and the
    served rule's operating point (classifier alarm threshold OR product mismatch)."""
    targets = np.array([samples[i].target for i in scored.indices])
    margins, counts = reference_margins(samples, scored)
    classifier = np.asarray(scored.scores, dtype=np.float64)
    genuine = targets == 0
    fused = np.maximum(genuine_rank(classifier, classifier[genuine]), genuine_rank(margins, margins[genuine]))
    reference = np.nan_to_num(margins, nan=-np.inf)
    figures: dict[str, Any] = {"images": counts, "recall_at_false_alarm_rate": {}}
    for rate in rates:
        figures["recall_at_false_alarm_rate"][str(rate)] = {
            "classifier": recall_at(classifier, targets, rate),
            "reference": recall_at(reference, targets, rate),
            "fused": recall_at(fused, targets, rate),
        }
    alarm = scorer.engine.thresholds.alarm
    served = (classifier >= alarm) | (reference > 0)
    figures["served_rule"] = {
        "false_alarm_rate": float(served[genuine].mean()) if genuine.any() else None,
        "recall": float(served[~genuine].mean()) if (~genuine).any() else None,
        "classifier_only_recall": float((classifier >= alarm)[~genuine].mean()) if (~genuine).any() else None,
    }
    return figures
