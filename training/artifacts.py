"""What a finished run writes: calibration and thresholds chosen on validation, the test evaluation
(metrics.json, predictions.csv, report.html), data.jsonl, model.pt, card.json and model.onnx.

The weak-run guard (training/guard.py) runs before anything is written, so a run that did not learn
leaves no model behind unless --allow-weak says otherwise (its card then says it is weak).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verity.datasets.manifest import ManifestRow, write_manifest
from verity.datasets.rows import split_counts
from verity.datasets.torch_dataset import ManifestDataset
from verity.inference.card import ModelCard
from verity.training.checkpoint import BEST, FINAL, checkpoint_dict, code_version, save_atomic, unwrap
from verity.training.run import Run, worker_count


@dataclass(frozen=True)
class Calibration:
    """What validation decides: the temperature, the thresholds and the val figures at them."""

    temperature: float
    thresholds: dict[str, Any]
    val_metrics: dict[str, Any]
    weak_warnings: list[str]


def _groups(rows: list[ManifestRow]) -> dict[str, list[str]]:
    return {"product": [row.product or "unknown" for row in rows]}


def guard_run(
    run: Run, val_scores: np.ndarray, val_targets: np.ndarray, temperature: float, thresholds: dict[str, Any]
) -> list[str]:
    """The weak-run guard (training/guard.py): raises WeakRunError before anything is written."""
    from verity.training.guard import check_run, weak_signs
    from verity.training.metrics import roc_auc

    refuse, report = weak_signs(
        roc_auc(val_scores, val_targets),
        val_targets,
        thresholds["val_uncertain_rate"],
        temperature,
        run.state.history,
    )
    warnings = check_run(refuse, report, run.config.allow_weak)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    return warnings


def calibrate(run: Run, val_logits: np.ndarray, val_targets: np.ndarray) -> Calibration:
    """Temperature and thresholds for the configured target rates, then the weak-run guard."""
    from verity.inference.engine import calibrated_scores
    from verity.training.calibrate import choose_thresholds, fit_temperature
    from verity.training.metrics import compute_metrics

    config = run.config
    temperature = fit_temperature(val_logits, val_targets)
    val_scores = calibrated_scores(val_logits, temperature)
    thresholds = choose_thresholds(
        val_scores, val_targets, config.target_false_alarm_rate, config.target_miss_rate
    )
    weak_warnings = guard_run(run, val_scores, val_targets, temperature, thresholds)
    val_metrics = compute_metrics(val_scores, val_targets, _groups(run.split("val")), thresholds)
    return Calibration(temperature, thresholds, val_metrics, weak_warnings)


def evaluate_test(run: Run, data_manifest: Path, calibration: Calibration) -> dict[str, Any]:
    """The test split through `verity eval`'s own path, with the calibrated model still in memory."""
    from verity.training.evaluate import evaluate
    from verity.training.scoring import ModuleScorer

    config = run.config
    scorer = ModuleScorer(
        unwrap(run.model), run.spec, config.name, config.version, calibration.temperature,
        calibration.thresholds, warnings=calibration_warnings(run, calibration), backbone=config.model,
    )  # fmt: skip
    return evaluate(
        scorer,
        data_manifest,
        split="test",
        out_dir=run.run_dir,
        batch_size=config.batch_size * 2,
        workers=worker_count(config) or 1,
        progress=config.progress,
        report=config.report,
    )


def calibration_warnings(run: Run, calibration: Calibration) -> tuple[str, ...]:
    """The card's warnings: the validation-size ones, the validation-cases ones and the weak-run guard's."""
    from verity.training.calibrate import card_warnings, validation_group_warnings

    return (
        *card_warnings(calibration.thresholds),
        *validation_group_warnings(run.rows),
        *calibration.weak_warnings,
    )


def make_card(run: Run, calibration: Calibration, metrics: dict[str, Any]) -> ModelCard:
    """The run's model card, with the warnings of `calibration_warnings`."""

    config, spec = run.config, run.spec
    return ModelCard(
        name=config.name,
        version=config.version,
        modality=spec.modality,
        backbone=config.model,
        spec=spec,
        thresholds=calibration.thresholds,
        temperature=calibration.temperature,
        metrics=metrics,
        data_fingerprint=run.fingerprint,
        data_counts=split_counts(run.rows),
        code_version=code_version(),
        warnings=calibration_warnings(run, calibration),
        embedding_dim=unwrap(run.model).embedding_dim,
        lineage=run.lineage,
    )


def write_model(run: Run, best_state: dict[str, torch.Tensor], card: ModelCard) -> dict[str, Any]:
    """model.pt (best weights with the card's calibration and thresholds), card.json and model.onnx."""
    from verity.training.export import ExportParityError, export_onnx

    run_dir, card_dict = run.run_dir, card.to_dict()
    checkpoint = checkpoint_dict(run, best_state, with_optimizer=False)
    checkpoint.update(
        metrics=card_dict["metrics"],
        thresholds=card_dict["thresholds"],
        calibration=card_dict["calibration"],
        card=card_dict,
        epoch=run.state.epoch,
    )
    outputs: dict[str, Any] = {"model_pt": str(save_atomic(checkpoint, run_dir / FINAL))}
    (run_dir / "card.json").write_text(card.to_json(indent=2) + "\n", encoding="utf-8")
    outputs["card_json"] = str(run_dir / "card.json")
    if run.config.export:
        sample = ManifestDataset(run.split("val")[:1], run.spec)[0][0].numpy()[None]
        model_onnx = run_dir / "model.onnx"
        try:
            outputs["export"] = export_onnx(unwrap(run.model), run.spec, card, model_onnx, sample=sample)
        except ExportParityError as error:  # a gate never throws the run away: model.pt and card stay
            outputs["export_error"] = f"{error} {retry_export_hint(run_dir)}"
            return outputs
        outputs["model_onnx"] = outputs["export"]["path"]
        if outputs["export"]["embedding_dim"] is not None:
            outputs["novelty"] = _open_set(run, model_onnx, card, outputs["export"]["embedding_dim"])
    return outputs


def retry_export_hint(run_dir: Path) -> str:
    """What to run when the export of a finished run failed: its model.pt, card and report are kept."""
    return (
        f"The run is kept (model.pt, card.json and the report in {run_dir}). Export it again with: "
        f"verity export --checkpoint {run_dir / FINAL} --bank-data {run_dir / 'data.jsonl'} "
        "(add --exporter dynamo to try the other exporter)."
    )


def _open_set(run: Run, model_onnx: Path, card: ModelCard, embedding_dim: int) -> dict[str, Any]:
    """The exported model's reference bank (train split) and novelty gate (val split), with card.json
    rewritten to record them as the ONNX metadata does."""
    from dataclasses import replace

    from verity.inference.gate_record import card_with_gate
    from verity.training.open_set import build_open_set

    novelty = build_open_set(model_onnx, run.run_dir / "data.jsonl")
    card = card_with_gate(replace(card, embedding_dim=embedding_dim), novelty)
    (run.run_dir / "card.json").write_text(card.to_json(indent=2) + "\n", encoding="utf-8")
    return novelty


def finish(
    run: Run, best_state: dict[str, torch.Tensor], val_logits: np.ndarray, val_targets: np.ndarray
) -> dict[str, Any]:
    """Calibrates and chooses thresholds on validation, evaluates on test, writes every artifact.

    `run.model` holds the best weights (`best_state`), whose validation logits are `val_logits`.
    Returns {"run_dir", "model_pt", "card_json", "model_onnx", "report_html", "metrics", ...}.
    """
    calibration = calibrate(run, val_logits, val_targets)
    metrics: dict[str, Any] = {"val": calibration.val_metrics, "test": None}
    data_manifest = run.run_dir / "data.jsonl"  # the exact rows and splits used, for `verity eval`
    write_manifest(data_manifest, run.rows)
    outputs: dict[str, Any] = {"run_dir": str(run.run_dir), "data_manifest": str(data_manifest)}
    if run.split("test"):
        result = evaluate_test(run, data_manifest, calibration)
        metrics["test"] = result["metrics"]
        outputs["report_html"] = result["outputs"].get("report_html")
        outputs["test_metrics_json"] = result["outputs"]["metrics_json"]
    card = make_card(run, calibration, metrics)
    outputs.update(write_model(run, best_state, card))
    (run.run_dir / BEST).unlink(missing_ok=True)  # model.pt now holds the best weights, with calibration
    outputs.update(
        metrics=metrics, thresholds=calibration.thresholds, temperature=calibration.temperature, card=card
    )
    return outputs
