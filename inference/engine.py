"""OnnxEngine: runs an exported Verity model with onnxruntime and turns logits into verdicts.

The ONNX file is self-describing: its metadata carries the PreprocessSpec and the model card
(thresholds, calibration temperature, name, version). A model without them is refused, so a server
can never apply the wrong preprocessing or thresholds to a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.spec import PreprocessSpec

METADATA_SPEC_KEY = "verity.spec"
METADATA_CARD_KEY = "verity.card"
VERDICTS = ("genuine", "counterfeit", "uncertain")


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
        if score >= self.alarm:
            return "counterfeit"
        if score <= self.clear:
            return "genuine"
        return "uncertain"


@dataclass(frozen=True)
class Prediction:
    score: float  # calibrated probability of counterfeit
    verdict: str
    logits: tuple[float, ...]
    # Class activation map for "counterfeit minus genuine" on the model's feature grid, or None.
    cam: np.ndarray | None = None


def calibrated_scores(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probability of class 1 (counterfeit) after temperature scaling, computed stably."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp[:, 1] / exp.sum(axis=1)).astype(np.float64)


def read_metadata(path: str | Path) -> tuple[PreprocessSpec, dict[str, Any]]:
    """Reads spec and card from an ONNX file's metadata without building a session for it."""
    import onnxruntime as ort

    session = _open_session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
    return _spec_and_card(session, path)


def _open_session(path: str | Path, options: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ModelLoadError(f"No model file at {path}.")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for corrupt files
        raise ModelLoadError(f"{path} is not a loadable ONNX model: {error}") from error


def _spec_and_card(session: Any, path: str | Path) -> tuple[PreprocessSpec, dict[str, Any]]:
    props = session.get_modelmeta().custom_metadata_map
    missing = [key for key in (METADATA_SPEC_KEY, METADATA_CARD_KEY) if key not in props]
    if missing:
        raise ModelLoadError(
            f"{path} lacks the metadata {', '.join(missing)}: only models exported by `verity export` "
            "carry the preprocessing spec and thresholds the server needs."
        )
    try:
        return PreprocessSpec.from_json(props[METADATA_SPEC_KEY]), json.loads(props[METADATA_CARD_KEY])
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} has unreadable spec or card metadata: {error}") from error


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(preferred: str | None = None, available: list[str] | None = None) -> list[str]:
    """Best available provider first (TensorRT, CUDA, CPU), or exactly the one asked for."""
    available = available_providers() if available is None else available
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if preferred:
        name = preferred if preferred.endswith("ExecutionProvider") else f"{preferred.upper()}ExecutionProvider"
        name = {"TENSORRTExecutionProvider": "TensorrtExecutionProvider"}.get(name, name)
        if name not in available:
            raise ModelLoadError(f"Provider {preferred!r} is not available here. Available: {', '.join(available)}.")
        return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    return [p for p in order if p in available] or ["CPUExecutionProvider"]


class OnnxEngine:
    """One loaded model. `predict` takes preprocessed CxSxS inputs and returns one Prediction each."""

    def __init__(
        self,
        path: str | Path,
        provider: str | None = None,
        intra_op_threads: int = 1,
        warmup: bool = True,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One intra-op thread per session beat two on 2 cores under concurrent load (DESIGN.md §5).
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = _open_session(path, options, choose_providers(provider))
        self.spec, self.card = _spec_and_card(self.session, path)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        self.thresholds = Thresholds(**{k: self.card["thresholds"][k] for k in ("alarm", "clear")})
        self.temperature = float(self.card.get("calibration", {}).get("temperature", 1.0))
        if warmup:
            self.warmup()

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

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
            raise ValueError(f"Expected a batch of shape (N, {', '.join(map(str, self.input_shape()))}), got {batch.shape}.")
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.output_names, outputs, strict=True))

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        """Scores preprocessed inputs in one batch and applies the model's thresholds."""
        batch = np.stack(inputs) if isinstance(inputs, list) else inputs
        outputs = self.run(batch)
        logits = outputs["logits"]
        scores = calibrated_scores(logits, self.temperature)
        cams = outputs.get("cam") if with_cam else None
        return [
            Prediction(
                score=float(score),
                verdict=self.thresholds.verdict(float(score)),
                logits=tuple(float(x) for x in row),
                cam=(cams[i, 1] - cams[i, 0]) if cams is not None else None,
            )
            for i, (score, row) in enumerate(zip(scores, logits, strict=True))
        ]
