"""ModelCard: what a trained model says about itself (the contract between training and serving).

`verity train` and `verity export` write it as card.json, into model.pt and into the ONNX metadata;
the engine and the API read it. It lives in `inference` so that serving reads it without torch.
The JSON form is the contract: `to_dict` and `from_dict` map the typed fields onto it key for key
(calibration.temperature, data.fingerprint, ...), so the cards already written load and serialize
back unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from verity.inference.spec import PreprocessSpec
from verity.inference.stamps import utc_now

# The prefix of each card warning the weak-run guard (training.guard) writes for a run kept with --allow-weak.
WEAK_RUN = "weak run: "
# JSON keys every card carries; `warnings` came later, and the variant keys only some files hold.
REQUIRED_KEYS = (
    "name", "version", "modality", "backbone", "created", "data", "metrics", "calibration",
    "thresholds", "spec", "code_version",
)  # fmt: skip
OPTIONAL_KEYS = (
    "warnings", "int8", "precision", "int8_gate", "quantization", "embedding_dim", "novelty", "lineage",
)  # fmt: skip


class CardError(ValueError):
    """A card that is inconsistent, or JSON that is not a Verity card."""


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for cards and metrics: numpy scalars and arrays become floats and lists,
    tuples become lists, and NaN or infinity become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    modality: str
    backbone: str
    spec: PreprocessSpec
    # `alarm` and `clear` (a served model needs both), with the validation figures behind them.
    thresholds: dict[str, Any]
    temperature: float  # calibration: scores are softmax(logits / temperature)
    metrics: dict[str, Any]  # {"val": ..., "test": ...} as training.metrics.compute_metrics reports them
    data_fingerprint: str
    data_counts: dict[str, dict[str, int]]  # {split: {label: n}}
    code_version: str
    # What a reader must know before trusting the thresholds (e.g. too few validation images for the
    # target rates), the lines `verity train` printed. None: a card written before cards had them.
    warnings: tuple[str, ...] | None
    created: str = field(default_factory=lambda: utc_now("seconds"))
    int8: dict[str, Any] | None = None  # the INT8 accuracy gate `verity export --int8` ran (card.json)
    precision: str | None = None  # "int8" or "fp16" in the metadata of a variant file
    int8_gate: dict[str, Any] | None = None  # in model.int8.onnx: the gate it passed
    quantization: dict[str, Any] | None = None  # in model.int8.onnx: the settings that made it
    # Width D of the graph's `embedding` output (N x D, L2-normalised pooled features); None: a model
    # exported before models had one, served without it.
    embedding_dim: int | None = None
    # The "not recognised" gate (inference.open_set.NoveltyGate): threshold, k, the validation rate it was
    # chosen for and achieved, and the bank file beside the model. None: served without the gate.
    novelty: dict[str, Any] | None = None
    # Where the weights started: {"init_from": {"name", "version", "data_fingerprint", "file"}} for a model
    # fine-tuned from another (`verity train --init-from`); None: from ImageNet or from scratch.
    lineage: dict[str, Any] | None = None

    @property
    def weak(self) -> bool:
        """Whether the weak-run guard found the run did not learn and `--allow-weak` kept it anyway: such a
        model never becomes a modality's default by itself (api.registry), only when pinned."""
        return any(warning.startswith(WEAK_RUN) for warning in self.warnings or ())

    def __post_init__(self) -> None:
        if self.spec.modality != self.modality:
            raise CardError(
                f"The card's modality {self.modality!r} differs from the spec's {self.spec.modality!r}."
            )
        missing = [key for key in ("alarm", "clear") if key not in self.thresholds]
        if missing:
            raise CardError(
                f"thresholds lack {', '.join(missing)}: a served model needs both (see choose_thresholds)."
            )
        dim = self.embedding_dim
        if dim is not None and not (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            raise CardError(f"embedding_dim must be a positive integer, got {dim!r}.")
        temperature = self.temperature
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise CardError(f"The calibration temperature must be a positive number, got {temperature!r}.")
        # Plain JSON types from here on, whatever numpy values the caller's figures held.
        plain = {
            "temperature": float(temperature),
            "warnings": None if self.warnings is None else tuple(str(w) for w in self.warnings),
        }
        if self.novelty is not None and not isinstance(self.novelty.get("threshold"), int | float):
            raise CardError(f"novelty needs a numeric threshold, got {self.novelty.get('threshold')!r}.")
        for name in (
            "thresholds", "metrics", "data_counts", "int8", "int8_gate", "quantization", "novelty", "lineage",
        ):  # fmt: skip
            plain[name] = to_jsonable(getattr(self, name))
        for name, value in plain.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The card's JSON form, in the key order card.json has always had."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "modality": self.modality,
            "backbone": self.backbone,
            "created": self.created,
            "data": {"fingerprint": self.data_fingerprint, "counts": self.data_counts},
            "metrics": self.metrics,
            "calibration": {"temperature": self.temperature},
            "thresholds": self.thresholds,
            "spec": self.spec.to_dict(),
            "code_version": self.code_version,
        }
        for key in OPTIONAL_KEYS:
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return to_jsonable(data)  # fresh containers: changing the dict leaves the card as it is

    def to_json(self, indent: int | None = None, sort_keys: bool = False) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=sort_keys)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        unknown = set(data) - {*REQUIRED_KEYS, *OPTIONAL_KEYS}
        if unknown:
            raise CardError(f"Unknown card fields: {', '.join(sorted(unknown))}.")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise CardError(f"The card lacks {', '.join(missing)}.")
        try:
            parts = {
                "data_fingerprint": data["data"]["fingerprint"],
                "data_counts": data["data"]["counts"],
                "temperature": data["calibration"]["temperature"],
                "spec": PreprocessSpec.from_dict(data["spec"]),
                "warnings": data.get("warnings"),
            }
        except (KeyError, TypeError) as error:
            raise CardError(f"The card's data, calibration or spec is malformed: {error!r}.") from error
        names = {f.name for f in fields(cls)}
        given = {key: value for key, value in data.items() if key in names and key not in parts}
        return cls(**given, **parts)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise CardError(f"A card is a JSON object, not {type(data).__name__}.")
        return cls.from_dict(data)
