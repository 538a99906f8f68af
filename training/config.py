"""The training configuration: one typed dataclass, set from defaults < YAML file < command-line flags.

Unknown keys (in a YAML file) and unknown flags are errors that name the closest valid ones, so a typo
never silently trains with a default. The resolved config is saved with every run (config.yaml in the
run folder and the "config" dict of model.pt), so a run can be re-derived from its artifacts.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    MODALITIES,
)

AMP_MODES = ("auto", "off", "bf16", "fp16")
BALANCE_MODES = ("none", "loss", "sampler")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_PRESETS = ("full", "patch")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the valid options."""


@dataclass
class TrainConfig:
    """Every knob of a training run. Field comments are the help text of the matching CLI flag."""

    data: str = ""  # a manifest (JSONL) or a folder DIR/genuine/*, DIR/counterfeit/*
    modality: str = "photo"  # photo or xray
    model: str = "efficientnet_lite0"  # registry name (see training.models.MODELS)
    pretrained: bool = True  # start from ImageNet weights (the packaged file, or --weights)
    weights: str | None = None  # a local weights file for the backbone (any registry model)
    # Knobs left at None are chosen from the data (training/recipe.py) and the choice is printed.
    image_size: int | None = None  # model input size (default: chosen from the data)
    in_chans: int | None = None  # input channels, 2 = dual-energy X-ray (default: chosen from the data)
    resize_mode: str | None = None  # stretch or letterbox (default: chosen from the aspect ratios)
    epochs: int | None = None  # passes over the training split (default: chosen from the set size)
    max_steps: int | None = None  # stop after this many steps in all; the schedule still spans epochs
    batch_size: int = 32
    lr: float = 1e-3  # peak AdamW rate of the new head at batch 32 (scaled by sqrt(batch / 32))
    backbone_lr_ratio: float = 0.2  # the pretrained backbone's peak rate as a share of the head's
    ema: bool = True  # evaluate and export a moving average of the weights (training/averaging.py)
    weight_decay: float = 0.05
    warmup_epochs: float | None = None  # linear warm-up, then cosine decay (default: 5% of the steps)
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    seed: int = DEFAULT_SPLIT_SEED  # also seeds the split of data without one, as evaluation does
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU where it measured slower), off, bf16, fp16
    device: str = "auto"  # auto, cpu, cuda
    channels_last: bool = True  # about 1.8x faster convolutions on CPU here
    workers: int | None = None  # DataLoader decode workers; None: one per CPU core, at most 4
    patience: int = 3  # early stopping: epochs without a better smoothed validation ROC AUC (0: never)
    balance: str = "loss"  # class imbalance: none, loss (weighted cross-entropy) or sampler
    augment: bool = True  # the modality's augmentation preset (training/augment.py)
    augment_preset: str | None = None  # full or patch (X-ray; default: patch for images under the input size)
    allow_weak: bool = False  # write the model even when the run did not learn (training/guard.py)
    val_fraction: float = DEFAULT_VAL_FRACTION  # grouped split of data without splits
    test_fraction: float = DEFAULT_TEST_FRACTION
    target_false_alarm_rate: float = 0.01
    target_miss_rate: float = 0.05
    out: str = "checkpoints"
    name: str = "model"
    version: str = "dev"
    init_from: str | None = None  # fine-tune a previous model.pt (e.g. on new seizures)
    resume: str | None = None  # continue a run: its last.pt or its run folder
    export: bool = True  # write model.onnx (with the parity gate)
    report: bool = True  # evaluate on the test split and write report.html
    progress: bool = True  # tqdm progress bars
    log_every: int = 10  # steps between loss readings (each one synchronizes the device)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks values whose mistakes would only show deep into a run."""
        choices = {
            "amp": AMP_MODES,
            "balance": BALANCE_MODES,
            "device": DEVICES,
            "modality": MODALITIES,
            "resize_mode": (None, "stretch", "letterbox"),
            "augment_preset": (None, *AUGMENT_PRESETS),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                valid = tuple(option for option in valid if option is not None)
                raise ConfigError(
                    f"Invalid {key} {getattr(self, key)!r}. Only {', '.join(valid)} are supported."
                )
        positive = ("epochs", "batch_size", "lr", "log_every")
        for key in positive:
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)!r}.")
        if not 0 < self.backbone_lr_ratio <= 1:
            raise ConfigError(f"backbone_lr_ratio must be in (0, 1], got {self.backbone_lr_ratio!r}.")
        for key in ("weight_decay", "warmup_epochs", "min_lr_ratio", "label_smoothing"):
            if (getattr(self, key) or 0) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)!r}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}.")
        if self.patience < 0:
            raise ConfigError(f"patience must not be negative, got {self.patience}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must not be negative, got {self.workers}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: it goes into model.pt (read with weights_only=True) and config.yaml."""
        return asdict(self)


def field_types() -> dict[str, type]:
    """The plain type of each field (the X of `X | None`), for parsing flags and YAML values."""
    hints = typing.get_type_hints(TrainConfig)
    plain: dict[str, type] = {}
    for name, hint in hints.items():
        if isinstance(hint, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        plain[name] = typing.get_origin(hint) or hint
    return plain


def _nullable(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def unknown_key_error(key: str, where: str) -> ConfigError:
    """An error for an unknown key that names the closest valid keys."""
    known = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Valid keys: {', '.join(known)}."
    return ConfigError(f"Unknown config key {key!r} in {where}.{hint}")


def _coerce(name: str, value: Any, where: str) -> Any:
    """Checks a YAML value against the field's type (ints are accepted for floats)."""
    if value is None and _nullable(name):
        return None
    expected = field_types()[name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{where}: {name} must be a {expected.__name__}, got {value!r}.")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be an int, got {value!r}.")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file into checked overrides."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}.")
    known = {f.name for f in fields(TrainConfig)}
    overrides = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise unknown_key_error(str(key), str(path))
        overrides[name] = _coerce(name, value, str(path))
    return overrides


def build_config(
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < `base` (e.g. a resumed run's config) < YAML file < `overrides` (command-line flags)."""
    values: dict[str, Any] = dict(base or {})
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    known = {f.name for f in fields(TrainConfig)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise unknown_key_error(key, "the overrides")
        values[key] = value
    unknown = set(values) - known
    if unknown:
        raise unknown_key_error(sorted(unknown)[0], "the base config")
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Writes the resolved config as YAML (sorted keys, so runs diff cleanly)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=True), encoding="utf-8")
    return path
