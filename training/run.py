"""A training run's setup: device and precision, data and spec, model, optimizer and state, the run folder
and its metrics log. `build_run` makes the `Run` that the trainer's loops and the artifacts share.

A run is fresh, resumed (`--resume`: last.pt gives weights, optimizer, RNG and run state) or fine-tuned
(`--init-from`: a model.pt gives weights and spec). It writes to <out>/<name>/<version>/.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from verity.datasets.manifest import ManifestRow
from verity.datasets.rows import data_fingerprint, load_rows, split_counts
from verity.inference.spec import PreprocessSpec, resolve_spec
from verity.inference.vocabulary import LABELS
from verity.training.averaging import WeightAverage
from verity.training.checkpoint import BEST, LAST, load_init, load_resume, unwrap
from verity.training.config import TrainConfig, save_config
from verity.training.distributed import DistInfo, init_distributed
from verity.training.models import build_for_spec, get_entry


# ----------------------------------------------------------------------------------------------- device
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(config: TrainConfig, info: DistInfo) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available.")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """auto: bf16 (or fp16) on CUDA; off on CPU, where bf16 measured 1.8x slower here (no AMX)."""
    if config.amp == "off" or (config.amp == "auto" and device.type == "cpu"):
        return None
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        if device.type == "cpu":
            raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off.")
        return torch.float16
    return torch.bfloat16


BASE_BATCH = 32  # the batch that --lr is given for


def peak_lr(config: TrainConfig) -> float:
    """The head's peak rate for the run's batch: --lr scaled by sqrt(batch / 32), the rule for Adam."""
    return config.lr * math.sqrt(config.batch_size / BASE_BATCH)


def make_optimizer(model: nn.Module, config: TrainConfig, learned_backbone: bool) -> torch.optim.AdamW:
    """AdamW in four groups: a learned backbone (pretrained, or a model fine-tuned again) at
    `backbone_lr_ratio` of the new head's rate (a rate that suits a random head moves pretrained filters
    too far on a small set), and in each part biases and norm scales (1-D tensors) without weight decay,
    as is standard. Each group's `lr_scale` multiplies the schedule's rate (trainer.Schedule)."""
    head = {id(p) for p in getattr(model, "head", nn.Identity()).parameters()}
    backbone_scale = config.backbone_lr_ratio if learned_backbone else 1.0
    groups = []
    for in_head, scale in ((False, backbone_scale), (True, 1.0)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == in_head]
        for decays in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decays]
            if chosen:
                weight_decay = config.weight_decay if decays else 0.0
                groups.append({"params": chosen, "weight_decay": weight_decay, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=peak_lr(config))


def worker_count(config: TrainConfig) -> int:
    if config.workers is not None:
        return config.workers
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ----------------------------------------------------------------------------------------------- state
@dataclass
class RunState:
    """What a resume needs besides weights and optimizer: where we are and how well we did."""

    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done within `epoch`
    step: int = 0  # optimizer steps done in all
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """Everything the loops (`trainer.fit`) and the artifacts (`artifacts.finish`) share."""

    config: TrainConfig
    spec: PreprocessSpec
    rows: list[ManifestRow]
    data_description: str
    run_dir: Path
    device: torch.device
    info: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    state: RunState
    fingerprint: str = ""
    augment_preset: dict[str, Any] | None = None
    # The moving average of the weights (training/averaging.py), made by the trainer once it knows the
    # run's length; a resumed run's saved average waits in resumed_ema until then.
    ema: WeightAverage | None = None
    resumed_ema: dict[str, torch.Tensor] | None = None
    created_dir: bool = False  # this run made its folder (so a refused run removes it whole)
    lineage: dict[str, Any] | None = None  # the card's `lineage`: the model --init-from started from

    def split(self, name: str) -> list[ManifestRow]:
        return [row for row in self.rows if row.split == name]

    def evaluated_model(self) -> nn.Module:
        """The weights that validation judges and the run exports: the average when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)


# ----------------------------------------------------------------------------------------------- build
def resolve_run_spec(config: TrainConfig, stored: dict[str, Any] | None) -> PreprocessSpec:
    """The one precedence rule (inference.spec.resolve_spec): flags > stored model's spec > defaults."""
    override = dict(get_entry(config.model).spec_override or {}) if stored is None else {}
    if config.image_size is not None:
        override["image_size"] = config.image_size
    if config.in_chans is not None:
        override["in_chans"] = config.in_chans
    if config.resize_mode is not None:
        override["resize_mode"] = config.resize_mode
    return resolve_spec(config.modality, stored=stored, override=override or None)


def choose_from_data(
    config: TrainConfig, rows: list[ManifestRow], spec_fixed: bool, verbose: bool
) -> TrainConfig:
    """Fills the knobs left unset from the data (training/recipe.py) and says what it chose."""
    from verity.training.recipe import apply_recipe

    chosen, _, reasons = apply_recipe(config, rows, spec_fixed)
    if verbose and reasons:
        print("chosen from the data: " + "; ".join(reasons), flush=True)
    return chosen


def _restore(
    resumed: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> RunState:
    """Optimizer, scaler and global RNG as last.pt saved them; returns the saved run state."""
    optimizer.load_state_dict(resumed["optimizer"])
    if scaler is not None and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    if resumed.get("torch_rng_state") is not None:
        torch.set_rng_state(resumed["torch_rng_state"])
    return RunState(**resumed["run_state"])


def lineage_of(config: TrainConfig, init: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's `lineage` for a run fine-tuned from another model (--init-from): which model, trained
    on which data, from which file."""
    if init is None:
        return None
    card = init.get("card") or {}
    return {
        "init_from": {
            "name": card.get("name"),
            "version": card.get("version"),
            "data_fingerprint": (card.get("data") or {}).get("fingerprint"),
            "file": str(config.init_from),
        }
    }


def build_run(config: TrainConfig) -> tuple[Run, dict[str, Any] | None]:
    """Data, spec, model, optimizer and state for a fresh, resumed or fine-tuned run."""
    resumed = load_resume(config)
    init = load_init(config)
    info = init_distributed("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(config, info)
    seed_everything(config.seed)
    source = resumed or init
    if source is not None and source["model_name"] != config.model:
        raise ValueError(
            f"{config.resume or config.init_from} is a {source['model_name']!r} model; "
            f"pass --model {source['model_name']} to continue from it."
        )
    rows, description = load_rows(
        config.data, config.modality, config.val_fraction, config.test_fraction, config.seed
    )
    config = choose_from_data(config, rows, spec_fixed=source is not None, verbose=info.is_main)
    spec = resolve_run_spec(config, source["spec"] if source is not None else None)
    pretrained = config.pretrained and source is None  # the loaded weights replace ImageNet's anyway
    model = build_for_spec(
        config.model, spec, pretrained=pretrained, weights_path=None if source else config.weights
    )
    if source is not None:
        model.load_state_dict(source["state_dict"])
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config, learned_backbone=config.pretrained or source is not None)
    precision = amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    state = _restore(resumed, optimizer, scaler) if resumed is not None else RunState()
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_dir = Path(config.out) / config.name / config.version
    run = Run(
        config, spec, rows, description, run_dir, device, info, model, optimizer, scaler, precision, state
    )
    run.resumed_ema = resumed.get("ema_state_dict") if resumed is not None else None
    run.lineage = lineage_of(config, init)
    return run, resumed


def check_validation_split(rows: list[ManifestRow], description: str) -> None:
    """Thresholds are chosen on validation data: refuse before training when it cannot hold them."""
    from verity.training.calibrate import ThresholdError

    present = {row.label for row in rows if row.split == "val"}
    missing = [label for label in LABELS if label not in present]
    if missing:
        raise ThresholdError(
            f"The validation split of {description} has no {' and no '.join(missing)} images, so no "
            "alarm and clear thresholds can be chosen for the target rates. Add such images, or give rows "
            "without a split (they are split automatically), or raise --val-fraction."
        )


# ----------------------------------------------------------------------------------------------- folder
# What a run writes into its folder before the weak-run guard: all of it goes when the guard refuses it.
RUN_WORK = ("config.yaml", "augment.json", "metrics.csv", "tensorboard", BEST, LAST)


def discard_refused_run(run: Run) -> None:
    """A run the weak-run guard refused leaves nothing behind (its checkpoints alone are tens of MB): its
    folder when this run made it, else only what it wrote there (a resumed run's folder is the user's
    earlier work, and is kept)."""
    if run.config.resume:
        return
    if run.created_dir:
        shutil.rmtree(run.run_dir, ignore_errors=True)
        return
    for name in RUN_WORK:
        path = run.run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
def prepare_run_dir(run: Run) -> None:
    """Rank 0, before training: the run folder with config.yaml and augment.json, the data fingerprint,
    and what the run is about to learn from (with the validation warnings the card repeats: too few
    images, or too few cases)."""
    from verity.training.augment import describe_preset
    from verity.training.calibrate import validation_group_warnings, validation_size_warnings

    config, run_dir = run.config, run.run_dir
    run.created_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:  # a fresh run in an old folder replaces it; its log must not mix in
        for stale in (run_dir / "metrics.csv", run_dir / BEST, run_dir / LAST):
            stale.unlink(missing_ok=True)
    save_config(config, run_dir / "config.yaml")
    variant = config.augment_preset or "full"
    run.augment_preset = describe_preset(run.spec.modality, variant) if config.augment else None
    text = json.dumps(run.augment_preset, indent=2)
    (run_dir / "augment.json").write_text(text + "\n", encoding="utf-8")
    run.fingerprint = data_fingerprint(run.rows)
    print(f"data: {run.data_description}; counts {json.dumps(split_counts(run.rows))}", flush=True)
    for warning in (*validation_size_warnings(run.rows, config), *validation_group_warnings(run.rows)):
        print(f"WARNING: {warning}", flush=True)


class MetricsLog:
    """metrics.csv (appended, so a resumed run continues it) and TensorBoard events, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.writer = run_dir / "metrics.csv", enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:  # not rank 0
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)
        for key, value in record.items():
            if isinstance(value, float | int) and key not in ("epoch", "step"):
                self.writer.add_scalar(key.replace("_", "/", 1), value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
