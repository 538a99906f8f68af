"""Evaluation of a model on a manifest split or a folder: scores, metrics, predictions and a report.

An ONNX model is evaluated through `inference.engine.OnnxEngine`, the server's own path, and every image
goes through `inference.tiling.load_for_scoring`, the server's own decoder and tiling rule (large X-ray
scans scored in tiles, `TilingOptions` defaults as the server's): the figures printed here are the
figures the service will show. A `model.pt` is evaluated in torch with the same decoder, on whole images.

Data: a manifest (JSONL, rows filtered by split), a folder holding a manifest.jsonl, or a folder laid out
as DIR/genuine/... and DIR/counterfeit/... or DIR/<split>/genuine/... (a subfolder below the label names
the product; label folders may have any name ingest accepts: real/, fake/, ..., see
datasets.rows.LABEL_SYNONYMS).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from verity.datasets.rows import MANIFEST_NAMES, assign_missing_splits, read_rows, split_folder_rows
from verity.inference.artifacts import resolve_model
from verity.inference.card import ModelCard, to_jsonable
from verity.inference.decode import DecodeError, read_image_bytes
from verity.inference.engine import OnnxEngine, calibrated_scores
from verity.inference.preprocess import load_for_model
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import ScoringInput, TilingOptions, load_for_scoring, score_scan
from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    LABELS,
    SPLITS,
    VERDICTS,
    verdict_codes,
    verdict_names,
)
from verity.training.metrics import compute_metrics

WORST_ERRORS = 12


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int  # 0 genuine, 1 counterfeit
    modality: str | None = None
    product: str | None = None
    source: str | None = None


@dataclass
class LoadedData:
    samples: list[Sample]
    description: str
    notes: list[str] = field(default_factory=list)
    skipped_other_modality: int = 0


class Scorer(Protocol):
    """What evaluation needs from a model, whichever runtime runs it."""

    kind: str
    path: Path | None  # None for an in-memory model
    spec: PreprocessSpec
    name: str
    version: str
    temperature: float
    thresholds: dict[str, Any] | None

    def logits_and_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


class OnnxScorer:
    """An exported model run by the server's engine."""

    kind = "onnx"

    def __init__(self, path: Path, provider: str | None = None, threads: int = 1) -> None:
        self.engine = OnnxEngine(path, provider=provider, intra_op_threads=threads, warmup=False)
        self.spec = self.engine.spec
        self.name, self.version = self.engine.name, self.engine.version
        self.temperature = self.engine.temperature
        self.thresholds: dict[str, Any] | None = dict(self.engine.card.thresholds)
        self.path: Path | None = path

    def logits_and_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.engine.run(batch)
        cams = outputs.get("cam")
        return outputs["logits"], None if cams is None else cams[:, 1] - cams[:, 0]


class ModuleScorer:
    """An in-memory torch model (e.g. the trainer's, before export); run in eval mode, mode restored."""

    kind = "torch"

    def __init__(
        self,
        model: Any,
        spec: PreprocessSpec,
        name: str = "model",
        version: str = "unversioned",
        temperature: float = 1.0,
        thresholds: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self.model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        self.spec, self.name, self.version = spec, name, version
        self.temperature = float(temperature)
        self.thresholds = dict(thresholds) if thresholds and "alarm" in thresholds else None
        self.path: Path | None = path

    def logits_and_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits, cams = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        finally:
            self.model.train(was_training)
        return logits.float().cpu().numpy(), (cams[:, 1] - cams[:, 0]).float().cpu().numpy()


class TorchScorer(ModuleScorer):
    """A model.pt rebuilt through the model registry; figures before export."""

    def __init__(self, path: Path) -> None:
        from verity.training.checkpoint import checkpoint_spec, load_checkpoint, model_from_checkpoint

        checkpoint = load_checkpoint(path)
        card = ModelCard.from_dict(checkpoint["card"]) if checkpoint.get("card") else None
        config = checkpoint.get("config") or {}
        calibration = checkpoint.get("calibration") or {}
        super().__init__(
            model_from_checkpoint(checkpoint),
            checkpoint_spec(checkpoint),
            name=card.name if card else str(config.get("name") or path.parent.parent.name or "model"),
            version=card.version if card else str(config.get("version") or path.parent.name or "unversioned"),
            temperature=float(calibration.get("temperature", 1.0)) if isinstance(calibration, dict) else 1.0,
            thresholds=checkpoint.get("thresholds"),
            path=path,
        )


def open_scorer(model: str | Path | Scorer, provider: str | None = None, threads: int = 1) -> Scorer:
    """Opens a model for scoring: ONNX through OnnxEngine, a checkpoint through the model registry.

    A Scorer (e.g. ModuleScorer around the trainer's model) is returned as it is.
    """
    if not isinstance(model, str | Path):
        return model
    path = resolve_model(model)
    if path.suffix == ".onnx":
        return OnnxScorer(path, provider=provider, threads=threads)
    if provider:
        raise ValueError("--provider applies to ONNX models only; a model.pt runs in torch on the CPU.")
    return TorchScorer(path)


@dataclass(frozen=True)
class SplitParams:
    """How `verity train` splits rows that have no split; evaluation must reproduce it exactly."""

    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SPLIT_SEED


def split_params_for(model_path: Path | None) -> SplitParams:
    """The split settings of the run that made the model: its config.yaml (or model.pt config), else
    the training defaults."""
    if model_path is None:
        return SplitParams()
    config: dict[str, Any] = {}
    config_yaml = model_path.parent / "config.yaml"
    if config_yaml.is_file():
        import yaml

        config = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
    elif model_path.suffix == ".pt":
        from verity.training.checkpoint import load_checkpoint

        config = load_checkpoint(model_path).get("config") or {}
    defaults = SplitParams()
    return SplitParams(
        val_fraction=float(config.get("val_fraction", defaults.val_fraction)),
        test_fraction=float(config.get("test_fraction", defaults.test_fraction)),
        seed=int(config.get("seed", defaults.seed)),
    )


def load_samples(
    data: str | Path, split: str | None, modality: str, params: SplitParams | None = None
) -> LoadedData:
    """Reads the evaluation set as `verity train` reads its data (`datasets.rows`): a manifest, a folder
    with manifest.jsonl, or a labelled folder DIR/genuine, DIR/counterfeit. Rows without a split get the
    same grouped split training gave them (`params`), so `--split test` never holds a training image.
    DIR/<split>/<label>/... folders are read as they are split.
    """
    params = params or SplitParams()
    path = Path(data)
    if path.is_dir() and not any((path / name).is_file() for name in MANIFEST_NAMES):
        folders = split_folder_rows(path, split, modality)
        if folders is not None:
            samples = [Sample(Path(row.path), row.target, row.modality, row.product, None) for row in folders]
            return LoadedData(samples, f"folder {path / split if split else path}")
    rows, description, skipped = read_rows(data, modality)
    notes = [f"Skipped {skipped} rows of another modality than the model's ({modality})."] if skipped else []
    if any(row.split is None for row in rows):
        rows = assign_missing_splits(rows, params.val_fraction, params.test_fraction, params.seed)
        notes.insert(
            0,
            "Rows without a split got the grouped split `verity train` gives them "
            f"(val {params.val_fraction:g}, test {params.test_fraction:g}, seed {params.seed}); "
            "--split all evaluates every image.",
        )
    if split:
        chosen = [row for row in rows if row.split == split]
        if not chosen:
            present = ", ".join(sorted({str(row.split) for row in rows}))
            raise ValueError(f"{data} has no {modality} rows in split {split!r}. Splits present: {present}.")
        rows = chosen
    samples = [Sample(Path(row.path), row.target, row.modality, row.product, row.source) for row in rows]
    where = f"split {split!r} of " if split else ""
    return LoadedData(samples, f"{where}{description}", notes=notes, skipped_other_modality=skipped)


def _load_one(sample: Sample, spec: PreprocessSpec, tiling: TilingOptions) -> ScoringInput | str:
    try:
        return load_for_scoring(read_image_bytes(sample.path), spec, tiling)
    except (DecodeError, OSError) as error:
        return f"{type(error).__name__}: {error}"


@dataclass
class DecodedChunk:
    """One chunk of samples, decoded: images scored whole in one batch, scans to tile, failures."""

    indices: list[int]  # of the images in `batch`
    batch: np.ndarray | None
    scans: list[tuple[int, np.ndarray]]  # (index, native pixels) of the images the tiling rule tiles
    failures: list[tuple[int, str]]


def decoded_batches(
    samples: list[Sample], spec: PreprocessSpec, batch_size: int, workers: int, tiling: TilingOptions
) -> Iterator[DecodedChunk]:
    """Yields each chunk decoded; the next chunk decodes while the current one is scored."""
    chunks = [
        list(range(start, min(start + batch_size, len(samples))))
        for start in range(0, len(samples), batch_size)
    ]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(chunk: list[int]) -> list[Future]:
            return [pool.submit(_load_one, samples[i], spec, tiling) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        for number, chunk in enumerate(chunks):
            current = pending
            pending = submit(chunks[number + 1]) if number + 1 < len(chunks) else []
            loaded = list(zip(chunk, [future.result() for future in current], strict=True))
            decoded = [(i, x) for i, x in loaded if isinstance(x, ScoringInput)]
            whole = [(i, x.model_input) for i, x in decoded if x.model_input is not None]
            yield DecodedChunk(
                indices=[i for i, _ in whole],
                batch=np.stack([array for _, array in whole]) if whole else None,
                scans=[(i, x.pixels) for i, x in decoded if x.pixels is not None],
                failures=[(i, message) for i, message in loaded if isinstance(message, str)],
            )


@dataclass
class ScoredSet:
    indices: np.ndarray  # into the samples list, for the images that decoded
    logits: np.ndarray
    scores: np.ndarray
    cams: list[np.ndarray | None]
    failures: list[tuple[int, str]]
    tiled: int = 0  # images scored in tiles (`inference.tiling`)


def _score_scans(
    engine: OnnxEngine, scans: list[tuple[int, np.ndarray]], tiling: TilingOptions
) -> list[tuple[int, np.ndarray, float, np.ndarray | None]]:
    """(index, logits, score, cam) of each scan, tiled as the server tiles it (`score_scan`); the logits
    are those equivalent to the scan score, and the report shows no CAM for it."""
    rows: list[tuple[int, np.ndarray, float, np.ndarray | None]] = []
    for index, pixels in scans:
        scan = score_scan(pixels, engine, tiling)
        rows.append((index, np.asarray(scan.logits), scan.score, None))
    return rows


def score_samples(
    scorer: Scorer,
    samples: list[Sample],
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    tiling: TilingOptions = TilingOptions(),
) -> ScoredSet:
    """Runs every sample through the model in batches, with a progress bar; unreadable images are listed.
    Images the tiling rule tiles (`inference.tiling.should_tile`: large X-ray scans) are scored as the
    server scores them, in tiles through the engine; a torch model has no engine and sees every image
    whole, as it did in training."""
    from verity.datasets.progress import progress_bar

    if not isinstance(scorer, OnnxScorer):
        tiling = replace(tiling, mode="off")
    rows: list[tuple[int, np.ndarray, float, np.ndarray | None]] = []
    failures: list[tuple[int, str]] = []
    tiled = 0
    bar = progress_bar(progress, total=len(samples), unit="img", desc="evaluating", leave=False)
    for chunk in decoded_batches(samples, scorer.spec, batch_size, workers, tiling):
        failures += chunk.failures
        if chunk.batch is not None:
            logits, cams = scorer.logits_and_cams(chunk.batch)
            logits = np.asarray(logits, dtype=np.float64)
            scores = calibrated_scores(logits, scorer.temperature)
            cam_list = list(cams) if cams is not None else [None] * len(chunk.indices)
            rows += zip(chunk.indices, logits, scores.tolist(), cam_list, strict=True)
        if chunk.scans:
            assert isinstance(scorer, OnnxScorer)  # tiling is off for any other scorer
            rows += _score_scans(scorer.engine, chunk.scans, tiling)
            tiled += len(chunk.scans)
        bar.update(len(chunk.indices) + len(chunk.scans) + len(chunk.failures))
    bar.close()
    rows.sort(key=lambda row: row[0])
    return ScoredSet(
        indices=np.array([row[0] for row in rows], dtype=np.int64),
        logits=np.array([row[1] for row in rows], dtype=np.float64).reshape(-1, 2),
        scores=np.array([row[2] for row in rows], dtype=np.float64),
        cams=[row[3] for row in rows],
        failures=failures,
        tiled=tiled,
    )


def worst_errors(scores: np.ndarray, targets: np.ndarray, count: int = WORST_ERRORS) -> list[int]:
    """Positions of the most confident mistakes: largest |target - score|, wrong side of 0.5 first."""
    distance = np.abs(targets - scores)
    order = np.argsort(-distance, kind="mergesort")
    return [int(i) for i in order[:count] if distance[i] > 0.5] or [int(i) for i in order[: min(count, 4)]]


def _write_predictions(
    path: Path, samples: list[Sample], scored: ScoredSet, thresholds: dict[str, Any] | None
) -> None:
    alarm, clear = (thresholds["alarm"], thresholds["clear"]) if thresholds else (0.5, 0.5)
    names = verdict_names(verdict_codes(scored.scores, alarm, clear))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "label", "modality", "product", "score", "verdict", "logit_genuine", "logit_counterfeit"]
        )
        for position, index in enumerate(scored.indices):
            sample = samples[index]
            writer.writerow(
                [
                    str(sample.path),
                    LABELS[sample.target],
                    sample.modality or "",
                    sample.product or "",
                    f"{scored.scores[position]:.6f}",
                    names[position],
                    f"{scored.logits[position, 0]:.6f}",
                    f"{scored.logits[position, 1]:.6f}",
                ]
            )


def _groups(samples: list[Sample], scored: ScoredSet) -> dict[str, list[Any]]:
    kept = [samples[i] for i in scored.indices]
    groups: dict[str, list[Any]] = {
        "product": [s.product for s in kept],
        "modality": [s.modality for s in kept],
    }
    if any(s.source for s in kept):
        groups["source"] = [s.source for s in kept]
    return groups


def _report_examples(
    samples: list[Sample],
    scored: ScoredSet,
    spec: PreprocessSpec,
    thresholds: dict[str, Any] | None,
    count: int,
) -> list[dict[str, Any]]:
    """The worst errors with their model input (re-decoded: only a dozen) and their CAM."""
    targets = np.array([samples[i].target for i in scored.indices])
    alarm, clear = (thresholds["alarm"], thresholds["clear"]) if thresholds else (0.5, 0.5)
    examples = []
    for position in worst_errors(scored.scores, targets, count):
        sample = samples[scored.indices[position]]
        code = int(verdict_codes(scored.scores[position], alarm, clear))
        examples.append(
            {
                "image": load_for_model(sample.path, spec),
                "cam": scored.cams[position],
                "score": float(scored.scores[position]),
                "label": LABELS[sample.target],
                "verdict": VERDICTS[code],
                "caption": f"{sample.path.name}" + (f" ({sample.product})" if sample.product else ""),
            }
        )
    return examples


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
) -> dict[str, Any]:
    """Evaluates a model on a data set; writes metrics.json, predictions.csv and report.html to `out_dir`.

    `model` is a path (see `inference.artifacts.resolve_model`) or a ready Scorer, e.g. `ModuleScorer`
    around the trainer's model. `split` None (or "all") evaluates every row. Rows without a split are split
    as the model's training run split them (`split_params`, default: read from the run's config.yaml or
    model.pt). Returns the result in metrics.json.
    """
    if split == "all":
        split = None
    if split is not None and split not in SPLITS:
        raise ValueError(f"Invalid split {split!r}. Only {', '.join(SPLITS)} or all are supported.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    scorer = open_scorer(model, provider=provider, threads=threads)
    loaded = load_samples(data, split, scorer.spec.modality, split_params or split_params_for(scorer.path))
    started = time.perf_counter()
    scored = score_samples(scorer, loaded.samples, batch_size, workers, progress, tiling)
    seconds = time.perf_counter() - started
    if not len(scored.indices):
        raise ValueError(
            f"None of the {len(loaded.samples)} images could be decoded: {scored.failures[0][1]}"
        )
    targets = np.array([loaded.samples[i].target for i in scored.indices])
    groups = _groups(loaded.samples, scored)
    metrics = compute_metrics(scored.scores, targets, groups=groups, thresholds=scorer.thresholds)
    out = (
        Path(out_dir)
        if out_dir
        else Path("runs") / "eval" / f"{scorer.name}-{scorer.version}-{split or 'all'}"
    )
    out.mkdir(parents=True, exist_ok=True)
    result = _result_record(scorer, data, split, loaded, scored, metrics, seconds)
    result["tiling"] = {**asdict(tiling), "tiled_images": scored.tiled}
    result["outputs"] = {
        "metrics_json": str(out / "metrics.json"),
        "predictions_csv": str(out / "predictions.csv"),
    }
    _write_predictions(out / "predictions.csv", loaded.samples, scored, scorer.thresholds)
    if report:
        from verity.training.report import write_report

        examples = _report_examples(loaded.samples, scored, scorer.spec, scorer.thresholds, worst)
        details = {"model": result["model"], "data": result["data"]}
        title = f"{scorer.name} {scorer.version} on {loaded.description}"
        path = write_report(out / "report.html", metrics, scored.scores, targets, examples, title, details)
        result["outputs"]["report_html"] = str(path)
    result = to_jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


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
            "thresholds": scorer.thresholds,
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
    lines += [f"  note: {note}" for note in data["notes"]]
    lines += [f"  unreadable: {entry['path']}: {entry['error']}" for entry in data["failed"][:5]]
    lines += [f"  wrote {path}" for path in result["outputs"].values()]
    return "\n".join(lines)
