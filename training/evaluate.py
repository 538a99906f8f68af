"""Evaluation of a model on a manifest split or a folder: scores, metrics, predictions and a report.

`evaluate` reads the samples (training/eval_samples.py), scores them as the server would
(training/scoring.py), computes the metrics (training/metrics.py) and writes metrics.json,
predictions.csv and report.html (training/eval_outputs.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.card import to_jsonable
from verity.inference.tiling import TilingOptions
from verity.inference.vocabulary import SPLITS
from verity.training.eval_outputs import WORST_ERRORS, write_html_report, write_predictions
from verity.training.eval_samples import LoadedData, Sample, SplitParams, load_samples, split_params_for
from verity.training.metrics import compute_metrics
from verity.training.scoring import ProductChecks, ScoredSet, Scorer, open_scorer, score_samples


def default_eval_dir(scorer: Scorer, data: str | Path, split: str | None) -> Path:
    """runs/eval/<name>/<version>/<data>-<split>-<UTC time>: every evaluation of every model version is
    kept, never overwritten by the next (the data named by its manifest's folder, or the folder)."""
    from datetime import UTC, datetime

    source = Path(data)
    label = source.parent.name if source.is_file() else source.name
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path("runs") / "eval" / scorer.name / scorer.version / f"{label}-{split or 'all'}-{stamp}"


def evaluate(
    model: str | Path | Scorer,
    data: str | Path,
    split: str | None = "test",
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
    provider: str | None = None,
    threads: int = 1,
    progress: bool = True,
    report: bool = True,
    worst: int = WORST_ERRORS,
    split_params: SplitParams | None = None,
    tiling: TilingOptions = TilingOptions(),
    references: str | Path | None = None,
    ood: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluates a model on a data set; writes metrics.json, predictions.csv and report.html to `out_dir`.

    `model` is a path (see `inference.artifacts.resolve_model`) or a ready Scorer, e.g. `ModuleScorer`
    around the trainer's model. `split` None (or "all") evaluates every row. Rows without a split are split
    as the model's training run split them (`split_params`, default: read from the run's config.yaml or
    model.pt). `references` (a reference store folder, see `verity refs`) adds the recall on counterfeits
    for the classifier, the product reference check and both fused; `ood` (a folder of images that are
    no product) adds the novelty gate's not-recognised rate on them. Returns the result in metrics.json.
    """
    split = None if split == "all" else split
    if split is not None and split not in SPLITS:
        raise ValueError(f"Invalid split {split!r}. Only {', '.join(SPLITS)} or all are supported.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    scorer = open_scorer(model, provider=provider, threads=threads)
    loaded = load_samples(data, split, scorer.spec.modality, split_params or split_params_for(scorer.path))
    started = time.perf_counter()
    checks = _product_checks(scorer, references)
    scored = score_samples(scorer, loaded.samples, batch_size, workers, progress, tiling, checks)
    seconds = time.perf_counter() - started
    if not len(scored.indices):
        raise ValueError(
            f"None of the {len(loaded.samples)} images could be decoded: {scored.failures[0][1]}"
        )
    targets = np.array([loaded.samples[i].target for i in scored.indices])
    groups = _groups(loaded.samples, scored)
    metrics = compute_metrics(scored.scores, targets, groups=groups, thresholds=scorer.card_thresholds)
    out = Path(out_dir) if out_dir else default_eval_dir(scorer, data, split)
    out.mkdir(parents=True, exist_ok=True)
    result = _result_record(scorer, data, split, loaded, scored, metrics, seconds)
    result["tiling"] = {**asdict(tiling), "tiled_images": scored.tiled}
    result.update(open_set_result(scorer, loaded.samples, scored, tiling, references, ood, split))
    result["outputs"] = {
        "metrics_json": str(out / "metrics.json"),
        "predictions_csv": str(out / "predictions.csv"),
    }
    write_predictions(out / "predictions.csv", loaded.samples, scored)
    if report:
        path = write_html_report(out / "report.html", scorer, loaded, scored, result, worst)
        result["outputs"]["report_html"] = str(path)
    result = to_jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def open_set_result(
    scorer: Scorer,
    samples: list[Sample],
    scored: ScoredSet,
    tiling: TilingOptions,
    references: str | Path | None,
    ood: str | Path | None,
    split: str | None = "test",
) -> dict[str, Any]:
    """`open_set` (the gate on these images and on --ood) and `unseen` (--references) figures. Where the
    evaluated `split` holds validation images (val, or None: all) and the gate's bank holds them too
    (joined after its thresholds were chosen, training/open_set.py), the gate's figures on them say so:
    an image in the bank is no fair draw of a new one."""
    from verity.training import open_set_eval
    from verity.training.scoring import OnnxScorer

    if not isinstance(scorer, OnnxScorer):
        if references or ood:
            raise ValueError("--references and --ood need an exported model (model.onnx) with embeddings.")
        return {}
    result: dict[str, Any] = {}
    gate = scorer.engine.novelty_gate
    if gate is not None and scored.embeddings is not None:
        evaluated = open_set_eval.not_recognised_rate(scored.results, gate)
        in_bank = int((scorer.engine.card.novelty or {}).get("bank_validation_rows") or 0)
        if split in (None, "val") and in_bank:
            evaluated["validation_in_bank"] = in_bank
        result["open_set"] = {"evaluated": evaluated}
        if ood:
            result["open_set"]["ood"] = open_set_eval.ood_figures(scorer, ood, tiling)
    elif ood:
        raise ValueError(f"{scorer.path} has no novelty gate: export it with --bank-data to measure --ood.")
    if references:
        if scored.embeddings is None:
            raise ValueError(f"{scorer.path} has no embedding output: it cannot check references.")
        result["unseen"] = open_set_eval.unseen_figures(scorer, samples, scored)
    return result


def _product_checks(scorer: Scorer, references: str | Path | None) -> ProductChecks | None:
    """With --references, each image naming an enrolled product is checked against its references in
    the pipeline, as the server checks a request naming it (a model without embeddings: refused later)."""
    if references is None or "embedding" not in scorer.engine.output_names:
        return None
    from verity.inference.references.store import ReferenceStore
    from verity.training.open_set_eval import product_checks

    return product_checks(scorer.engine, ReferenceStore(Path(references)))


def _groups(samples: list[Sample], scored: ScoredSet) -> dict[str, list[Any]]:
    kept = [samples[i] for i in scored.indices]
    groups: dict[str, list[Any]] = {
        "product": [s.product for s in kept],
        "modality": [s.modality for s in kept],
    }
    if any(s.source for s in kept):
        groups["source"] = [s.source for s in kept]
    return groups


def _result_record(
    scorer: Scorer,
    data: str | Path,
    split: str | None,
    loaded: LoadedData,
    scored: ScoredSet,
    metrics: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """What metrics.json says about the model, the data and the run, beside the metrics."""
    return {
        "model": {
            "path": str(scorer.path or "in memory"),
            "kind": scorer.kind,
            "name": scorer.name,
            "version": scorer.version,
            "modality": scorer.spec.modality,
            "temperature": scorer.temperature,
            "thresholds": scorer.card_thresholds,
        },
        "data": {
            "source": str(data),
            "description": loaded.description,
            "split": split or "all",
            "n_images": len(loaded.samples),
            "n_evaluated": int(len(scored.indices)),
            "n_failed": len(scored.failures),
            "skipped_other_modality": loaded.skipped_other_modality,
            "failed": [{"path": str(loaded.samples[i].path), "error": e} for i, e in scored.failures[:50]],
            "notes": loaded.notes,
        },
        "metrics": metrics,
        "timing": {
            "seconds": seconds,
            "images_per_second": len(loaded.samples) / seconds if seconds else None,
        },
    }
