"""`verity compare`: a champion against a challenger on a frozen benchmark that neither was trained on.

Both models score the same images through the one pipeline (what the server would answer), and the
figures are paired, image by image, so that the noise of a small benchmark is stated rather than hidden:

- the ROC AUC of each and a paired bootstrap interval on the difference (challenger - champion): images
  resampled with replacement within each label, both models' scores kept together;
- McNemar's exact test on the verdicts at each model's deployed thresholds: the images one model gets
  right (a confident verdict equal to the label) and the other does not;
- recall at 1% false alarms, overall and per product;
- each model's not-recognised rate;
- the share of images whose verdict would change, with examples.

A benchmark is frozen when none of its images is in either model's training or validation split (by
the sha256 of the image, from the data.jsonl beside each model), and it is refused otherwise: a model
scored on what it learnt from looks better than it is. The result says `worse_beyond_noise` when the
whole interval on the ROC AUC difference lies below zero; `verity promote` refuses such a challenger.

    verity compare --champion checkpoints/photo-default/1.0.0 --challenger runs/photo-new/2 \
        --data benchmarks/frozen/manifest.jsonl [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from verity.datasets.manifest import read_manifest, resolve_image_path
from verity.inference.artifacts import COMPARISON_FILE
from verity.inference.vocabulary import LABELS
from verity.training.eval_samples import Sample, load_samples
from verity.training.metrics import recall_at_false_alarm_rate, roc_auc
from verity.training.scoring import OnnxScorer, ScoredSet, score_samples

RESAMPLES = 2000
CONFIDENCE = 0.95
FALSE_ALARM_RATE = 0.01
EXAMPLES = 10


class CompareError(ValueError):
    """A comparison that would not mean what it says: a benchmark a model learnt from, or mismatches."""


def image_hashes(manifest: Path, splits: tuple[str, ...] | None = None) -> set[str]:
    """The sha256 of every image of a manifest (of these splits), from its rows or its files."""
    hashes = set()
    for row in read_manifest(manifest):
        if splits is not None and row.split not in splits:
            continue
        digest = row.sha256 or hashlib.sha256(resolve_image_path(manifest, row).read_bytes()).hexdigest()
        hashes.add(digest)
    return hashes


def check_frozen(benchmark: Path, model_dirs: dict[str, Path]) -> None:
    """Refuses a benchmark that shares an image with a model's training or validation split."""
    if not benchmark.is_file():
        raise CompareError(f"--data {benchmark}: a frozen benchmark is a manifest file (manifest.jsonl).")
    frozen = image_hashes(benchmark)
    for role, model_dir in model_dirs.items():
        trained = model_dir / "data.jsonl"
        if not trained.is_file():
            raise CompareError(
                f"The {role} ({model_dir}) has no data.jsonl beside it, so the benchmark cannot be shown "
                "to be unseen by it."
            )
        shared = frozen & image_hashes(trained, ("train", "val"))
        if shared:
            raise CompareError(
                f"{len(shared)} of the benchmark's {len(frozen)} images are in the {role}'s training or "
                f"validation split ({trained}): a frozen benchmark is never trained on."
            )


def paired_auc_interval(
    champion: np.ndarray, challenger: np.ndarray, targets: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """The CONFIDENCE percentile interval of ROC AUC(challenger) - ROC AUC(champion), resampling images
    within each label and keeping each image's two scores together."""
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(targets == label) for label in (0, 1)]
    differences = []
    for _ in range(RESAMPLES):
        picked = np.concatenate([rng.choice(indices, size=len(indices)) for indices in by_label])
        new, old = roc_auc(challenger[picked], targets[picked]), roc_auc(champion[picked], targets[picked])
        assert new is not None and old is not None  # each resample keeps both labels
        differences.append(new - old)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar(champion_right: np.ndarray, challenger_right: np.ndarray) -> dict[str, Any]:
    """McNemar's exact (binomial) test on the images exactly one of the two models gets right."""
    from scipy.stats import binomtest

    only_champion = int(np.sum(champion_right & ~challenger_right))
    only_challenger = int(np.sum(challenger_right & ~champion_right))
    discordant = only_champion + only_challenger
    p_value = binomtest(only_challenger, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_champion_right": only_champion, "only_challenger_right": only_challenger,
            "p_value": float(p_value)}  # fmt: skip


def _figures(scored: ScoredSet, targets: np.ndarray, products: list[str]) -> dict[str, Any]:
    scores = scored.scores
    per_product = {
        product: recall_at_false_alarm_rate(scores[mask], targets[mask], FALSE_ALARM_RATE)["recall"]
        for product in sorted(set(products))
        if (mask := np.array([p == product for p in products])).any()
    }
    recognised = [result.recognised for result in scored.results]
    overall = recall_at_false_alarm_rate(scores, targets, FALSE_ALARM_RATE)["recall"]
    return {
        "roc_auc": roc_auc(scores, targets),
        "recall_at_1pct_false_alarms": overall,
        "recall_at_1pct_false_alarms_by_product": per_product,
        "not_recognised_rate": float(np.mean([r is False for r in recognised])) if recognised else None,
        "verdicts": dict(Counter(result.verdict for result in scored.results)),
    }


def compare(champion: Path, challenger: Path, benchmark: Path) -> dict[str, Any]:
    """The paired figures of the module docstring, as a JSON-ready dict."""
    models = {"champion": OnnxScorer(champion), "challenger": OnnxScorer(challenger)}
    check_frozen(benchmark, {"champion": champion.parent, "challenger": challenger.parent})
    modalities = {scorer.spec.modality for scorer in models.values()}
    if len(modalities) != 1:
        raise CompareError(f"The two models serve different modalities ({', '.join(sorted(modalities))}).")
    loaded = load_samples(benchmark, None, modalities.pop())
    scored = {role: score_samples(scorer, loaded.samples, progress=False) for role, scorer in models.items()}
    if not np.array_equal(scored["champion"].indices, scored["challenger"].indices):
        raise CompareError("The two models could not read the same images; compare on a set both can.")
    samples: list[Sample] = [loaded.samples[i] for i in scored["champion"].indices]
    targets = np.array([sample.target for sample in samples])
    if len(set(targets.tolist())) < 2:
        raise CompareError("The benchmark needs genuine and counterfeit images to compare ROC AUC.")
    products = [sample.product or "(none)" for sample in samples]
    verdicts = {role: [r.verdict for r in s.results] for role, s in scored.items()}
    right = {role: np.array([v == LABELS[t] for v, t in zip(verdicts[role], targets, strict=True)])
             for role in scored}  # fmt: skip
    low, high = paired_auc_interval(scored["champion"].scores, scored["challenger"].scores, targets)
    pairs = zip(verdicts["champion"], verdicts["challenger"], strict=True)
    changed = [i for i, (old, new) in enumerate(pairs) if old != new]
    figures = {
        role: {"model": f"{models[role].name}/{models[role].version}", **_figures(s, targets, products)}
        for role, s in scored.items()
    }
    difference = figures["challenger"]["roc_auc"] - figures["champion"]["roc_auc"]
    return {
        "benchmark": str(benchmark),
        "images": len(samples),
        **figures,
        "roc_auc_difference": difference,
        "roc_auc_difference_interval": [low, high],
        "confidence": CONFIDENCE,
        "mcnemar": mcnemar(right["champion"], right["challenger"]),
        "verdict_changes": len(changed) / len(samples),
        "verdict_change_examples": [
            {"image": str(samples[i].path), "label": LABELS[targets[i]],
             "champion": verdicts["champion"][i], "challenger": verdicts["challenger"][i]}  # fmt: skip
            for i in changed[:EXAMPLES]
        ],
        "worse_beyond_noise": high < 0.0,
        "better_beyond_noise": low > 0.0,
    }


def summary(result: dict[str, Any]) -> str:
    champion, challenger = result["champion"], result["challenger"]
    low, high = result["roc_auc_difference_interval"]
    test = result["mcnemar"]
    verdict = "not different beyond noise"
    if result["worse_beyond_noise"] or result["better_beyond_noise"]:
        verdict = "worse beyond noise" if result["worse_beyond_noise"] else "better beyond noise"
    return "\n".join([
        f"benchmark: {result['benchmark']} ({result['images']} images, never trained on by either)",
        f"champion   {champion['model']}: ROC AUC {champion['roc_auc']:.4f}, not recognised "
        f"{champion['not_recognised_rate']:.1%}",
        f"challenger {challenger['model']}: ROC AUC {challenger['roc_auc']:.4f}, not recognised "
        f"{challenger['not_recognised_rate']:.1%}",
        f"ROC AUC difference {result['roc_auc_difference']:+.4f}, {result['confidence']:.0%} paired "
        f"bootstrap interval [{low:+.4f}, {high:+.4f}]: the challenger is {verdict}",
        f"McNemar on verdicts: {test['only_challenger_right']} right only by the challenger, "
        f"{test['only_champion_right']} only by the champion, p = {test['p_value']:.3g}",
        f"verdicts that would change: {result['verdict_changes']:.1%}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verity compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--champion", required=True, type=Path, help="the model serving now (its folder)")
    parser.add_argument("--challenger", required=True, type=Path, help="the candidate (its folder)")
    parser.add_argument("--data", required=True, type=Path, help="the frozen benchmark manifest")
    parser.add_argument("--out", type=Path, help="also write the result as compare.json in this folder")
    args = parser.parse_args(argv)
    from verity.inference.artifacts import resolve_model

    result = compare(resolve_model(args.champion), resolve_model(args.challenger), args.data)
    print(summary(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / COMPARISON_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
