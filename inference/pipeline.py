"""The one scoring pipeline: from an upload to one `Scored` result holding every piece of evidence, and
the verdict decided once, from all of it, in `judge`.

    prepare (sniff once, hash, decode by the one tiling rule)
      -> model output (whole image: the caller's `predict`; a large scan: its tiles, `score_scan`)
      -> product reference check (when a product is named)
      -> judge: classifier score, novelty and the training envelope, reference check -> verdict, reasons

`verity predict`, every server route (/v1/predict, /v1/predict/batch, /v2 infer), `verity eval` and
reference enrolment go through it. They differ only in the `predict` they hand it: the server's
micro-batcher, the engine's own predict in the CLI, evaluation's batch already run. Each target writes
the result its own way (the /v1 JSON and the audit row in api/service.py, the OIP outputs in
api/oip_response.py, the CLI lines in inference/cli.py, predictions.csv in training/eval_outputs.py).

A scan scored in tiles is one image to the open-set checks: the novelty search runs once, on the
normalised mean of its tiles' embeddings (`open_set.scan_embedding`), never per tile, and its shorter
side is held against the training envelope as a whole image's is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeLimits
from verity.inference.engine import Engine, Prediction, Thresholds
from verity.inference.heatmap import CORNER, over_input
from verity.inference.open_set import Observed, not_recognised_cause, open_set_verdict
from verity.inference.references.errors import NoEmbedding
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import ScanResult, ScoringInput, TilingOptions, load_for_scoring, score_scan

if TYPE_CHECKING:  # references.check embeds references through this pipeline
    from verity.inference.references.check import ReferenceCheck

# One preprocessed CxSxS input -> the model's Prediction for it.
Predict = Callable[[np.ndarray], Prediction]
# The model's output for an image -> its check against the named product's genuine references.
ProductCheck = Callable[[Prediction], "ReferenceCheck"]


@dataclass(frozen=True)
class Upload:
    """One image as it arrived: its sha256 (for the audit record and the image store) and the image
    decoded once, by the one tiling rule."""

    sha256: str
    decoded: ScoringInput

    @property
    def kind(self) -> str:
        return self.decoded.kind


def prepare(
    data: bytes,
    spec: PreprocessSpec,
    tiling: TilingOptions,
    limits: DecodeLimits = DEFAULT_LIMITS,
    with_profile: bool = False,
) -> Upload:
    """Blocking: hashes and decodes one upload or file (DecodeError for a bad image). `with_profile`
    (`wants_profile`) computes the input profile now, while the model input is still in the caches: in a
    server it is otherwise computed after the model's batch has run, 20% slower (measured)."""
    decoded = load_for_scoring(data, spec, tiling, limits)
    if with_profile:
        _ = decoded.profile
    return Upload(hashlib.sha256(data).hexdigest(), decoded)


def wants_profile(engine: Engine) -> bool:
    """Whether the engine's answers read the input profile: its gate holds training profiles, or its
    card keeps a drift reference (the brightness of each answer)."""
    gate = engine.novelty_gate
    return gate is not None and (gate.profiles is not None or "drift" in (engine.card.novelty or {}))


def prepare_tensor(model_input: np.ndarray, spec: PreprocessSpec) -> Upload:
    """A model input sent preprocessed (/v2 FP32): hashed by its bytes; it is the model's input size."""
    digest = hashlib.sha256(model_input.tobytes()).hexdigest()
    return Upload(digest, ScoringInput(model_input, None, spec.image_size, "tensor"))


@dataclass(frozen=True)
class ScoringOptions:
    """How an image is scored besides the model: the tiling rule's options, and how a scan's tiles are
    batched (tiles run on the engine directly, `workers` batches at once; None: one per core)."""

    tiling: TilingOptions = TilingOptions()
    tile_batch: int = 16
    tile_workers: int | None = None


@dataclass(frozen=True)
class Scored:
    """Every piece of evidence about one image, and the verdict `judge` decided from it."""

    upload: Upload
    output: Prediction  # the model's output; a tiled scan's is its aggregate (`ScanResult.output`)
    model: str
    version: str
    thresholds: Thresholds
    classifier_verdict: str  # the score against the thresholds alone
    novelty: float | None  # kNN distance to the training bank; None for a model without a gate
    recognised: bool | None  # within the gate and the training envelope; None without a gate
    verdict: str
    reasons: tuple[str, ...]  # vocabulary.REASONS, a tuple until a target writes it
    reference: ReferenceCheck | None = None  # set when a product was named
    scan: ScanResult | None = None  # set when the image was scored in tiles
    feature_alignment: str = CORNER  # where the model's maps lie over its input (heatmap.over_input)

    @property
    def score(self) -> float:
        return self.output.score

    @property
    def tiles(self) -> int:
        return len(self.scan.tiles) if self.scan is not None else 1

    def evidence(self, input_size: int) -> np.ndarray | None:
        """What the heatmap shows, in pixels: a scan's tile evidence, or the whole image's CAM over the
        model input of `input_size` pixels a side (None without a CAM)."""
        if self.scan is not None:
            return self.scan.evidence
        return self.over_input(self.output.cam, input_size)

    def over_input(self, grid: np.ndarray | None, input_size: int) -> np.ndarray | None:
        """One of the model's maps (the CAM, a difference map) over its input, where the cells lie."""
        return None if grid is None else over_input(grid, input_size, self.feature_alignment)


def judge(
    upload: Upload,
    output: Prediction,
    engine: Engine,
    scan: ScanResult | None = None,
    reference: ReferenceCheck | None = None,
) -> Scored:
    """The one place a verdict is decided (`open_set.open_set_verdict`): the classifier's score against
    the thresholds, the novelty gate and the training envelope (an image under the envelope's size is
    not recognised whatever its novelty), and the product's reference check."""
    classifier = engine.thresholds.verdict(output.score)
    gate, novelty, recognised, cause = engine.novelty_gate, None, None, None
    if gate is not None and output.embedding is not None:
        decoded = upload.decoded
        profile = decoded.profile if gate.profiles is not None else None  # computed only when asked
        measured = gate.verdict_likeness(output.embedding, profile)
        novelty = measured.novelty
        observed = Observed(decoded.shorter_side, decoded.colour, profile, decoded.dicom_modality)
        cause = not_recognised_cause(gate, measured, observed)
        recognised = cause is None
    status = reference.status if reference is not None else None
    verdict, reasons = open_set_verdict(classifier, recognised, status, cause)
    return Scored(
        upload=upload,
        output=output,
        model=engine.name,
        version=engine.version,
        thresholds=engine.thresholds,
        classifier_verdict=classifier,
        novelty=novelty,
        recognised=recognised,
        verdict=verdict,
        reasons=reasons,
        reference=reference,
        scan=scan,
        feature_alignment=engine.feature_alignment,
    )


def engine_predict(engine: Engine, with_cam: bool = True) -> Predict:
    """The engine's own predict for one input (the CLI's and evaluation's; the server's batches)."""
    return lambda model_input: engine.predict([model_input], with_cam=with_cam)[0]


def model_output(
    upload: Upload, engine: Engine, predict: Predict, options: ScoringOptions = ScoringOptions()
) -> tuple[Prediction, ScanResult | None]:
    """The model's output for the image: `predict` for one scored whole, its tiles for a scan
    (TooManyTiles for a scan over the limit with tiling "on")."""
    decoded = upload.decoded
    if decoded.pixels is None:
        assert decoded.model_input is not None  # load_for_scoring sets exactly one of the two
        return predict(decoded.model_input), None
    scan = score_scan(
        decoded.pixels,
        engine,
        options.tiling,
        batch_size=options.tile_batch,
        workers=options.tile_workers,
    )
    return scan.output, scan


def check_product(
    output: Prediction, engine: Engine, product_check: ProductCheck | None
) -> ReferenceCheck | None:
    """The named product's reference check of this output; NoEmbedding for a model that cannot."""
    if product_check is None:
        return None
    if output.embedding is None:
        raise NoEmbedding(
            f"{engine.name} {engine.version} has no embedding output, so it cannot check a product."
        )
    return product_check(output)


def score(
    upload: Upload,
    engine: Engine,
    predict: Predict,
    options: ScoringOptions = ScoringOptions(),
    product_check: ProductCheck | None = None,
) -> Scored:
    """The pipeline after decoding: model output, reference check, verdict."""
    output, scan = model_output(upload, engine, predict, options)
    return judge(upload, output, engine, scan, check_product(output, engine, product_check))


def score_bytes(
    data: bytes,
    engine: Engine,
    options: ScoringOptions = ScoringOptions(),
    product_check: ProductCheck | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    with_cam: bool = True,
) -> Scored:
    """The whole pipeline on one image's bytes with the engine's own predict (the CLI's path)."""
    upload = prepare(data, engine.spec, options.tiling, limits)
    return score(upload, engine, engine_predict(engine, with_cam), options, product_check)
