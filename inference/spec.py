"""PreprocessSpec: the one description of how an image becomes a model input.

It travels with every model (checkpoint and ONNX metadata). Training, evaluation, export and serving
all obtain it through `resolve_spec`, so there is exactly one precedence rule:
explicit override > spec stored in the artifact > defaults for the modality.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from verity.inference.vocabulary import LABELS, MODALITIES

RESIZE_MODES = ("stretch", "letterbox")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


class SpecError(ValueError):
    """A spec that is inconsistent or names an unsupported option."""


def _invalid(field: str, value: object, valid: tuple[str, ...]) -> str:
    return f"Invalid {field} {value!r}. Only {', '.join(valid)} are supported."


@dataclass(frozen=True)
class PreprocessSpec:
    modality: str
    in_chans: int
    image_size: int
    resize_mode: str = "stretch"
    interpolation: str = "bilinear"
    # Raw intensity window (low, high) for 16-bit and float images, mapped to [0, 1]. None: the full
    # range of the image's integer dtype (0..65535 for 16-bit), or [0, 1] for float images.
    window: tuple[float, float] | None = None
    # Normalization constants; applied by the model's first layer, never by the decoder.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    labels: tuple[str, ...] = LABELS

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise SpecError(_invalid("modality", self.modality, MODALITIES))
        if self.in_chans not in (1, 2, 3):
            raise SpecError(
                f"Invalid in_chans {self.in_chans}. Only 1 (X-ray), 2 (dual-energy) and 3 are supported."
            )
        if not 16 <= self.image_size <= 4096:
            raise SpecError(f"Invalid image_size {self.image_size}: it must lie between 16 and 4096.")
        if self.resize_mode not in RESIZE_MODES:
            raise SpecError(_invalid("resize_mode", self.resize_mode, RESIZE_MODES))
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(_invalid("interpolation", self.interpolation, INTERPOLATIONS))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise SpecError(f"mean and std need {self.in_chans} values each, one per input channel.")
        if any(s <= 0 for s in self.std):
            raise SpecError("std values must be positive.")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise SpecError(f"Invalid window {self.window}: low must be below high.")
        if tuple(self.labels) != LABELS:
            raise SpecError(f"labels must be {LABELS}: the score is the probability of {LABELS[1]!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(
                f"Unknown spec fields: {', '.join(sorted(unknown))}. Known: {', '.join(sorted(known))}."
            )
        values = dict(data)
        for key in ("mean", "std", "labels", "window"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))


# ImageNet statistics for photos (the pretrained backbones expect them); X-ray transmission images
# have no colour, so one neutral channel statistic each.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "photo": dict(
        in_chans=3, image_size=224, resize_mode="stretch", interpolation="bilinear",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    ),
    "xray": dict(
        in_chans=1, image_size=224, resize_mode="letterbox", interpolation="bilinear",
        mean=(0.449,), std=(0.226,),
    ),
}


def default_spec(modality: str) -> PreprocessSpec:
    """The defaults for a modality; `PreprocessSpec` validation names the valid modalities."""
    if modality not in _DEFAULTS:
        raise SpecError(_invalid("modality", modality, MODALITIES))
    return PreprocessSpec(modality=modality, **_DEFAULTS[modality])


def resolve_spec(
    modality: str | None = None,
    stored: PreprocessSpec | dict[str, Any] | None = None,
    override: dict[str, Any] | None = None,
) -> PreprocessSpec:
    """Resolves the spec with the one precedence rule: override > stored > defaults.

    `modality` picks the defaults when nothing is stored; an override may change any field. When an
    override changes `in_chans` without giving mean/std, the channel statistics are averaged to fit.
    """
    if isinstance(stored, dict):
        stored = PreprocessSpec.from_dict(stored)
    if stored is None:
        chosen = (override or {}).get("modality") or modality
        if chosen is None:
            raise SpecError("Cannot resolve a spec without a modality or a stored spec.")
        base = default_spec(chosen)
    else:
        if modality is not None and stored.modality != modality:
            raise SpecError(f"The artifact is a {stored.modality!r} model, not {modality!r}.")
        base = stored
    if not override:
        return base
    values = {**base.to_dict(), **override}
    in_chans = values["in_chans"]
    for key in ("mean", "std"):
        if key not in override and len(values[key]) != in_chans:
            average = sum(values[key]) / len(values[key])
            values[key] = (average,) * in_chans
    return PreprocessSpec.from_dict(values) if values != base.to_dict() else replace(base)
