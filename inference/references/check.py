"""Embedding an image exactly as the server scores it, and the reference check: leave-one-out
calibration on a product's genuine references and the verdict on one query. No files here: the store
(`store`) keeps the images and embeddings this computes on.

The check: d(q) = 1 - max_j cos(q, r_j) to the product's references. Its alarm threshold comes from
leave-one-out on the references themselves (d_i of each reference to its nearest other one):
mean(d_i) + z * std(d_i), z the normal quantile of 1 - false_alarm_rate. With fewer than
MIN_REFERENCES the spread of d_i says nothing, and the check abstains. A model with local features is
checked by its patch signature instead (`patch_check`; the store picks which). Only numpy
and inference here.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from verity.inference.bank import unit_rows
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeLimits
from verity.inference.engine import Engine
from verity.inference.pipeline import ScoringOptions, engine_predict, model_output, prepare
from verity.inference.references.errors import NoEmbedding
from verity.inference.references.patch_check import PatchCalibration, PatchComparison
from verity.inference.stamps import file_stamp
from verity.inference.tiling import TilingOptions

MIN_REFERENCES = 5  # fewer: the leave-one-out spread is not worth a threshold, so the check abstains
DEFAULT_FALSE_ALARM_RATE = 0.01
MIN_SPREAD = 1e-6
CLOSEST = 3  # genuine references shown beside a suspect: enough to compare, few enough to see at once


# ----------------------------------------------------------------------------------------------------
# Embedding an image exactly as the server scores it


def has_embedding(engine: Engine) -> bool:
    """Whether the engine's model gives an embedding (its graph has the output)."""
    return "embedding" in engine.output_names


def require_embedding(engine: Engine) -> None:
    """Refuses a model without an embedding output, before anything is decoded or written."""
    if not has_embedding(engine):
        raise NoEmbedding(
            f"Model {engine.name} {engine.version} has no embedding output, so genuine references cannot "
            "be compared with it; export it again with a version of Verity that writes one."
        )


def image_features(
    engine: Engine,
    data: bytes,
    tiling: TilingOptions = TilingOptions(),
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The unit-length embedding of one image's bytes and its local features (L x C unit rows, None for
    a model without the `patches` output), by the scoring pipeline's own decode and model output
    (`pipeline.model_output`: tiles for a large scan), so a reference and a query are seen the same way.
    DecodeError for a bad image, TooManyTiles for a scan over the tile limit, NoEmbedding for a model
    without the output."""
    require_embedding(engine)
    upload = prepare(data, engine.spec, tiling, limits)
    output, _ = model_output(upload, engine, engine_predict(engine, with_cam=False), ScoringOptions(tiling))
    if output.embedding is None:
        raise NoEmbedding(f"Model {engine.name} {engine.version} gave no embedding for this image.")
    embedding = unit_rows(np.asarray(output.embedding, dtype=np.float32).reshape(1, -1))[0]
    return embedding, output.patches


def embed_image(
    engine: Engine,
    data: bytes,
    tiling: TilingOptions = TilingOptions(),
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """The unit-length embedding of one image's bytes (`image_features`)."""
    return image_features(engine, data, tiling, limits)[0]


def engine_key(engine: Engine) -> str:
    """Identifies the embeddings one model file gives: name, version, precision and the file's size
    and mtime (a re-exported file under the same version gets a new key, so stale vectors are unused).

    Worked out once per engine object and remembered: a loaded engine keeps the weights it read, so its
    key cannot change while it serves, and a request naming a product asks for it several times (a stat
    and a hash each, a tenth of the reference check's time)."""
    try:
        return _ENGINE_KEYS[engine]
    except (KeyError, TypeError):  # TypeError: an engine that cannot be weakly referenced
        pass
    path = Path(engine.path or "")
    try:
        size, mtime_ns, _ = file_stamp(path) or (0, 0, 0)
    except OSError:
        size = mtime_ns = 0
    stamp = f"{size}:{mtime_ns}"
    text = "\0".join(
        [engine.name, engine.version, engine.precision, path.name, stamp]
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    with contextlib.suppress(TypeError):
        _ENGINE_KEYS[engine] = key
    return key


# Keyed by the engine object itself, so a reloaded model (a new engine) is looked at afresh and an
# unloaded one does not linger.
_ENGINE_KEYS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


class EngineEmbedder:
    """`embed` for `ReferenceStore.add` that also tells the store which engine made the vector, so the
    enrolment's embedding goes straight into that engine's cache instead of being computed again."""

    def __init__(self, engine: Engine, tiling: TilingOptions, limits: DecodeLimits) -> None:
        require_embedding(engine)
        self.engine = engine
        self.tiling = tiling
        self.limits = limits
        self.key = engine_key(engine)

    def __call__(self, data: bytes) -> np.ndarray:
        return embed_image(self.engine, data, self.tiling, self.limits)


# ----------------------------------------------------------------------------------------------------
# Calibration and the check


@dataclass(frozen=True)
class Calibration:
    """Leave-one-out calibration of one product's reference distances (threshold None: abstains)."""

    references: int
    min_references: int
    false_alarm_rate: float
    threshold: float | None
    spread: float | None
    loo: tuple[float, ...]  # each reference's distance to its nearest other reference

    @property
    def abstains(self) -> bool:
        return self.threshold is None

    def to_dict(self) -> dict[str, Any]:
        """For GET /v1/references and `verity refs list`: the threshold and what it was made from."""
        loo = np.asarray(self.loo, dtype=np.float64)
        summary = None
        if len(loo):
            summary = {
                "mean": float(loo.mean()),
                "std": float(loo.std(ddof=1)) if len(loo) > 1 else None,
                "min": float(loo.min()),
                "median": float(np.median(loo)),
                "max": float(loo.max()),
            }
        return {
            "status": "abstains" if self.abstains else "calibrated",
            "threshold": self.threshold,
            "spread": self.spread,
            "references": self.references,
            "min_references": self.min_references,
            "false_alarm_rate": self.false_alarm_rate,
            "loo_distances": summary,
        }


def loo_distances(embeddings: np.ndarray) -> np.ndarray:
    """d_i = 1 - max_{j != i} cos(r_i, r_j) for unit-length rows (float64; empty for one row)."""
    rows = np.asarray(embeddings, dtype=np.float64)
    if len(rows) < 2:
        return np.zeros(0, dtype=np.float64)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return np.clip(1.0 - similarity.max(axis=1), 0.0, 2.0)


def calibrate(
    embeddings: np.ndarray,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    min_references: int = MIN_REFERENCES,
) -> Calibration:
    """threshold = mean(d_i) + z * std(d_i, ddof=1), z = inv_cdf(1 - rate), spread = max(std, 1e-6):
    if genuine distances were normal, a genuine query would exceed it with probability `rate`."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"The false alarm rate must lie in (0, 1), got {false_alarm_rate}.")
    distances = loo_distances(embeddings)
    count = len(embeddings)
    if count < max(min_references, 2):
        return Calibration(count, min_references, false_alarm_rate, None, None, tuple(map(float, distances)))
    std = float(distances.std(ddof=1))
    z = NormalDist().inv_cdf(1.0 - false_alarm_rate)
    threshold = float(distances.mean()) + z * std
    return Calibration(
        count, min_references, false_alarm_rate, threshold, max(std, MIN_SPREAD), tuple(map(float, distances))
    )


def nearest_distance(references: np.ndarray, embedding: np.ndarray) -> float:
    """1 - the largest cosine between the query and the (unit-length) references."""
    query = unit_rows(np.asarray(embedding, dtype=np.float32).reshape(1, -1))[0].astype(np.float64)
    rows = np.asarray(references, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != query.shape[0]:
        raise ValueError(
            f"The embedding has {query.shape[0]} values but the references have {rows.shape[-1]}."
        )
    return float(np.clip(1.0 - float((rows @ query).max()), 0.0, 2.0))


@dataclass(frozen=True)
class Closest:
    """One genuine reference near the query, by embedding: its id and cosine distance."""

    reference_id: str
    distance: float


@dataclass(frozen=True)
class ReferenceCheck:
    """The reference check of one image against its named product. `distance` is the patch signature
    score (`patch_check`) when the model has local features, else the embedding's cosine
    distance to the nearest reference; `threshold` and `spread` are on the same scale.

    What an officer compares with: `closest`, the product's CLOSEST references nearest the query by
    embedding, nearest first; and `comparison`, from which `difference_map()` says where the query
    differs from all of them (None for a model without local features, a scan scored in tiles, or a
    product whose check abstains)."""

    product: str
    status: str  # vocabulary.REFERENCE_STATUSES: match, mismatch, abstained
    distance: float
    threshold: float | None
    spread: float | None
    references: int
    min_references: int
    false_alarm_rate: float
    closest: tuple[Closest, ...] = ()
    comparison: PatchComparison | None = field(default=None, compare=False, repr=False)

    @property
    def margin(self) -> float | None:
        """How many LOO spreads beyond (positive) or within the threshold; None when abstained."""
        if self.threshold is None or self.spread is None:
            return None
        return (self.distance - self.threshold) / self.spread

    def difference_map(self) -> np.ndarray | None:
        """rows x columns of the model's local feature map: how far each location of the image lies from
        the product's genuine references, in genuine limits (`patch_check.difference_map`: above 1,
        further than genuine images go); None where there is no comparison. Computed at each call."""
        return None if self.comparison is None else self.comparison.difference()

    def to_dict(self) -> dict[str, Any]:
        """For JSON (`verity predict --json`): the map stays out (an image's worth of numbers), its
        largest value stays in."""
        kept = [f.name for f in fields(self) if f.name not in ("closest", "comparison")]
        plain = {name: getattr(self, name) for name in kept}
        difference = self.difference_map()
        largest = None if difference is None else float(difference.max())
        closest = [asdict(near) for near in self.closest]
        return {**plain, "closest": closest, "margin": self.margin, "difference_max": largest}


@dataclass(frozen=True)
class ProductEntry:
    """One product in an engine's index: what a query is checked and compared against."""

    rows: np.ndarray  # M x D unit embeddings of the references, in `reference_ids` order
    reference_ids: tuple[str, ...]
    calibration: Calibration
    signature: PatchCalibration | None  # the patch check, when every reference has local features


def closest_references(
    entry: ProductEntry, embedding: np.ndarray, count: int = CLOSEST
) -> tuple[Closest, ...]:
    """The `count` references nearest the query by embedding cosine distance, nearest first (ties in
    enrolment order, so the answer is the same every time)."""
    query = unit_rows(np.asarray(embedding, dtype=np.float32).reshape(1, -1))[0]
    distances = np.clip(1.0 - entry.rows @ query, 0.0, 2.0)
    order = np.argsort(distances, kind="stable")[:count]
    return tuple(Closest(entry.reference_ids[i], float(distances[i])) for i in order)


def judge(
    product: str, references: np.ndarray, calibration: Calibration, embedding: np.ndarray
) -> ReferenceCheck:
    """Match when the nearest reference is within the product's threshold, mismatch beyond it."""
    distance = nearest_distance(references, embedding)
    return _checked(product, calibration, distance, calibration.threshold, calibration.spread)


def _checked(
    product: str, calibration: Calibration, distance: float, threshold: float | None, spread: float | None
) -> ReferenceCheck:
    """The check's answer for a distance (or patch score) and the threshold it is held to: abstained
    without a threshold, else mismatch beyond it."""
    if threshold is None:
        status = "abstained"
    elif distance > threshold:
        status = "mismatch"
    else:
        status = "match"
    return ReferenceCheck(
        product=product,
        status=status,
        distance=distance,
        threshold=threshold,
        spread=spread,
        references=calibration.references,
        min_references=calibration.min_references,
        false_alarm_rate=calibration.false_alarm_rate,
    )


def answer_check(
    product: str,
    entry: ProductEntry,
    embedding: np.ndarray,
    patches: np.ndarray | None,
    grid: tuple[int, int] | None = None,
) -> ReferenceCheck:
    """The check of one image against a product's index entry: by its local features against the
    patch signature when both exist, else by its embedding's nearest reference; with the closest
    references, and the difference map when the patches are one `grid` map of the image."""
    calibration, signature = entry.calibration, entry.signature
    if signature is None or patches is None:
        checked = judge(product, entry.rows, calibration, embedding)
    else:
        score = signature.signature.score(patches)
        checked = _checked(product, calibration, score, signature.threshold, signature.spread)
    return replace(
        checked,
        closest=closest_references(entry, embedding),
        comparison=comparison_or_none(signature, patches, grid),
    )


def comparison_or_none(
    signature: PatchCalibration | None, patches: np.ndarray | None, grid: tuple[int, int] | None
) -> PatchComparison | None:
    """What the difference map is drawn from, or None where it cannot be: no calibrated patch check (no
    local features, or too few references to know the genuine limit), or patches that are not one map
    of the image (a scan's tiles: `grid` None, or a count that does not fill it)."""
    if signature is None or patches is None or grid is None or len(patches) != grid[0] * grid[1]:
        return None
    return PatchComparison(signature.pool, patches, grid)


def describe_calibration(
    product: str, calibration: Calibration, signature: PatchCalibration | None
) -> dict[str, Any]:
    """A product's calibration for listings: the figures of the check that answers (the patch
    signature's when there is one, else the embedding's)."""
    described = {"product": product, **calibration.to_dict()}
    if signature is not None:
        loo = signature.loo_scores
        described.update(
            check="patch signature",
            threshold=signature.threshold,
            spread=signature.spread,
            signature_patches=len(signature.signature.patches),
            loo_scores={"mean": float(loo.mean()), "std": float(loo.std(ddof=1)),
                        "min": float(loo.min()), "max": float(loo.max())},
        )
    else:
        described["check"] = "embedding"
    return described
