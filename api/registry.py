"""Model registry: every <name>/<version>/model.onnx under the models folder, loaded side by side.

The default per modality is, in this order: the one pinned in settings; the version a model's
`production` alias names (`verity promote`, recorded in the audit store, so every worker and box reads
the same), the latest promoted when several names of the modality have one; else the newest version
that is not marked weak, in the natural version order of `inference.artifacts`. Once a model has a
production alias, a new folder never goes live by itself. Reload loads new or changed files beside the
serving ones, warms them, then swaps the whole snapshot in one assignment, so a request sees either the
old set or the new one, never a mix. A file that fails to load is reported and the version it would
have replaced keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from verity.api.audit_records import ModelEvent, current_aliases
from verity.api.settings import Settings
from verity.inference.artifacts import scan_model_files, version_sort_key
from verity.inference.batcher import BatcherClosedError, BatchStats, MicroBatcher
from verity.inference.engine import GPU_PROVIDERS, ModelLoadError, OnnxEngine, Prediction, usable_cores
from verity.inference.stamps import file_stamp
from verity.inference.vocabulary import MODALITIES

log = logging.getLogger("verity.api.registry")

ModelKey = tuple[str, str]  # (name, version)
EngineFactory = Callable[[Path], OnnxEngine]
PRODUCTION = "production"  # the alias a modality's default follows
# The micro-batcher's wait for a fuller batch on a GPU, the setting unset (`ServedModel.batch_delay_ms`).
GPU_BATCH_DELAY_MS = 4.0


def freeze_long_lived() -> None:
    """Takes what a load left on the heap (the app, the engines, their cards and banks' Python objects:
    about 90,000 objects with the shipped models) out of the cyclic collector's scans, so that a full
    collection reads only what requests made since: it was a 27-41 ms pause with the GIL held
    (benchmarks/server_tail.py), on the tail of every answer in flight. Unfrozen and collected first, so
    that the models a reload retired are freed, cycles and all (`gc.freeze`'s advice for servers)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServedModel:
    """One loaded engine plus the micro-batcher that feeds it."""

    def __init__(
        self,
        engine: OnnxEngine,
        path: Path,
        settings: Settings,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.path = path
        self.stamp = file_stamp(path)
        self.settings = settings
        self._on_batch = on_batch
        self._batcher: Any = None

    @property
    def key(self) -> ModelKey:
        return (self.engine.name, self.engine.version)

    @property
    def modality(self) -> str:
        return str(self.engine.spec.modality)

    def run_batch(self, batch: np.ndarray | list[np.ndarray]) -> list[Prediction]:
        """Runs one collated batch; the CAM comes out of the same pass, so it is always returned."""
        return list(self.engine.predict(batch, with_cam=True))

    def _observe(self, stats: BatchStats) -> None:
        if self._on_batch is not None:
            self._on_batch(stats.size)

    async def start(self) -> None:
        self._batcher = MicroBatcher(
            self.run_batch,
            max_batch_size=self.settings.batch_max_size,
            max_delay_ms=self.batch_delay_ms(),
            max_queue=self.settings.batch_max_queue,
            on_batch=self._observe,
            workers=self._batch_workers(),
        )
        await self._batcher.start()

    def batch_delay_ms(self) -> float:
        """The micro-batcher's wait for a fuller batch: the setting, or unset none on CPU and
        GPU_BATCH_DELAY_MS on a GPU (why: `Settings.batch_max_delay_ms`)."""
        if self.settings.batch_max_delay_ms is not None:
            return self.settings.batch_max_delay_ms
        return GPU_BATCH_DELAY_MS if self.engine.providers[0] in GPU_PROVIDERS else 0.0

    def _batch_workers(self) -> int:
        if self.settings.batch_workers is not None:
            return self.settings.batch_workers
        if self.engine.providers[0] in GPU_PROVIDERS:
            return 1  # one stream of batches keeps a GPU busy; more would only queue on the device
        return max(1, usable_cores() // self.settings.worker_processes)

    async def stop(self, drain: bool = True) -> None:
        if self._batcher is not None:
            await self._batcher.stop(drain=drain)

    def queue_depth(self) -> int:
        return self._batcher.queue_depth() if self._batcher is not None else 0

    async def predict(self, model_input: np.ndarray) -> Prediction:
        """Scores one CxSxS input, batched with concurrent requests; QueueFullError when the queue is full."""
        if self._batcher is not None:
            try:
                result: Prediction = await self._batcher.submit(model_input)
                return result
            except BatcherClosedError:
                # This version was swapped out by a reload after the request picked it: the engine is
                # still loaded, so answer with it directly rather than fail the request.
                pass
        return (await run_in_threadpool(self.run_batch, [model_input]))[0]

    def describe(self, is_default: bool) -> dict[str, Any]:
        card = self.engine.card
        thresholds = self.engine.thresholds
        return {
            "name": self.engine.name,
            "version": self.engine.version,
            "modality": self.modality,
            "default": is_default,
            "weak": card.weak,
            "backbone": card.backbone,
            "created": card.created,
            "thresholds": {"alarm": thresholds.alarm, "clear": thresholds.clear},
            "input_shape": list(self.engine.input_shape()),
            "metrics": card.metrics,
            "data_fingerprint": card.data_fingerprint,
            "lineage": card.lineage,
            # Which file variant and execution provider answer: an INT8 model is a different file.
            "precision": self.engine.precision,
            "provider": self.engine.providers[0],
        }


@dataclass(frozen=True)
class Snapshot:
    models: dict[ModelKey, ServedModel] = field(default_factory=dict)
    defaults: dict[str, ModelKey] = field(default_factory=dict)  # modality -> key
    aliases: dict[ModelKey, list[str]] = field(default_factory=dict)  # key -> the aliases naming it


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    defaults: dict[str, str] = field(default_factory=dict)
    # Loaded models marked weak in their card, left out of the defaults (VERITY_PINNED_MODELS serves one).
    passed_over: list[str] = field(default_factory=list)
    # Modalities whose default had no production alias yet: it became one (recorded in the audit).
    adopted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _label(key: ModelKey) -> str:
    return f"{key[0]}/{key[1]}"


class ModelRegistry:
    """The models being served; `snapshot` is replaced whole, never mutated."""

    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory or self._onnx_engine
        self.on_batch = on_batch
        self.snapshot = Snapshot()
        self.ready = False
        self.last_report: ReloadReport | None = None
        self.load_finished = False  # a first scan of the models folder has ended (loaded or not)
        self._reload_lock = asyncio.Lock()
        # The promotions and rollbacks (the audit store's model events), read at each reload; none until
        # the app's lifespan connects the store.
        self.model_events: Callable[[], list[ModelEvent]] = list
        # Records the models that became their production alias at a first start (api/lifecycle_cli.adopt)
        # and returns every model event after it; None: aliases are not kept (no audit store yet).
        self.record_adoption: Callable[[list[ModelKey]], list[ModelEvent]] | None = None

    def _onnx_engine(self, path: Path) -> OnnxEngine:
        engine = OnnxEngine(
            path,
            provider=self.settings.provider,
            intra_op_threads=self.settings.intra_op_threads,
            warmup=False,
            precision=self.settings.precision,
            cache_dir=self.settings.engine_cache_dir,
        )
        if self.settings.warmup:
            # Every batch size the batcher can form: onnxruntime sizes its memory arena per shape, so
            # warming them all makes resident memory plateau at start instead of creeping up in service.
            engine.warmup(tuple(range(1, self.settings.batch_max_size + 1)))
        return engine

    def _load_files(self, current: Snapshot) -> tuple[dict[ModelKey, ServedModel], ReloadReport]:
        """Blocking: loads and warms every new or changed file; keeps what is unchanged or broken."""
        report = ReloadReport()
        by_path = {served.path.resolve(): served for served in current.models.values()}
        models: dict[ModelKey, ServedModel] = {}
        for path in scan_model_files(self.settings.models_dir):
            previous = by_path.get(path.resolve())
            try:
                if previous is not None and previous.stamp == file_stamp(path):
                    models[previous.key] = previous
                    report.kept.append(_label(previous.key))
                    continue
                served = ServedModel(self.engine_factory(path), path, self.settings, self.on_batch)
            except (ModelLoadError, OSError, ValueError, KeyError, TypeError) as error:
                log.warning("model failed to load", extra={"path": str(path), "error": str(error)})
                report.failed.append({"path": str(path), "error": str(error)})
                if previous is not None:  # the old version of this file keeps serving
                    models[previous.key] = previous
                    report.kept.append(_label(previous.key))
                continue
            if served.key in models:
                report.failed.append({"path": str(path), "error": f"duplicate model {_label(served.key)}"})
                continue
            models[served.key] = served
            report.loaded.append(_label(served.key))
        return models, report

    def _choose_defaults(
        self, models: dict[ModelKey, ServedModel], report: ReloadReport, events: list[ModelEvent]
    ) -> dict[str, ModelKey]:
        """Each modality's default (module docstring): the pinned model, else the production alias, else
        the newest that is not marked weak (a run the weak-run guard refused, kept with --allow-weak,
        answers only when an operator pins or promotes it)."""
        promoted = [event for event in current_aliases(events).values() if event.alias == PRODUCTION]
        defaults: dict[str, ModelKey] = {}
        for modality in sorted({m.modality for m in models.values()}):
            candidates = [k for k, m in models.items() if m.modality == modality]
            pin = self.settings.pinned_models.get(modality)
            if pin:
                name, _, version = pin.partition("/")
                pinned = [k for k in candidates if k[0] == name and (not version or k[1] == version)]
                if pinned:
                    defaults[modality] = max(pinned, key=lambda k: (version_sort_key(k[1]), k[0]))
                    continue
                report.failed.append({"path": pin, "error": f"pinned {modality} model {pin} is not loaded"})
            names = {k[0] for k in candidates}
            aliased = [event for event in promoted if event.model_name in names]
            if aliased:  # the latest promotion among the modality's names decides, never the newest folder
                latest = aliased[-1]
                key = (latest.model_name, latest.version)
                previous = (latest.model_name, latest.previous_version)
                if key in models:
                    defaults[modality] = key
                    continue
                # Its folder is gone: the version it replaced serves, if it is here; else nothing does.
                fallback = f"; serving the one before, {_label(previous)}" if previous in models else ""
                missing = f"{PRODUCTION} alias of {latest.model_name} names {latest.version}: not loaded"
                report.failed.append({"path": _label(key), "error": missing + fallback})
                if previous in models:
                    defaults[modality] = previous
                continue
            sound = [k for k in candidates if not models[k].engine.card.weak]
            for key in sorted(set(candidates) - set(sound)):
                report.passed_over.append(_label(key))
                log.warning("weak model not made a default", extra={"model": _label(key)})
            if sound:
                defaults[modality] = max(sound, key=lambda k: (version_sort_key(k[1]), k[0]))
                report.adopted.append(modality)  # no alias yet: this one becomes its production alias
        return defaults

    async def reload(self) -> ReloadReport:
        """Loads what changed beside what serves, starts its batchers, swaps, then drains the old ones.
        When the set of models changed, what the load left is frozen (`freeze_long_lived`), once the
        retired models are no longer referenced from here."""
        report, changed = await self._reload()
        if changed and self.settings.gc_freeze:
            freeze_long_lived()
        return report

    async def _reload(self) -> tuple[ReloadReport, bool]:
        """`reload`'s work: its report, and whether any model was loaded or retired."""
        async with self._reload_lock:
            try:
                current = self.snapshot
                models, report = await run_in_threadpool(self._load_files, current)
                events = await run_in_threadpool(self.model_events)
                defaults = self._choose_defaults(models, report, events)
                if self.record_adoption is not None and report.adopted:
                    adopted = [defaults[modality] for modality in report.adopted]
                    events = await run_in_threadpool(self.record_adoption, adopted)
                for key, served in models.items():
                    if current.models.get(key) is not served:
                        await served.start()
                named: dict[ModelKey, list[str]] = {}
                for (name, alias), event in current_aliases(events).items():
                    named.setdefault((name, event.version), []).append(alias)
                self.snapshot = Snapshot(models=models, defaults=defaults, aliases=named)  # the atomic swap
                retired = [m for k, m in current.models.items() if models.get(k) is not m]
                for served in retired:
                    await served.stop(drain=True)
                report.unloaded = [_label(m.key) for m in retired if m.key not in models]
                report.defaults = {modality: _label(key) for modality, key in defaults.items()}
                # Ready when every modality this server serves has a model (VERITY_MODALITIES).
                self.ready = all(modality in defaults for modality in self.settings.modalities)
                self.last_report = report
                if not models:
                    log.warning("no models loaded", extra={"models_dir": str(self.settings.models_dir)})
                return report, bool(report.loaded or retired)
            finally:
                self.load_finished = True  # even after a failed scan: /readyz then says what is missing

    def default_for(self, modality: str) -> ServedModel | None:
        snapshot = self.snapshot
        key = snapshot.defaults.get(modality)
        return snapshot.models.get(key) if key else None

    def readiness_message(self) -> str:
        """What /readyz says: the model serving each modality, or why a modality has none."""
        missing = [modality for modality in self.settings.modalities if self.default_for(modality) is None]
        if missing:
            return self.unavailable_message(missing)
        defaults = self.snapshot.defaults.items()
        serving = ", ".join(f"{modality} with {_label(key)}" for modality, key in defaults)
        return f"Serving {serving} from {self.settings.models_dir.absolute()}."

    def unavailable_message(self, modalities: list[str]) -> str:
        """Why these modalities have no model, for /readyz and 503 bodies: still loading, or nothing
        for them in the models folder (which never fixes itself, so the folder is named)."""
        if not self.load_finished:
            return "Models are still loading; retry shortly."
        where = self.settings.models_dir.absolute()
        found = "; ".join(f"no model for {modality} in {where}" for modality in modalities)
        hint = ("put <name>/<version>/model.onnx there, set VERITY_MODELS_DIR, or list in VERITY_MODALITIES "
                "only the modalities this server serves")  # fmt: skip
        return f"{found[0].upper()}{found[1:]}: {hint}."

    def find(self, name: str, version: str | None = None) -> ServedModel | None:
        """A model by name and version; by name alone, the version that serves its modality by default,
        else the one its production alias names, else its newest."""
        snapshot = self.snapshot
        if version:
            return snapshot.models.get((name, version))
        matching = [k for k in snapshot.models if k[0] == name]
        if not matching:
            return None
        preferred = [k for k in matching if k in snapshot.defaults.values()]
        preferred = preferred or [k for k in matching if PRODUCTION in snapshot.aliases.get(k, [])]
        return snapshot.models[max(preferred or matching, key=lambda k: version_sort_key(k[1]))]

    def resolve(self, reference: str) -> ServedModel | None:
        """A model as a client names it: `name`, `name/version`, `name@alias` (e.g. photo-default@production,
        which follows every promotion) or a modality (`photo`, `xray`: the model serving it by default)."""
        name, at, alias = reference.partition("@")
        if at:
            keys = [k for k, names in self.snapshot.aliases.items() if k[0] == name and alias in names]
            return self.snapshot.models.get(keys[0]) if keys else None
        name, _, version = reference.partition("/")
        found = self.find(name, version or None)
        if found is None and not version and name in MODALITIES:
            found = self.default_for(name)
        return found

    async def close(self) -> None:
        """Drains every batcher: queued requests get their answers before shutdown completes."""
        async with self._reload_lock:
            snapshot, self.snapshot, self.ready = self.snapshot, Snapshot(), False
            for served in snapshot.models.values():
                await served.stop(drain=True)
