"""Genuine reference images per product, and the reference check calibrated on them.

Right holders and ML engineers enrol genuine images of a product (`verity refs add`, `POST
/v1/references`); a request that names its product is then also scored by its distance to that
product's nearest genuine reference. The store is plain files, so the CLI and a running server share it
without a database, and every change is an event that can be replayed and audited:

    <root>/<model name>/events.jsonl                   append-only: one JSON event per line, fsync'd,
                                                        written under an exclusive flock
    <root>/<model name>/images/<sha[:2]>/<sha>.<ext>   content-addressed, written once (tmp + replace)
    <root>/<model name>/embeddings/<key>.npz           sha256 -> embedding, for one model file

The current set is the replay of events.jsonl, read again whenever its size or mtime changes, so a
server sees a CLI enrolment on its next check without a restart. References are never overwritten: the
same image for the same product is a `duplicate` (nothing is written), for another product a conflict.
A removal is an event too; the image file stays for the audit trail.

The check: d(q) = 1 - max_j cos(q, r_j) to the product's references. Its alarm threshold comes from
leave-one-out on the references themselves (d_i of each reference to its nearest other one):
mean(d_i) + z * std(d_i), z the normal quantile of 1 - false_alarm_rate. With fewer than
MIN_REFERENCES the spread of d_i says nothing, and the check abstains. Only numpy and inference here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import IO, Any

import numpy as np

from verity.inference.bank import unit_rows
from verity.inference.decode import DEFAULT_LIMITS, DecodeLimits, sniff_format
from verity.inference.patch_check import PatchCalibration, calibrate_patches
from verity.inference.tiling import TilingOptions, load_for_scoring, score_scan

log = logging.getLogger("verity.inference.references")

MIN_REFERENCES = 5  # fewer: the leave-one-out spread is not worth a threshold, so the check abstains
DEFAULT_FALSE_ALARM_RATE = 0.01
MIN_SPREAD = 1e-6
PRODUCT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A model name becomes a folder name: no separators, no "..", no hidden folders.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EVENTS_FILE = "events.jsonl"
# Where the server and the command line keep references unless told otherwise (api.settings uses it).
DEFAULT_REFERENCES_DIR = Path("var/references")
ADDED, DUPLICATE = "added", "duplicate"
ACTIONS = ("add", "remove")
_EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "gif": "gif",
    "tiff": "tif",
    "bmp": "bmp",
    "webp": "webp",
    "dicom": "dcm",
}
PRIVATE_DIR_MODE, PRIVATE_FILE_MODE = 0o700, 0o600

Embed = Callable[[bytes], np.ndarray]
OnEvent = Callable[[dict[str, Any]], None]


class ReferenceStoreError(ValueError):
    """A reference operation that cannot be done, with a message fit for the user."""


class InvalidName(ReferenceStoreError):
    """A product or model name the store does not accept."""


class ReferenceConflict(ReferenceStoreError):
    """The image is already a genuine reference of another product."""

    def __init__(self, product: str, reference_id: str) -> None:
        super().__init__(
            f"This image is already enrolled as genuine reference {reference_id} of product {product!r}; "
            "one image can be a reference of one product only (remove it there first)."
        )
        self.product = product
        self.reference_id = reference_id


class UnknownReference(ReferenceStoreError):
    """No active reference has this id."""


class UnknownProduct(ReferenceStoreError):
    """The product has no (active) genuine references for this model; `known` are those that do."""

    def __init__(self, product: str, known: list[str], model_name: str = "") -> None:
        names = ", ".join(known[:50]) + (f" and {len(known) - 50} more" if len(known) > 50 else "")
        where = f" for model {model_name}" if model_name else ""
        super().__init__(
            f"No genuine references of product {product!r}{where}. "
            + (f"Known products: {names}." if known else "No product has references yet.")
        )
        self.product = product
        self.known = known


class NoEmbedding(ReferenceStoreError):
    """The model has no embedding output, so it cannot compare images with references."""


def validate_product(product: str) -> str:
    """The product name, or InvalidName: it becomes part of every audit row and file listing."""
    if not isinstance(product, str) or not PRODUCT_PATTERN.fullmatch(product):
        shown = product if len(str(product)) <= 64 else str(product)[:64] + "..."
        raise InvalidName(
            f"Invalid product name {shown!r}: use 1-64 characters, lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (e.g. acme-watch-x2)."
        )
    return product


def validate_model_name(name: str) -> str:
    """The model name, or InvalidName: it names a folder under the store's root."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidName(f"Invalid model name {str(name)[:64]!r} for the reference store.")
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _private_dir(path: Path) -> None:
    """Creates `path` and its missing parents as 0700: the images are evidence, like the audit log's."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def _write_atomic(target: Path, data: bytes) -> None:
    """Writes `data` to `target` through a private temporary and one rename: no reader sees half."""
    _private_dir(target.parent)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# ----------------------------------------------------------------------------------------------------
# Embedding an image exactly as the server scores it


def has_embedding(engine: Any) -> bool:
    """Whether the engine's model gives an embedding (an OnnxEngine's graph has the output)."""
    names = getattr(engine, "output_names", None)
    if names is not None:
        return "embedding" in names
    return getattr(getattr(engine, "card", None), "embedding_dim", None) is not None


def require_embedding(engine: Any) -> None:
    """Refuses a model without an embedding output, before anything is decoded or written."""
    if not has_embedding(engine):
        raise NoEmbedding(
            f"Model {engine.name} {engine.version} has no embedding output, so genuine references cannot "
            "be compared with it; export it again with a version of Verity that writes one."
        )


def image_features(
    engine: Any, data: bytes, tiling: TilingOptions = TilingOptions(), limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, np.ndarray | None]:
    """The unit-length embedding of one image's bytes and its local features (L x C unit rows, None for
    a model without the `patches` output), by the server's own path (`load_for_scoring`, tiles for a
    large scan), so a reference and a query are seen the same way. DecodeError for a bad image,
    TooManyTiles for a scan over the tile limit, NoEmbedding for a model without the output."""
    require_embedding(engine)
    loaded = load_for_scoring(data, engine.spec, tiling, limits)
    if loaded.model_input is not None:
        prediction = engine.predict([loaded.model_input])[0]
    else:
        prediction = score_scan(loaded.pixels, engine, tiling).prediction
    if prediction.embedding is None:
        raise NoEmbedding(f"Model {engine.name} {engine.version} gave no embedding for this image.")
    embedding = unit_rows(np.asarray(prediction.embedding, dtype=np.float32).reshape(1, -1))[0]
    return embedding, getattr(prediction, "patches", None)


def embed_image(
    engine: Any, data: bytes, tiling: TilingOptions = TilingOptions(), limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The unit-length embedding of one image's bytes (`image_features`)."""
    return image_features(engine, data, tiling, limits)[0]


def engine_key(engine: Any) -> str:
    """Identifies the embeddings one model file gives: name, version, precision and the file's size
    and mtime (a re-exported file under the same version gets a new key, so stale vectors are unused)."""
    path = Path(getattr(engine, "path", "") or "")
    try:
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        stamp = "0:0"
    text = "\0".join(
        [engine.name, engine.version, str(getattr(engine, "precision", "fp32")), path.name, stamp]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class EngineEmbedder:
    """`embed` for `ReferenceStore.add` that also tells the store which engine made the vector, so the
    enrolment's embedding goes straight into that engine's cache instead of being computed again."""

    def __init__(self, engine: Any, tiling: TilingOptions, limits: DecodeLimits) -> None:
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
class ReferenceCheck:
    """The reference check of one image against its named product. `distance` is the patch signature
    score (inference/patch_check.py) when the model has local features, else the embedding's cosine
    distance to the nearest reference; `threshold` and `spread` are on the same scale."""

    product: str
    status: str  # vocabulary.REFERENCE_STATUSES: match, mismatch, abstained
    distance: float
    threshold: float | None
    spread: float | None
    references: int
    min_references: int
    false_alarm_rate: float

    @property
    def margin(self) -> float | None:
        """How many LOO spreads beyond (positive) or within the threshold; None when abstained."""
        if self.threshold is None or self.spread is None:
            return None
        return (self.distance - self.threshold) / self.spread

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "margin": self.margin}


def judge(
    product: str, references: np.ndarray, calibration: Calibration, embedding: np.ndarray
) -> ReferenceCheck:
    """Match when the nearest reference is within the product's threshold, mismatch beyond it."""
    distance = nearest_distance(references, embedding)
    if calibration.threshold is None:
        status = "abstained"
    else:
        status = "mismatch" if distance > calibration.threshold else "match"
    return ReferenceCheck(
        product=product,
        status=status,
        distance=distance,
        threshold=calibration.threshold,
        spread=calibration.spread,
        references=calibration.references,
        min_references=calibration.min_references,
        false_alarm_rate=calibration.false_alarm_rate,
    )


# ----------------------------------------------------------------------------------------------------
# The event log


@dataclass(frozen=True)
class Reference:
    """One enrolled genuine reference, with its provenance: who enrolled it, when, from where."""

    reference_id: str
    product: str
    sha256: str
    ext: str
    actor: str | None
    role: str | None
    created: str
    source: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Reference:
        """The reference an "add" event enrols (KeyError when a required field is missing)."""
        return cls(
            reference_id=str(event["reference_id"]),
            product=str(event["product"]),
            sha256=str(event["sha256"]),
            ext=str(event["ext"]),
            actor=event.get("actor"),
            role=event.get("role"),
            created=str(event["created"]),
            source=event.get("source"),
        )


@dataclass(frozen=True)
class Enrolment:
    """What `add` did with one image: `added`, or `duplicate` of an existing reference (nothing written)."""

    reference_id: str
    sha256: str
    product: str
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _ModelState:
    """The replay of one model's events.jsonl, and the file stamp it was read at."""

    stamp: tuple[int, int, int] | None = None
    active: dict[str, Reference] = field(default_factory=dict)  # id -> reference, in enrolment order
    removed: dict[str, str] = field(default_factory=dict)  # id -> when it was removed
    by_image: dict[tuple[str, str], str] = field(default_factory=dict)  # (sha, product) -> id
    by_sha: dict[str, str] = field(default_factory=dict)  # sha -> id of its active reference
    generation: int = 0  # bumped on every change, so indexes know to rebuild

    def apply(self, event: dict[str, Any]) -> None:
        if event["action"] == "add":
            reference = Reference.from_event(event)
            self.active[reference.reference_id] = reference
            self.by_image[(reference.sha256, reference.product)] = reference.reference_id
            self.by_sha[reference.sha256] = reference.reference_id
        else:
            reference = self.active.pop(event["reference_id"])
            self.removed[reference.reference_id] = event.get("created", "")
            self.by_image.pop((reference.sha256, reference.product), None)
            self.by_sha.pop(reference.sha256, None)

    def products(self) -> dict[str, list[Reference]]:
        grouped: dict[str, list[Reference]] = {}
        for reference in self.active.values():
            grouped.setdefault(reference.product, []).append(reference)
        return grouped


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _parse_events(text: str, path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of an events file; a last line without its newline was never finished (a
    crash mid-append) and did not take effect. Any other unreadable line is a damaged store."""
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReferenceStoreError(f"{path} line {number} is not a JSON event: {error.msg}.") from None
        if not isinstance(event, dict) or event.get("action") not in ACTIONS or "reference_id" not in event:
            raise ReferenceStoreError(f"{path} line {number} is not a reference event.")
        yield event


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[IO[bytes]]:
    """The events file opened (created 0600 for a writer) under flock: one writer across processes."""
    if exclusive:
        _private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    else:
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "r+b" if exclusive else "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _append(handle: IO[bytes], event: dict[str, Any]) -> None:
    """Appends one event line and fsyncs it. An unfinished last line (a crash mid-append, never in
    effect) is cut off first, so it cannot merge with this one."""
    handle.seek(0)
    content = handle.read()
    if content and not content.endswith(b"\n"):
        handle.truncate(content.rfind(b"\n") + 1)
    handle.seek(0, os.SEEK_END)
    handle.write((json.dumps(event, sort_keys=True) + "\n").encode())
    handle.flush()
    os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------------
# The per-engine index


@dataclass
class _Index:
    """One engine's view of one model's references: embeddings per product and their calibrations."""

    generation: int = -1
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # sha -> embedding (kept across rebuilds)
    products: dict[str, np.ndarray] = field(default_factory=dict)  # product -> M x D unit rows
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    patches: dict[str, np.ndarray] = field(default_factory=dict)  # sha -> L x C local features
    signatures: dict[str, PatchCalibration] = field(default_factory=dict)  # product -> patch check
    loaded: bool = False  # the embeddings cache file has been read into `vectors`
    saved: int = 0  # vectors in the cache file, so it is rewritten only when there are new ones


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    """sha -> embedding from a cache file; a missing or unreadable one is just empty (it is a cache)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shas, vectors = data["sha256"], data["embeddings"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as error:
        log.warning(
            "reference embedding cache unreadable, recomputing",
            extra={"path": str(path), "error": str(error)},
        )
        return {}
    if vectors.ndim != 2 or len(vectors) != len(shas):
        return {}
    return {str(sha): vectors[i].astype(np.float32) for i, sha in enumerate(shas)}


def _load_patch_cache(path: Path) -> dict[str, np.ndarray]:
    """sha -> L x C local features from a cache file (float16 rows, split by per-image counts)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shas, rows, counts = data["patch_sha256"], data["patches"], data["patch_counts"]
    except (OSError, ValueError, KeyError):  # missing, unreadable or without patches: recomputed
        return {}
    if rows.ndim != 2 or counts.sum() != len(rows) or len(counts) != len(shas):
        return {}
    splits = np.split(rows.astype(np.float32), np.cumsum(counts)[:-1])
    return {str(sha): unit_rows(part) for sha, part in zip(shas, splits, strict=True)}


def _save_cache(path: Path, vectors: dict[str, np.ndarray], patches: dict[str, np.ndarray]) -> None:
    shas = sorted(vectors)
    patch_shas = sorted(patches)
    arrays = {"sha256": np.array(shas, dtype="U64"), "embeddings": np.stack([vectors[s] for s in shas])}
    if patch_shas:
        arrays.update(
            patch_sha256=np.array(patch_shas, dtype="U64"),
            patches=np.concatenate([patches[s] for s in patch_shas]).astype(np.float16),
            patch_counts=np.array([len(patches[s]) for s in patch_shas], dtype=np.int64),
        )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs type the first kwarg as allow_pickle
    _write_atomic(path, buffer.getvalue())


class ReferenceStore:
    """Genuine reference images per model name and product, under `root` (module docstring).

    Thread-safe: one lock guards the replayed state, the indexes and every append; an exclusive flock
    on events.jsonl orders writers across processes (the CLI beside a server)."""

    def __init__(
        self,
        root: str | Path,
        *,
        tiling: TilingOptions = TilingOptions(),
        limits: DecodeLimits = DEFAULT_LIMITS,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        min_references: int = MIN_REFERENCES,
    ) -> None:
        if not 0.0 < false_alarm_rate < 1.0:
            raise ValueError(f"The reference false alarm rate must lie in (0, 1), got {false_alarm_rate}.")
        self.root = Path(root)  # created on the first enrolment, not here: a server may never enrol
        self.tiling = tiling
        self.limits = limits
        self.false_alarm_rate = false_alarm_rate
        self.min_references = min_references
        self._lock = threading.RLock()
        self._states: dict[str, _ModelState] = {}
        self._indexes: dict[tuple[str, str], _Index] = {}

    # -- paths and replay ----------------------------------------------------------------------------

    def _folder(self, model_name: str) -> Path:
        return self.root / validate_model_name(model_name)

    def image_path(self, model_name: str, reference: Reference) -> Path:
        """Where a reference's image file lies (content-addressed)."""
        return self._image_target(model_name, reference.sha256, reference.ext)

    def _image_target(self, model_name: str, sha: str, ext: str) -> Path:
        return self._folder(model_name) / "images" / sha[:2] / f"{sha}.{ext}"

    def embedder(self, engine: Any) -> EngineEmbedder:
        """The `embed` for `add` with this engine and the store's tiling and decode limits."""
        return EngineEmbedder(engine, self.tiling, self.limits)

    def _state(self, model_name: str, handle: IO[bytes] | None = None) -> _ModelState:
        """The model's replayed events, read again when the file changed (caller holds the lock)."""
        path = self._folder(model_name) / EVENTS_FILE
        state = self._states.setdefault(model_name, _ModelState())
        stamp = _stamp(path)
        if stamp == state.stamp:
            return state
        fresh = _ModelState(generation=state.generation + 1)
        if stamp is not None:
            if handle is not None:
                handle.seek(0)
                text = handle.read().decode("utf-8", errors="replace")
            else:
                with _locked(path, exclusive=False) as reader:
                    text = reader.read().decode("utf-8", errors="replace")
            for event in _parse_events(text, path):
                try:
                    fresh.apply(event)
                except (KeyError, TypeError) as error:
                    raise ReferenceStoreError(f"{path} holds an inconsistent event: {error}.") from None
        fresh.stamp = stamp
        self._states[model_name] = fresh
        return fresh

    # -- enrolment and removal -----------------------------------------------------------------------

    def add(
        self,
        model_name: str,
        product: str,
        data: bytes,
        *,
        source: str | None,
        actor: str | None,
        role: str | None,
        embed: Embed,
        on_event: OnEvent | None = None,
    ) -> Enrolment:
        """Enrols one image as a genuine reference of `product`.

        The image is embedded first, so a bad image (DecodeError) is refused before anything is written.
        Then, under the lock: a duplicate returns the existing reference; an image of another product
        raises ReferenceConflict; else the image is written, `on_event(event)` is called (the audit
        write: if it raises, nothing is recorded and the error propagates) and the event appended."""
        validate_model_name(model_name)
        validate_product(product)
        vector = np.asarray(embed(data), dtype=np.float32).reshape(-1)
        if not vector.size or not np.all(np.isfinite(vector)):
            raise NoEmbedding("The model gave an empty or non-finite embedding for this image.")
        sha = hashlib.sha256(data).hexdigest()
        with self._lock, _locked(self._folder(model_name) / EVENTS_FILE, exclusive=True) as handle:
            state = self._state(model_name, handle)
            existing = state.by_image.get((sha, product))
            if existing is not None:
                return Enrolment(existing, sha, product, DUPLICATE)
            other = state.by_sha.get(sha)
            if other is not None:
                raise ReferenceConflict(state.active[other].product, other)
            reference_id = uuid.uuid4().hex
            event = {
                "action": "add",
                "reference_id": reference_id,
                "product": product,
                "sha256": sha,
                "ext": _EXTENSIONS.get(sniff_format(data), "bin"),
                "actor": actor,
                "role": role,
                "created": _now(),
                "source": source,
            }
            self._commit(model_name, handle, event, data, on_event)
        if isinstance(embed, EngineEmbedder):
            self._remember(model_name, embed.key, sha, vector)
        return Enrolment(reference_id, sha, product, ADDED)

    def _commit(
        self,
        model_name: str,
        handle: IO[bytes],
        event: dict[str, Any],
        data: bytes | None,
        on_event: OnEvent | None,
    ) -> None:
        """Writes the image (an add's, when new), the audit row (`on_event`), then the event. A failed
        audit write leaves no trace: the new image file is deleted again and no event is appended."""
        created = None
        if data is not None:
            target = self._image_target(model_name, event["sha256"], event["ext"])
            if not target.exists():
                _write_atomic(target, data)
                created = target
        try:
            if on_event is not None:
                on_event(dict(event))
        except BaseException:
            if created is not None:
                with contextlib.suppress(OSError):
                    created.unlink()
            raise
        _append(handle, event)
        self._states[model_name].stamp = None  # replayed again from the file, this event included
        self._state(model_name, handle)

    def remove(
        self,
        model_name: str,
        reference_id: str,
        *,
        actor: str | None,
        role: str | None,
        on_event: OnEvent | None = None,
    ) -> Reference:
        """Marks an active reference removed by an event (its image file stays, for the audit trail).
        UnknownReference for an id that is not an active reference of this model."""
        if not (self._folder(model_name) / EVENTS_FILE).exists():  # nothing enrolled: create nothing
            raise UnknownReference(f"Model {model_name} has no reference {reference_id[:64]!r}.")
        with self._lock, _locked(self._folder(model_name) / EVENTS_FILE, exclusive=True) as handle:
            state = self._state(model_name, handle)
            reference = state.active.get(reference_id)
            if reference is None:
                if reference_id in state.removed:
                    raise UnknownReference(
                        f"Reference {reference_id[:64]} of model {model_name} was already removed "
                        f"({state.removed[reference_id]})."
                    )
                raise UnknownReference(f"Model {model_name} has no reference {reference_id[:64]!r}.")
            event = {
                "action": "remove",
                "reference_id": reference_id,
                "product": reference.product,
                "sha256": reference.sha256,
                "ext": reference.ext,
                "actor": actor,
                "role": role,
                "created": _now(),
                "source": None,
            }
            self._commit(model_name, handle, event, None, on_event)
        return reference

    # -- what is enrolled ----------------------------------------------------------------------------

    def _read_state(self, model_name: str) -> _ModelState:
        validate_model_name(model_name)
        with self._lock:
            return self._state(model_name)

    def products(self, model_name: str) -> dict[str, int]:
        """Product name -> number of active references, sorted by name."""
        grouped = self._read_state(model_name).products()
        return {product: len(grouped[product]) for product in sorted(grouped)}

    def references(self, model_name: str, product: str) -> list[Reference]:
        """The product's active references with their provenance, in enrolment order; UnknownProduct
        (with the known names) when it has none."""
        validate_product(product)
        grouped = self._read_state(model_name).products()
        if product not in grouped:
            raise UnknownProduct(product, sorted(grouped), model_name)
        return list(grouped[product])

    # -- the check -----------------------------------------------------------------------------------

    def _remember(self, model_name: str, key: str, sha: str, vector: np.ndarray) -> None:
        """Keeps an enrolment's embedding for its engine, so the next index build need not embed it."""
        with self._lock:
            index = self._indexes.setdefault((model_name, key), _Index())
            index.vectors[sha] = unit_rows(vector.reshape(1, -1))[0]

    def _cache_path(self, model_name: str, key: str) -> Path:
        return self._folder(model_name) / "embeddings" / f"{key}.npz"

    def _vector(self, engine: Any, model_name: str, index: _Index, reference: Reference) -> np.ndarray | None:
        """One reference's embedding: from memory, else by embedding its stored image. None (logged)
        when the stored image cannot be read or scored any more: the other references still count."""
        vector = index.vectors.get(reference.sha256)
        wants_patches = "patches" in getattr(engine, "output_names", ())
        if vector is not None and (reference.sha256 in index.patches or not wants_patches):
            return vector
        try:
            data = self.image_path(model_name, reference).read_bytes()
            vector, patches = image_features(engine, data, self.tiling, self.limits)
        except (OSError, ValueError) as error:
            log.warning(
                "reference image unusable",
                extra={"model": model_name, "reference_id": reference.reference_id, "error": str(error)},
            )
            return None
        index.vectors[reference.sha256] = vector
        if patches is not None:
            index.patches[reference.sha256] = patches
        return vector

    def _index(self, engine: Any, model_name: str) -> _Index:
        """The engine's index of the model's references, rebuilt when the events changed (caller holds
        the lock). Vectors come from memory, the embeddings cache, or the stored images."""
        require_embedding(engine)
        state = self._state(model_name)
        key = engine_key(engine)
        index = self._indexes.setdefault((model_name, key), _Index())
        if index.generation == state.generation:
            return index
        cache = self._cache_path(model_name, key)
        if not index.loaded:
            on_disk = _load_cache(cache)
            index.vectors = {**on_disk, **index.vectors}
            index.patches = {**_load_patch_cache(cache), **index.patches}
            index.loaded, index.saved = True, len(on_disk) + len(index.patches)
        index.products, index.calibrations, index.signatures = {}, {}, {}
        for product, members in state.products().items():
            self._index_product(engine, model_name, index, product, members)
        index.generation = state.generation
        if len(index.vectors) + len(index.patches) > index.saved and state.stamp is not None:
            try:
                _save_cache(cache, index.vectors, index.patches)
                index.saved = len(index.vectors) + len(index.patches)
            except OSError as error:  # a cache: the next build embeds again
                log.warning(
                    "reference embedding cache not written", extra={"path": str(cache), "error": str(error)}
                )
        return index

    def _index_product(
        self, engine: Any, model_name: str, index: _Index, product: str, members: list[Reference]
    ) -> None:
        """One product's embeddings and calibrations; its patch signature when every reference has
        local features and there are enough of them (caller holds the lock)."""
        usable = [(r, v) for r in members if (v := self._vector(engine, model_name, index, r)) is not None]
        if not usable:
            return
        rows = unit_rows(np.stack([v for _, v in usable]))
        index.products[product] = rows
        calibration = calibrate(rows, self.false_alarm_rate, self.min_references)
        index.calibrations[product] = calibration
        patches = [index.patches.get(r.sha256) for r, _ in usable]
        if not calibration.abstains and all(p is not None for p in patches):
            index.signatures[product] = calibrate_patches(patches, self.false_alarm_rate)  # type: ignore[arg-type]

    def _product_index(
        self, engine: Any, product: str
    ) -> tuple[np.ndarray, Calibration, PatchCalibration | None]:
        validate_product(product)
        model_name = engine.name
        with self._lock:
            index = self._index(engine, model_name)
            if product not in index.products:
                raise UnknownProduct(product, sorted(index.products), model_name)
            return index.products[product], index.calibrations[product], index.signatures.get(product)

    def ready(self, engine: Any, product: str) -> bool:
        """Whether `check` would answer at once: the engine's index is current and holds the product
        (else the first check embeds or calibrates, which takes seconds)."""
        model_name = engine.name
        with self._lock:
            index = self._indexes.get((model_name, engine_key(engine)))
            state = self._states.get(model_name)
            if index is None or state is None or index.generation != state.generation:
                return False
            return _stamp(self._folder(model_name) / EVENTS_FILE) == state.stamp and product in index.products

    def check(
        self, engine: Any, product: str, embedding: np.ndarray, patches: np.ndarray | None = None
    ) -> ReferenceCheck:
        """The reference check of one image (from `engine`) against `product`'s genuine references:
        by its local features against the product's patch signature when both exist, else by its
        embedding's nearest reference; `mismatch` beyond the product's LOO threshold, `abstained` with
        fewer than MIN_REFERENCES. UnknownProduct (with the known names) for a product without
        references."""
        references, calibration, signature = self._product_index(engine, product)
        if signature is None or patches is None:
            return judge(product, references, calibration, embedding)
        score = signature.signature.score(patches)
        return ReferenceCheck(
            product=product,
            status="mismatch" if score > signature.threshold else "match",
            distance=score,
            threshold=signature.threshold,
            spread=signature.spread,
            references=calibration.references,
            min_references=calibration.min_references,
            false_alarm_rate=calibration.false_alarm_rate,
        )

    def calibration(self, engine: Any, product: str) -> dict[str, Any]:
        """The product's calibration with this engine (threshold, spread, LOO summary), for listings."""
        _, calibration, signature = self._product_index(engine, product)
        described = {"product": product, **calibration.to_dict()}
        if signature is not None:  # the check that answers: the patch signature's figures
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
