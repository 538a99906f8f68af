"""ReferenceStore: genuine reference images per model and product, and the check against them.

Right holders and ML engineers enrol genuine images of a product (`verity refs add`, `POST
/v1/references`); a request that names its product is then also checked against that product's
genuine references. The store is plain files, so the CLI and a running server share it without a
database, and every change is an event that can be replayed and audited:

    <root>/<model name>/events.jsonl                   append-only: one JSON event per line, fsync'd,
                                                        written under an exclusive flock
    <root>/<model name>/images/<sha[:2]>/<sha>.<ext>   content-addressed, written once (write_atomic)
    <root>/<model name>/embeddings/<key>.npz           sha256 -> embedding, for one model file

The current set is the replay of events.jsonl, read again whenever its size or mtime changes, so a
server sees a CLI enrolment on its next check without a restart. References are never overwritten: the
same image for the same product is a `duplicate` (nothing is written), for another product a conflict.
A removal is an event too; the image file stays for the audit trail. The parts it is built from are
mapped in `verity.inference.references`. Only numpy and inference here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from verity.inference.bank import unit_rows
from verity.inference.decode import sniff_format
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeLimits
from verity.inference.engine import Engine
from verity.inference.private_files import image_extension, write_atomic
from verity.inference.references.cache import Index, load_cache, load_patch_cache, save_cache
from verity.inference.references.check import (
    DEFAULT_FALSE_ALARM_RATE,
    MIN_REFERENCES,
    EngineEmbedder,
    ProductEntry,
    ReferenceCheck,
    answer_check,
    calibrate,
    describe_calibration,
    engine_key,
    image_features,
    require_embedding,
)
from verity.inference.references.errors import (
    NoEmbedding,
    ReferenceConflict,
    ReferenceStoreError,
    UnknownProduct,
    UnknownReference,
)
from verity.inference.references.events import (
    EVENTS_FILE,
    Enrolment,
    ModelState,
    Reference,
    append_event,
    locked,
    parse_events,
)
from verity.inference.references.names import validate_model_name, validate_product
from verity.inference.references.patch_check import calibrate_patches
from verity.inference.stamps import file_stamp, utc_now
from verity.inference.tiling import TilingOptions

log = logging.getLogger("verity.inference.references")

# Where the server and the command line keep references unless told otherwise (api.settings uses it).
DEFAULT_REFERENCES_DIR = Path("var/references")
ADDED, DUPLICATE = "added", "duplicate"

Embed = Callable[[bytes], np.ndarray]
OnEvent = Callable[[dict[str, Any]], None]


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
        self._states: dict[str, ModelState] = {}
        self._indexes: dict[tuple[str, str], Index] = {}
        self._events_paths: dict[str, str] = {}

    # -- paths and replay ----------------------------------------------------------------------------

    def _folder(self, model_name: str) -> Path:
        return self.root / validate_model_name(model_name)

    def _events_path(self, model_name: str) -> str:
        """The model's events file as a string, made once: every request naming a product stats it, and
        building the Path each time was a fifth of the reference check's Python time."""
        path = self._events_paths.get(model_name)
        if path is None:
            path = self._events_paths[model_name] = str(self._folder(model_name) / EVENTS_FILE)
        return path

    def image_path(self, model_name: str, reference: Reference) -> Path:
        """Where a reference's image file lies (content-addressed)."""
        return self._image_target(model_name, reference.sha256, reference.ext)

    def _image_target(self, model_name: str, sha: str, ext: str) -> Path:
        return self._folder(model_name) / "images" / sha[:2] / f"{sha}.{ext}"

    def embedder(self, engine: Engine) -> EngineEmbedder:
        """The `embed` for `add` with this engine and the store's tiling and decode limits."""
        return EngineEmbedder(engine, self.tiling, self.limits)

    def _state(self, model_name: str, handle: IO[bytes] | None = None) -> ModelState:
        """The model's replayed events, read again when the file changed (caller holds the lock)."""
        path = self._folder(model_name) / EVENTS_FILE
        state = self._states.setdefault(model_name, ModelState())
        stamp = file_stamp(path)
        if stamp == state.stamp:
            return state
        fresh = ModelState(generation=state.generation + 1)
        if stamp is not None:
            if handle is not None:
                handle.seek(0)
                text = handle.read().decode("utf-8", errors="replace")
            else:
                with locked(path, exclusive=False) as reader:
                    text = reader.read().decode("utf-8", errors="replace")
            for event in parse_events(text, path):
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
        with self._lock, locked(self._folder(model_name) / EVENTS_FILE, exclusive=True) as handle:
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
                "ext": image_extension(sniff_format(data)),
                "actor": actor,
                "role": role,
                "created": utc_now(),
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
                write_atomic(target, data)
                created = target
        try:
            if on_event is not None:
                on_event(dict(event))
        except BaseException:
            if created is not None:
                with contextlib.suppress(OSError):
                    created.unlink()
            raise
        append_event(handle, event)
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
        with self._lock, locked(self._folder(model_name) / EVENTS_FILE, exclusive=True) as handle:
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
                "created": utc_now(),
                "source": None,
            }
            self._commit(model_name, handle, event, None, on_event)
        return reference

    # -- what is enrolled ----------------------------------------------------------------------------

    def _read_state(self, model_name: str) -> ModelState:
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

    def reference(self, model_name: str, reference_id: str) -> Reference:
        """One active reference of the model by id; UnknownReference for any other id (never enrolled,
        removed, or of another model), with the same words for each, so ids cannot be probed."""
        found = self._read_state(model_name).active.get(reference_id)
        if found is None:
            raise UnknownReference(f"Model {model_name} has no reference {reference_id[:64]!r}.")
        return found

    def read_image(self, model_name: str, reference: Reference) -> bytes:
        """The stored image bytes of a reference, as enrolled (OSError when the file is unreadable)."""
        return self.image_path(model_name, reference).read_bytes()

    # -- the check -----------------------------------------------------------------------------------

    def _remember(self, model_name: str, key: str, sha: str, vector: np.ndarray) -> None:
        """Keeps an enrolment's embedding for its engine, so the next index build need not embed it."""
        with self._lock:
            index = self._indexes.setdefault((model_name, key), Index())
            index.vectors[sha] = unit_rows(vector.reshape(1, -1))[0]

    def _cache_path(self, model_name: str, key: str) -> Path:
        return self._folder(model_name) / "embeddings" / f"{key}.npz"

    def _vector(
        self, engine: Engine, model_name: str, index: Index, reference: Reference
    ) -> np.ndarray | None:
        """One reference's embedding: from memory, else by embedding its stored image. None (logged)
        when the stored image cannot be read or scored any more: the other references still count."""
        vector = index.vectors.get(reference.sha256)
        wants_patches = "patches" in engine.output_names
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

    def _index(self, engine: Engine, model_name: str) -> Index:
        """The engine's index of the model's references, rebuilt when the events changed (caller holds
        the lock). Vectors come from memory, the embeddings cache, or the stored images."""
        require_embedding(engine)
        state = self._state(model_name)
        key = engine_key(engine)
        index = self._indexes.setdefault((model_name, key), Index())
        if index.generation == state.generation:
            return index
        cache = self._cache_path(model_name, key)
        if not index.loaded:
            on_disk = load_cache(cache)
            index.vectors = {**on_disk, **index.vectors}
            index.patches = {**load_patch_cache(cache), **index.patches}
            index.loaded, index.saved = True, len(on_disk) + len(index.patches)
        index.products, index.members, index.calibrations, index.signatures = {}, {}, {}, {}
        for product, members in state.products().items():
            self._index_product(engine, model_name, index, product, members)
        index.generation = state.generation
        if len(index.vectors) + len(index.patches) > index.saved and state.stamp is not None:
            try:
                save_cache(cache, index.vectors, index.patches)
                index.saved = len(index.vectors) + len(index.patches)
            except OSError as error:  # a cache: the next build embeds again
                log.warning(
                    "reference embedding cache not written", extra={"path": str(cache), "error": str(error)}
                )
        return index

    def _index_product(
        self, engine: Engine, model_name: str, index: Index, product: str, members: list[Reference]
    ) -> None:
        """One product's embeddings and calibrations; its patch signature when every reference has
        local features and there are enough of them (caller holds the lock)."""
        usable = [(r, v) for r in members if (v := self._vector(engine, model_name, index, r)) is not None]
        if not usable:
            return
        rows = unit_rows(np.stack([v for _, v in usable]))
        index.products[product] = rows
        index.members[product] = tuple(r.reference_id for r, _ in usable)
        calibration = calibrate(rows, self.false_alarm_rate, self.min_references)
        index.calibrations[product] = calibration
        patches = [index.patches.get(r.sha256) for r, _ in usable]
        if not calibration.abstains and all(p is not None for p in patches):
            index.signatures[product] = calibrate_patches(patches, self.false_alarm_rate)  # type: ignore[arg-type]

    def _product_index(self, engine: Engine, product: str) -> ProductEntry:
        validate_product(product)
        model_name = engine.name
        with self._lock:
            index = self._index(engine, model_name)
            if product not in index.products:
                raise UnknownProduct(product, sorted(index.products), model_name)
            return index.entry(product)

    def ready(self, engine: Engine, product: str) -> bool:
        """Whether `check` would answer at once: the engine's index is current and holds the product
        (else the first check embeds or calibrates, which takes seconds)."""
        with self._lock:
            return self._current_entry(engine, product) is not None

    def _current_entry(self, engine: Engine, product: str) -> ProductEntry | None:
        """The product's index entry when the engine's index is current (one stat of the events file),
        else None (caller holds the lock)."""
        model_name = engine.name
        index = self._indexes.get((model_name, engine_key(engine)))
        state = self._states.get(model_name)
        if index is None or state is None or index.generation != state.generation:
            return None
        current = product in index.products and file_stamp(self._events_path(model_name)) == state.stamp
        return index.entry(product) if current else None

    def check_if_ready(
        self,
        engine: Engine,
        product: str,
        embedding: np.ndarray,
        patches: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
    ) -> ReferenceCheck | None:
        """`check` when it answers at once (the index is current and holds the product), else None: the
        caller then runs `check` where seconds of embedding and calibration do no harm (one look at the
        events file, where `ready` then `check` took two)."""
        validate_product(product)
        with self._lock:
            entry = self._current_entry(engine, product)
        return None if entry is None else answer_check(product, entry, embedding, patches, grid)

    def check(
        self,
        engine: Engine,
        product: str,
        embedding: np.ndarray,
        patches: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
    ) -> ReferenceCheck:
        """The reference check of one image (from `engine`) against `product`'s genuine references:
        by its local features against the product's patch signature when both exist, else by its
        embedding's nearest reference; `mismatch` beyond the product's LOO threshold, `abstained` with
        fewer than MIN_REFERENCES. UnknownProduct (with the known names) for a product without
        references. With the closest references, and the difference map when `grid` says the patches are
        one map of the image (`Prediction.patch_grid`; None: no map, as evaluation needs none)."""
        return answer_check(product, self._product_index(engine, product), embedding, patches, grid)

    def calibration(self, engine: Engine, product: str) -> dict[str, Any]:
        """The product's calibration with this engine (threshold, spread, LOO summary), for listings."""
        entry = self._product_index(engine, product)
        return describe_calibration(product, entry.calibration, entry.signature)
