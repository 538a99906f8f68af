"""Scoring an evaluation set: the model behind a `Scorer` (ONNX through the server's engine, or torch),
and every sample through the scoring pipeline (`inference.pipeline`), decoded and predicted in batches.

An ONNX model runs in `inference.engine.OnnxEngine`, the server's own engine, and every image goes through
the pipeline the server runs: its decoder and tiling rule (large X-ray scans scored in tiles,
`TilingOptions` defaults as the server's), the open-set checks and the one verdict rule, so the figures and
verdicts are those the service will show. A `model.pt` runs in torch (`ModuleScorer`, itself an `Engine`)
with the same decoder, on whole images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from verity.inference.artifacts import resolve_model
from verity.inference.card import ModelCard
from verity.inference.decode import read_image_bytes
from verity.inference.decode_limits import DecodeError
from verity.inference.engine import Engine, OnnxEngine, Prediction, Thresholds, calibrated_scores
from verity.inference.heatmap import feature_alignment
from verity.inference.open_set import NoveltyGate
from verity.inference.pipeline import ProductCheck, Scored, ScoringOptions, Upload, prepare, score
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import TilingOptions
from verity.training.eval_samples import Sample

# The one threshold a model without calibrated thresholds is judged by (as `metrics.compute_metrics`).
UNCALIBRATED_THRESHOLD = 0.5


class Scorer(Protocol):
    """What evaluation needs from a model, whichever runtime runs it: the `Engine` the pipeline scores
    with, and what the report says of it."""

    kind: str
    path: Path | None  # None for an in-memory model
    spec: PreprocessSpec
    name: str
    version: str
    temperature: float
    card_thresholds: dict[str, Any] | None  # the card's record ({"alarm", "clear", ...}); None: uncalibrated
    # What a reader must know before trusting the model (the card's warnings: weak run, small validation).
    card_warnings: tuple[str, ...]

    @property
    def engine(self) -> Engine: ...


class OnnxScorer:
    """An exported model run by the server's engine."""

    kind = "onnx"

    def __init__(self, path: Path, provider: str | None = None, threads: int = 1) -> None:
        self.engine = OnnxEngine(path, provider=provider, intra_op_threads=threads, warmup=False)
        self.spec = self.engine.spec
        self.name, self.version = self.engine.name, self.engine.version
        self.temperature = self.engine.temperature
        self.card_thresholds: dict[str, Any] | None = dict(self.engine.card.thresholds)
        self.card_warnings = tuple(self.engine.card.warnings or ())
        self.path: Path | None = path


class ModuleScorer:
    """An in-memory torch model (e.g. the trainer's, before export), run in eval mode with its mode
    restored. It is an `Engine`: no novelty gate, no embedding, thresholds from its calibration."""

    kind = "torch"
    novelty_gate: NoveltyGate | None = None
    precision = "fp32"

    def __init__(
        self,
        model: Any,
        spec: PreprocessSpec,
        name: str = "model",
        version: str = "unversioned",
        temperature: float = 1.0,
        thresholds: dict[str, Any] | None = None,
        path: Path | None = None,
        warnings: tuple[str, ...] = (),
        backbone: str | None = None,
    ) -> None:
        self.model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        self.feature_alignment = feature_alignment(backbone)  # where its CAM lies over the input
        self.card_warnings = tuple(warnings)
        self.spec, self.name, self.version = spec, name, version
        self.temperature = float(temperature)
        self.card_thresholds = dict(thresholds) if thresholds and "alarm" in thresholds else None
        record = self.card_thresholds
        self.thresholds = (
            Thresholds(float(record["alarm"]), float(record["clear"]))
            if record is not None
            else Thresholds(UNCALIBRATED_THRESHOLD, UNCALIBRATED_THRESHOLD)
        )
        self.path: Path | None = path
        self.output_names = ["logits", "cam"]

    @property
    def engine(self) -> Engine:
        return self

    def logits_and_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        """Calibrated scores as the engine computes them; a torch model in training has no embedding."""
        batch = np.stack(inputs) if isinstance(inputs, list) else inputs
        logits, cams = self.logits_and_cams(batch)
        logits = np.asarray(logits, dtype=np.float64)
        scores = calibrated_scores(logits, self.temperature)
        return [
            Prediction(float(value), tuple(float(x) for x in row), cam if with_cam else None)
            for value, row, cam in zip(scores, logits, cams, strict=True)
        ]


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
            warnings=tuple(card.warnings or ()) if card else (),
            backbone=str(checkpoint["model_name"]),
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


def _load_one(sample: Sample, spec: PreprocessSpec, tiling: TilingOptions) -> Upload | str:
    try:
        return prepare(read_image_bytes(sample.path), spec, tiling)
    except (DecodeError, OSError) as error:
        return f"{type(error).__name__}: {error}"


@dataclass
class DecodedChunk:
    """One chunk of samples, decoded (each by the pipeline's `prepare`), and those that failed."""

    uploads: list[tuple[int, Upload]]  # (index into the samples, the decoded image)
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
            yield DecodedChunk(
                uploads=[(i, x) for i, x in loaded if isinstance(x, Upload)],
                failures=[(i, x) for i, x in loaded if isinstance(x, str)],
            )


@dataclass
class ScoredSet:
    indices: np.ndarray  # into the samples list, for the images that decoded
    results: list[Scored]  # the pipeline's result for each, in the order of `indices`
    failures: list[tuple[int, str]]
    tiled: int = 0  # images scored in tiles (`inference.tiling`)

    @property
    def scores(self) -> np.ndarray:
        return np.array([result.score for result in self.results], dtype=np.float64)

    @property
    def logits(self) -> np.ndarray:
        """N x 2; a tiled scan's are those equivalent to its score (`ScanResult.logits`)."""
        return np.array([result.output.logits for result in self.results], dtype=np.float64).reshape(-1, 2)

    @property
    def cams(self) -> list[np.ndarray | None]:
        """Each image's CAM; none for a tiled scan (the report shows none for it)."""
        return [None if result.scan is not None else result.output.cam for result in self.results]

    @property
    def embeddings(self) -> np.ndarray | None:
        """N x D unit rows as the server embeds each image, or None for a model without the output."""
        embedded = [result.output.embedding for result in self.results]
        if not embedded or any(e is None for e in embedded):
            return None
        return np.stack(embedded).astype(np.float32)  # type: ignore[arg-type]

    @property
    def patches(self) -> list[np.ndarray | None]:
        return [result.output.patches for result in self.results]

    @property
    def shorter_sides(self) -> np.ndarray:
        """Each image's shorter side in pixels, for the training envelope and the gate's `min_side`."""
        return np.array([result.upload.decoded.shorter_side for result in self.results], dtype=np.int64)


# A sample -> the check against its product's references, or None (no product, or none enrolled).
ProductChecks = Callable[[Sample], ProductCheck | None]


def _score_chunk(
    engine: Engine,
    samples: list[Sample],
    chunk: DecodedChunk,
    options: ScoringOptions,
    checks: ProductChecks | None,
) -> list[tuple[int, Scored]]:
    """Every decoded image of a chunk through the pipeline; the images scored whole are predicted in
    one batch first, and that batch's outputs are the pipeline's `predict`."""
    decoded = [upload.decoded for _, upload in chunk.uploads]
    whole = [image.model_input for image in decoded if image.model_input is not None]
    outputs = iter(engine.predict(np.stack(whole), with_cam=True) if whole else [])

    def predict(model_input: np.ndarray) -> Prediction:
        return next(outputs)  # the pipeline asks in chunk order, once per image scored whole

    return [
        (index, score(upload, engine, predict, options, checks(samples[index]) if checks else None))
        for index, upload in chunk.uploads
    ]


def score_samples(
    scorer: Scorer,
    samples: list[Sample],
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    tiling: TilingOptions = TilingOptions(),
    checks: ProductChecks | None = None,
) -> ScoredSet:
    """Runs every sample through the pipeline in batches, with a progress bar; unreadable images are
    listed. Images the tiling rule tiles (`inference.tiling.should_tile`: large X-ray scans) are scored as
    the server scores them, in tiles; a torch model sees every image whole, as it did in training.
    `checks` gives each sample its product's reference check (`verity eval --references`)."""
    from verity.datasets.progress import progress_bar

    if not isinstance(scorer, OnnxScorer):
        tiling = replace(tiling, mode="off")
    options = ScoringOptions(tiling)
    rows: list[tuple[int, Scored]] = []
    failures: list[tuple[int, str]] = []
    bar = progress_bar(progress, total=len(samples), unit="img", desc="evaluating", leave=False)
    for chunk in decoded_batches(samples, scorer.spec, batch_size, workers, tiling):
        failures += chunk.failures
        rows += _score_chunk(scorer.engine, samples, chunk, options, checks)
        bar.update(len(chunk.uploads) + len(chunk.failures))
    bar.close()
    rows.sort(key=lambda row: row[0])
    return ScoredSet(
        indices=np.array([index for index, _ in rows], dtype=np.int64),
        results=[result for _, result in rows],
        failures=failures,
        tiled=sum(result.scan is not None for _, result in rows),
    )
