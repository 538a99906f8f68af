"""OnnxEngine: runs an exported Verity model with onnxruntime and turns logits into verdicts.

The ONNX file is self-describing: its metadata carries the PreprocessSpec and the model card
(thresholds, calibration temperature, name, version). A model without them is refused, so a server
can never apply the wrong preprocessing or thresholds to a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from verity.inference.bank import unit_rows
from verity.inference.card import ModelCard
from verity.inference.gate_record import load_novelty_gate
from verity.inference.heatmap import feature_alignment
from verity.inference.open_set import NoveltyGate, OpenSetError
from verity.inference.references.patch_check import unit_patches
from verity.inference.spec import PreprocessSpec
from verity.inference.vocabulary import VERDICTS, finite_score, verdict_codes

METADATA_SPEC_KEY = "verity.spec"
METADATA_CARD_KEY = "verity.card"


class ModelLoadError(RuntimeError):
    """The model file is missing, corrupt, or lacks the metadata a Verity model must carry."""


@dataclass(frozen=True)
class Thresholds:
    """`alarm`: counterfeit at or above; `clear`: genuine at or below; uncertain between."""

    alarm: float
    clear: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.clear <= self.alarm <= 1.0:
            raise ValueError(f"Thresholds must satisfy 0 <= clear <= alarm <= 1, got {self}.")

    def verdict(self, score: float) -> str:
        """The verdict name of one score, by the one verdict rule (`vocabulary.verdict_codes`); a NaN or
        infinite score raises NonFiniteScore instead of becoming a verdict."""
        return VERDICTS[int(verdict_codes(finite_score(score), self.alarm, self.clear))]


@dataclass(frozen=True)
class Prediction:
    """What the model says of one input, before any verdict: the verdict is decided once, from every
    piece of evidence together, in `inference.pipeline.judge`."""

    score: float  # calibrated probability of counterfeit
    logits: tuple[float, ...]
    # Class activation map for "counterfeit minus genuine" on the model's feature grid, or None.
    cam: np.ndarray | None = None
    # The model's `embedding` output (D float32, L2-normalised), or None for a model without one.
    embedding: np.ndarray | None = None
    # L x C unit rows: the `patches` output (local features) the product reference check compares, or
    # None for a model without it.
    patches: np.ndarray | None = None
    # Rows and columns of the map `patches` was read from (row-major), so a location can be drawn where it
    # lies in the input; None when the rows are not one map of the input (a scan's tiles, concatenated).
    patch_grid: tuple[int, int] | None = None


class Engine(Protocol):
    """What scoring needs from a model, whichever runtime runs it: `OnnxEngine` here, training's torch
    `ModuleScorer` in evaluation. Its features are typed attributes, never probed for."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def spec(self) -> PreprocessSpec: ...

    @property
    def thresholds(self) -> Thresholds: ...

    @property
    def novelty_gate(self) -> NoveltyGate | None: ...  # None: the model has no gate

    @property
    def output_names(self) -> list[str]: ...  # "embedding" and "patches" among them when it gives them

    @property
    def precision(self) -> str: ...  # fp32, fp16 or int8: which file variant answers

    @property
    def path(self) -> Path | None: ...  # the model file; None for an in-memory model

    @property
    def feature_alignment(self) -> str: ...  # heatmap.CORNER or CENTRE: where its maps lie over the input

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        """One Prediction per preprocessed CxSxS input, in order."""
        ...


def calibrated_scores(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probability of class 1 (counterfeit) after temperature scaling, computed stably."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp[:, 1] / exp.sum(axis=1)).astype(np.float64)


def read_metadata(path: str | Path) -> tuple[PreprocessSpec, ModelCard]:
    """Reads spec and card from an ONNX file's metadata without building a session for it."""
    import onnxruntime as ort

    session = _open_session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
    return _spec_and_card(session, path)


def _open_session(path: str | Path, options: Any, providers: list[Any]) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ModelLoadError(f"No model file at {path}.")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for corrupt files
        raise ModelLoadError(f"{path} is not a loadable ONNX model: {error}") from error


def _spec_and_card(session: Any, path: str | Path) -> tuple[PreprocessSpec, ModelCard]:
    props = session.get_modelmeta().custom_metadata_map
    missing = [key for key in (METADATA_SPEC_KEY, METADATA_CARD_KEY) if key not in props]
    if missing:
        raise ModelLoadError(
            f"{path} lacks the metadata {', '.join(missing)}: only models exported by `verity export` "
            "carry the preprocessing spec and thresholds the server needs."
        )
    try:
        spec = PreprocessSpec.from_json(props[METADATA_SPEC_KEY])
        return spec, ModelCard.from_json(props[METADATA_CARD_KEY])
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} has unreadable spec or card metadata: {error}") from error


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_ORDER = (*GPU_PROVIDERS, "CPUExecutionProvider")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
# Sibling files of model.onnx that `precision` selects (written by training/quantize.py).
VARIANT_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


def provider_name(preferred: str) -> str:
    """'cpu', 'cuda', 'tensorrt' (any case) or a full ORT provider name -> the ORT provider name."""
    name = preferred if preferred.endswith("ExecutionProvider") else f"{preferred.upper()}ExecutionProvider"
    return {"TENSORRTExecutionProvider": "TensorrtExecutionProvider", "TRTExecutionProvider":
            "TensorrtExecutionProvider"}.get(name, name)


def choose_providers(preferred: str | None = None, available: list[str] | None = None) -> list[str]:
    """Best available provider first (TensorRT, CUDA, CPU), or exactly the one asked for.

    A GPU provider is always followed by the CPU one, so nodes a GPU provider cannot run fall back to
    the CPU instead of failing the session.
    """
    available = available_providers() if available is None else available
    if preferred:
        name = provider_name(preferred)
        if name not in available:
            raise ModelLoadError(
                f"Provider {preferred!r} is not available here. Available: {', '.join(available)}."
            )
        if name == "CPUExecutionProvider":
            return [name]
        return [name, "CUDAExecutionProvider", "CPUExecutionProvider"] if (
            name == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available
        ) else [name, "CPUExecutionProvider"]
    return [p for p in PROVIDER_ORDER if p in available] or ["CPUExecutionProvider"]


def provider_options(
    providers: list[str], fp16: bool = False, cache_dir: str | Path | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Deliberate options per provider, in the (name, options) form InferenceSession accepts.

    TensorRT: fp16 kernels when asked (TensorRT builds the fp16 engine itself from the fp32 graph) and an
    engine cache, since building an engine takes minutes. CUDA: exhaustive cuDNN algorithm search once
    (inputs have a fixed spatial size, so the search pays off), and no arena growth beyond what is used.
    """
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in providers:
        options: dict[str, Any] = {}
        if name == "TensorrtExecutionProvider":
            options = {"trt_fp16_enable": bool(fp16), "trt_max_workspace_size": 2 * 1024**3}
            if cache_dir is not None:
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        elif name == "CUDAExecutionProvider":
            options = {"cudnn_conv_algo_search": "EXHAUSTIVE", "arena_extend_strategy": "kSameAsRequested"}
        chosen.append((name, options))
    return chosen


def resolve_variant(path: str | Path, precision: str, providers: list[str]) -> tuple[Path, str]:
    """Which file to load for the precision asked: (path, precision actually used).

    "auto" takes model.int8.onnx on CPU and model.fp16.onnx on CUDA when they sit beside `path` (they
    exist only if they passed their accuracy gate), else the fp32 file; TensorRT gets fp32 and builds
    its own fp16 engine. "int8"/"fp16" insist on the variant file; fp16 only runs on a GPU provider.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision {precision!r}. Only {', '.join(PRECISIONS)} are supported.")
    path = Path(path)
    first = providers[0]
    if precision == "auto":
        if first == "CUDAExecutionProvider" and (path.parent / VARIANT_FILES["fp16"]).is_file():
            return path.parent / VARIANT_FILES["fp16"], "fp16"
        if first == "CPUExecutionProvider" and (path.parent / VARIANT_FILES["int8"]).is_file():
            return path.parent / VARIANT_FILES["int8"], "int8"
        return path, "fp16" if first == "TensorrtExecutionProvider" else "fp32"
    if precision == "fp32":
        return path, "fp32"
    if precision == "fp16" and first not in GPU_PROVIDERS:
        raise ModelLoadError("fp16 runs only on a GPU provider (cuda or tensorrt); on CPU use fp32 or int8.")
    if precision == "fp16" and first == "TensorrtExecutionProvider":
        return path, "fp16"
    variant = path.parent / VARIANT_FILES[precision]
    if not variant.is_file():
        raise ModelLoadError(
            f"No {precision} model at {variant}: write it with `verity export --{precision}` "
            "(it is written only when it passes its accuracy gate)."
        )
    return variant, precision


class OnnxEngine:
    """One loaded model. `predict` takes preprocessed CxSxS inputs and returns one Prediction each."""

    def __init__(
        self,
        path: str | Path,
        provider: str | None = None,
        intra_op_threads: int = 1,
        warmup: bool = True,
        *,
        precision: str = "fp32",
        allow_spinning: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        """Loads `path` (model.onnx) for `provider` ("cpu", "cuda", "tensorrt"; None: best available).

        `precision` picks the file variant (see `resolve_variant`); `allow_spinning` lets idle intra-op
        threads spin, which helps a lone benchmark but steals CPU from decoding under load.
        """
        import onnxruntime as ort

        providers = choose_providers(provider)
        model_path, self.precision = resolve_variant(path, precision, providers)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One intra-op thread per session beat two on 2 cores under concurrent load.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self.path = Path(model_path)
        fp16 = self.precision == "fp16"
        self.session = _open_session(model_path, options, provider_options(providers, fp16, cache_dir))
        self.spec, self.card = _spec_and_card(self.session, model_path)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        self.thresholds = Thresholds(alarm=self.card.thresholds["alarm"], clear=self.card.thresholds["clear"])
        self.temperature = self.card.temperature
        try:
            self.novelty_gate = load_novelty_gate(self.card, Path(path).parent)
        except OpenSetError as error:
            raise ModelLoadError(str(error)) from error
        if self.novelty_gate is not None and "embedding" not in self.output_names:
            raise ModelLoadError(
                f"{model_path}'s card has a novelty gate but the graph has no embedding output."
            )
        # IO binding on GPU: inputs are copied to the device once and outputs allocated by ORT, instead
        # of the extra staging copies of session.run.
        self.io_binding = self.providers[0] in GPU_PROVIDERS
        if warmup:
            self.warmup()

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def feature_alignment(self) -> str:
        return feature_alignment(self.card.backbone)

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.in_chans, self.spec.image_size, self.spec.image_size)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Runs dummy batches so the first real request does not pay for allocation and kernel choice."""
        for size in batch_sizes:
            self.run(np.zeros((size, *self.input_shape()), dtype=np.float32))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the graph on an NxCxSxS float32 batch; returns every output by name."""
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape():
            shape = ", ".join(map(str, self.input_shape()))
            raise ValueError(f"Expected a batch of shape (N, {shape}), got {batch.shape}.")
        batch = np.ascontiguousarray(batch, np.float32)
        if self.io_binding:
            return self._run_bound(batch)
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs, strict=True))

    def _run_bound(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        """Scores preprocessed inputs in one batch: calibrated scores and the model's other outputs."""
        batch = np.stack(inputs) if isinstance(inputs, list) else inputs
        return predictions(self.run(batch), self.temperature, with_cam)


def predictions(outputs: dict[str, np.ndarray], temperature: float, with_cam: bool) -> list[Prediction]:
    """One Prediction per row of a batch's graph outputs (logits, and cam, embedding, patches if there)."""
    logits = outputs["logits"]
    scores = calibrated_scores(logits, temperature)
    cams = outputs.get("cam") if with_cam else None
    # Renormalised here: an INT8 graph's quantized norm leaves rows up to about 1% off unit length.
    embeddings = unit_rows(outputs["embedding"]) if "embedding" in outputs else None
    patch_maps = outputs.get("patches")
    grid = None
    if patch_maps is not None and patch_maps.ndim == 4:  # N x C x rows x columns
        grid = (int(patch_maps.shape[2]), int(patch_maps.shape[3]))
    return [
        Prediction(
            score=float(score),
            logits=tuple(float(x) for x in row),
            cam=(cams[i, 1] - cams[i, 0]) if cams is not None else None,
            embedding=embeddings[i] if embeddings is not None else None,
            patches=unit_patches(patch_maps[i]) if patch_maps is not None else None,
            patch_grid=grid,
        )
        for i, (score, row) in enumerate(zip(scores, logits, strict=True))
    ]


class RemoteEngine:
    """An Engine whose graph runs somewhere else (Triton's classifier model, called through its business
    logic scripting): the card, spec, thresholds and novelty gate are the model's own, read from its
    card.json and the gate's files in `folder`; `run` takes an NxCxSxS batch and returns the graph's
    outputs by name, as `OnnxEngine.run` does."""

    precision = "fp32"

    def __init__(
        self,
        card: ModelCard,
        folder: Path,
        output_names: list[str],
        run: Callable[[np.ndarray, list[str]], dict[str, np.ndarray]],
    ) -> None:
        self.card, self.spec, self.output_names, self._run = card, card.spec, list(output_names), run
        self.thresholds = Thresholds(alarm=card.thresholds["alarm"], clear=card.thresholds["clear"])
        self.temperature = card.temperature
        self.path: Path | None = None
        try:
            self.novelty_gate = load_novelty_gate(card, folder)
        except OpenSetError as error:
            raise ModelLoadError(str(error)) from error

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def feature_alignment(self) -> str:
        return feature_alignment(self.card.backbone)

    @property
    def version(self) -> str:
        return self.card.version

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        batch = np.ascontiguousarray(np.stack(inputs) if isinstance(inputs, list) else inputs, np.float32)
        wanted = [name for name in self.output_names if with_cam or name != "cam"]
        return predictions(self._run(batch, wanted), self.temperature, with_cam)
