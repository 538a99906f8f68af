"""Scoring an evaluation set: the model behind a `Scorer` (ONNX through the server's engine, or torch),
and every sample decoded and scored in batches.

An ONNX model runs in `inference.engine.OnnxEngine`, the server's own path, and every image goes through
`inference.tiling.load_for_scoring`, the server's own decoder and tiling rule (large X-ray scans scored in
tiles, `TilingOptions` defaults as the server's): the figures are the figures the service will show. A
`model.pt` runs in torch with the same decoder, on whole images.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from verity.inference.artifacts import resolve_model
from verity.inference.bank import unit_rows
from verity.inference.card import ModelCard
from verity.inference.decode import DecodeError, read_image_bytes
from verity.inference.engine import OnnxEngine, calibrated_scores
from verity.inference.patch_check import unit_patches
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import ScoringInput, TilingOptions, load_for_scoring, score_scan
from verity.training.eval_samples import Sample


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

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(logits, cams, embeddings or None) of one batch."""
        ...

    def patches(self) -> list[np.ndarray] | None:
        """The last batch's local features (L x C unit rows each), or None for a model without them."""
        ...


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
        self._patches: list[np.ndarray] | None = None

    def logits_and_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits, cams, _ = self.outputs(batch)
        return logits, cams

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Logits, CAMs and the embeddings renormalised as the engine serves them (None without)."""
        outputs = self.engine.run(batch)
        cams = outputs.get("cam")
        embeddings = unit_rows(outputs["embedding"]) if "embedding" in outputs else None
        maps = outputs.get("patches")
        self._patches = None if maps is None else [unit_patches(m) for m in maps]
        return outputs["logits"], None if cams is None else cams[:, 1] - cams[:, 0], embeddings

    def patches(self) -> list[np.ndarray] | None:
        return self._patches


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

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Logits and CAMs; a torch model in training returns no embedding."""
        logits, cams = self.logits_and_cams(batch)
        return logits, cams, None

    def patches(self) -> list[np.ndarray] | None:
        return None


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
    sides: dict[int, int]  # index -> the decoded image's shorter side (the training envelope)


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
                sides={i: x.shorter_side for i, x in decoded},
            )


@dataclass
class ScoredSet:
    indices: np.ndarray  # into the samples list, for the images that decoded
    logits: np.ndarray
    scores: np.ndarray
    cams: list[np.ndarray | None]
    failures: list[tuple[int, str]]
    tiled: int = 0  # images scored in tiles (`inference.tiling`)
    # N x D unit rows as the server embeds each image (a tiled scan: `open_set.scan_embedding`), or None
    # for a model without an embedding output.
    embeddings: np.ndarray | None = None
    # Each image's local features (L x C unit rows), kept only when asked for (`keep_patches`).
    patches: list[np.ndarray | None] | None = None
    # Each image's shorter side in pixels, for the training envelope
    # (`inference.open_set.outside_envelope`) and the gate's `min_side`.
    shorter_sides: np.ndarray | None = None


# index, logits, score, cam, embedding, patches
Row = tuple[int, np.ndarray, float, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _score_scans(engine: OnnxEngine, scans: list[tuple[int, np.ndarray]], tiling: TilingOptions) -> list[Row]:
    """(index, logits, score, cam, embedding) of each scan, tiled as the server tiles it (`score_scan`);
    the logits are those equivalent to the scan score, and the report shows no CAM for it."""
    rows: list[Row] = []
    for index, pixels in scans:
        scan = score_scan(pixels, engine, tiling)
        prediction = scan.prediction
        logits = np.asarray(scan.logits)
        rows.append((index, logits, scan.score, None, prediction.embedding, prediction.patches))
    return rows


def score_samples(
    scorer: Scorer,
    samples: list[Sample],
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    tiling: TilingOptions = TilingOptions(),
    keep_patches: bool = False,
) -> ScoredSet:
    """Runs every sample through the model in batches, with a progress bar; unreadable images are listed.
    Images the tiling rule tiles (`inference.tiling.should_tile`: large X-ray scans) are scored as the
    server scores them, in tiles through the engine; a torch model has no engine and sees every image
    whole, as it did in training."""
    from verity.datasets.progress import progress_bar

    if not isinstance(scorer, OnnxScorer):
        tiling = replace(tiling, mode="off")
    rows: list[Row] = []
    failures: list[tuple[int, str]] = []
    tiled = 0
    sides: dict[int, int] = {}
    bar = progress_bar(progress, total=len(samples), unit="img", desc="evaluating", leave=False)
    for chunk in decoded_batches(samples, scorer.spec, batch_size, workers, tiling):
        failures += chunk.failures
        sides.update(chunk.sides)
        if chunk.batch is not None:
            logits, cams, embeddings = scorer.outputs(chunk.batch)
            logits = np.asarray(logits, dtype=np.float64)
            scores = calibrated_scores(logits, scorer.temperature)
            cam_list = list(cams) if cams is not None else [None] * len(chunk.indices)
            emb_list = list(embeddings) if embeddings is not None else [None] * len(chunk.indices)
            patches = scorer.patches() if keep_patches else None
            patch_list = patches if patches is not None else [None] * len(chunk.indices)
            rows += zip(chunk.indices, logits, scores.tolist(), cam_list, emb_list, patch_list, strict=True)
        if chunk.scans:
            assert isinstance(scorer, OnnxScorer)  # tiling is off for any other scorer
            rows += _score_scans(scorer.engine, chunk.scans, tiling)
            tiled += len(chunk.scans)
        bar.update(len(chunk.indices) + len(chunk.scans) + len(chunk.failures))
    bar.close()
    rows.sort(key=lambda row: row[0])
    embedded = [row[4] for row in rows]
    have_all = bool(rows) and all(e is not None for e in embedded)
    return ScoredSet(
        indices=np.array([row[0] for row in rows], dtype=np.int64),
        logits=np.array([row[1] for row in rows], dtype=np.float64).reshape(-1, 2),
        scores=np.array([row[2] for row in rows], dtype=np.float64),
        cams=[row[3] for row in rows],
        failures=failures,
        tiled=tiled,
        embeddings=np.stack(embedded).astype(np.float32) if have_all else None,  # type: ignore[arg-type]
        patches=[row[5] for row in rows] if keep_patches else None,
        shorter_sides=np.array([sides[row[0]] for row in rows], dtype=np.int64),
    )
