"""The trainer: read top to bottom as `train_one_epoch`, `predict_logits`, `fit`, `finish`, `train`.

AdamW with linear warm-up then cosine decay, weighted loss or sampler for class imbalance, optional AMP,
channels_last, early stopping on validation ROC AUC, best and last checkpoints, exact resume (the
sampler is a function of (seed, epoch), so a resumed run replays the very batches it would have seen),
DDP under torchrun. At the end: temperature fit and thresholds on validation, test evaluation, model.pt,
model.onnx, card.json and report.html in <out>/<name>/<version>/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from verity.datasets.manifest import LABELS, ManifestRow, write_manifest
from verity.datasets.torch_dataset import ManifestDataset, data_fingerprint, load_rows, split_counts
from verity.inference.spec import PreprocessSpec, resolve_spec
from verity.training.config import TrainConfig, build_config, save_config
from verity.training.distributed import (
    DistInfo,
    barrier,
    broadcast_flag,
    cleanup,
    init_distributed,
    sync_buffers,
)
from verity.training.models import build_for_spec, get_entry

LAST, BEST, FINAL = "last.pt", "best.pt", "model.pt"


# ----------------------------------------------------------------------------------------------- setup
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


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) for one rank; the order is a function of (seed, epoch) alone.

    `weights` switches to drawing with replacement (class balancing by sampler). `skip` drops the
    first samples of the epoch, for resuming in the middle of one.
    """

    def __init__(self, n: int, seed: int, info: DistInfo, weights: list[float] | None = None) -> None:
        self.n, self.seed, self.info, self.weights = n, seed, info, weights
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(n / info.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.per_rank * self.info.world_size
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
            order = torch.cat([order, order[: total - self.n]])  # pad so every rank gets as many
        else:
            order = torch.multinomial(
                torch.tensor(self.weights), total, replacement=True, generator=generator
            )
        seeds = torch.randint(0, 2**31 - 1, (total,), generator=generator)
        mine = range(self.info.rank, total, self.info.world_size)
        for position in list(mine)[self.skip :]:
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm scales (1-D tensors) get no weight decay, as is standard."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


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
    """Everything `fit` and `finish` share."""

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

    def split(self, name: str) -> list[ManifestRow]:
        return [row for row in self.rows if row.split == name]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


def checkpoint_dict(run: Run, state_dict: dict[str, torch.Tensor], with_optimizer: bool) -> dict[str, Any]:
    """The model.pt contract: plain types only (torch.load(weights_only=True) reads it)."""
    from verity.training.export import code_version

    data = {
        "state_dict": state_dict,
        "spec": run.spec.to_dict(),
        "config": run.config.to_dict(),
        "labels": list(LABELS),
        "model_name": run.config.model,
        "data_fingerprint": run.fingerprint,
        "code_version": code_version(),
        "epoch": run.state.epoch,
        "step": run.state.step,
        "run_state": run.state.to_dict(),
        "augment": run.augment_preset,
    }
    if with_optimizer:
        data["optimizer"] = run.optimizer.state_dict()
        # Dropout draws from the global generator: restoring it makes a resumed run match an unbroken one.
        data["torch_rng_state"] = torch.get_rng_state()
        data["scaler"] = run.scaler.state_dict() if run.scaler is not None else None
    return data


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order (equal weights, equal digests)."""
    digest = hashlib.sha256()
    for key, value in _unwrap(model).state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_atomic(data: dict[str, Any], path: Path) -> Path:
    """Writes next to the target then renames, so an interrupted save never leaves half a checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(data, temporary)
    os.replace(temporary, path)
    return path


# ----------------------------------------------------------------------------------------------- loops
def _autocast(run: Run) -> Any:
    return torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None)


def _to_device(images: torch.Tensor, run: Run) -> torch.Tensor:
    images = images.to(run.device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if run.config.channels_last else images


def train_one_epoch(
    run: Run, loader: DataLoader, criterion: nn.Module, plan: Schedule, writer: Any
) -> dict[str, float]:
    """One pass over the training shard; returns mean loss and images/s. Reads the loss every log_every
    steps only, because each reading waits for the device."""
    from verity.datasets.progress import progress_bar

    config, state, model = run.config, run.state, run.model
    model.train()
    loss_sum, loss_count, images_seen = torch.zeros((), device=run.device), 0, 0
    started = time.perf_counter()
    # The epoch line that _after_epoch prints says off a terminal what the bar would.
    enabled = config.progress and run.info.is_main
    description = f"epoch {state.epoch + 1}/{config.epochs}"
    bar = progress_bar(enabled, loader, desc=description, unit="batch", leave=False)
    for images, targets in bar:
        if state.step >= plan.stop_at:
            break
        lr = plan.lr(config, state.step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images, targets = _to_device(images, run), targets.to(run.device, non_blocking=True)
        with _autocast(run):
            logits, _ = model(images)
            loss = criterion(logits.float(), targets)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        loss_sum += loss.detach()
        loss_count += 1
        images_seen += len(targets)
        state.step += 1
        state.epoch_step += 1
        if state.step % config.log_every == 0 and run.info.is_main:
            mean = float(loss_sum) / loss_count
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if writer is not None:
                writer.add_scalar("train/loss_running", mean, state.step)
                writer.add_scalar("train/lr", lr, state.step)
    bar.close()
    seconds = time.perf_counter() - started
    return {
        "train_loss": float(loss_sum) / max(1, loss_count),
        "train_images_per_s": images_seen * run.info.world_size / seconds if seconds > 0 else 0.0,
        "steps": loss_count,
    }


@torch.no_grad()
def predict_logits(run: Run, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float64) and targets over a loader, model in eval mode."""
    model = _unwrap(run.model)
    model.eval()
    logits, targets = [], []
    for images, batch_targets in loader:
        with _autocast(run):
            batch_logits, _ = model(_to_device(images, run))
        logits.append(batch_logits.float().cpu().numpy().astype(np.float64))
        targets.append(batch_targets.numpy())
    if not logits:
        return np.zeros((0, len(LABELS))), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits), np.concatenate(targets).astype(np.int64)


def validation_figures(logits: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """Val loss, accuracy and ROC AUC (None when validation lacks a class)."""
    from verity.training.metrics import roc_auc

    if len(targets) == 0:
        return {"val_loss": None, "val_accuracy": None, "val_roc_auc": None}
    tensor = torch.from_numpy(logits)
    loss = float(nn.functional.cross_entropy(tensor, torch.from_numpy(targets)))
    scores = torch.softmax(tensor, dim=1)[:, 1].numpy()
    return {
        "val_loss": loss,
        "val_accuracy": float((logits.argmax(1) == targets).mean()),
        "val_roc_auc": roc_auc(scores, targets),
    }


# ----------------------------------------------------------------------------------------------- setup
def resume_path(resume: str | Path) -> Path:
    """A run folder (its last.pt) or a checkpoint file."""
    path = Path(resume)
    path = path / LAST if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"Nothing to resume at {resume}: expected a run folder holding {LAST}.")
    return path


def resume_base_config(resume: str | Path) -> dict[str, Any]:
    """The saved run's config: the base that --resume's other flags override (e.g. more --epochs)."""
    checkpoint = torch.load(resume_path(resume), map_location="cpu", weights_only=True)
    return dict(checkpoint.get("config") or {})


def _load_resume(config: TrainConfig) -> dict[str, Any] | None:
    if not config.resume:
        return None
    path = resume_path(config.resume)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in checkpoint or "run_state" not in checkpoint:
        raise ValueError(f"{path} holds no optimizer state: resume from a run's {LAST}.")
    return checkpoint


def _load_init(config: TrainConfig) -> dict[str, Any] | None:
    if not config.init_from:
        return None
    from verity.training.export import load_checkpoint

    path = Path(config.init_from)
    return load_checkpoint(path / FINAL if path.is_dir() else path)


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


def build_run(config: TrainConfig) -> tuple[Run, dict[str, Any] | None]:
    """Data, spec, model, optimizer and state for a fresh, resumed or fine-tuned run."""
    resumed = _load_resume(config)
    init = _load_init(config)
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
    optimizer = make_optimizer(model, config)
    precision = amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    state = RunState()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        state = RunState(**resumed["run_state"])
        if resumed.get("torch_rng_state") is not None:
            torch.set_rng_state(resumed["torch_rng_state"])
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_dir = Path(config.out) / config.name / config.version
    run = Run(
        config, spec, rows, description, run_dir, device, info, model, optimizer, scaler, precision, state
    )
    return run, resumed


def make_loaders(run: Run) -> tuple[DataLoader, EpochSampler, DataLoader, int]:
    """Train loader (augmented, sharded, balanced as configured), val loader, and the worker count."""
    from verity.training.augment import Augmenter

    config, train_rows = run.config, run.split("train")
    if not train_rows:
        raise ValueError(f"No training rows in {run.data_description}.")
    variant = config.augment_preset or "full"
    augmenter = Augmenter(run.spec.modality, run.spec, variant) if config.augment else None
    train_set = ManifestDataset(train_rows, run.spec, augmenter, augmenter.set_seed if augmenter else None)
    weights = None
    if config.balance == "sampler":
        counts = np.bincount(train_set.targets, minlength=len(LABELS))
        weights = [1.0 / counts[t] for t in train_set.targets]
    sampler = EpochSampler(len(train_set), config.seed, run.info, weights)
    workers = worker_count(config)
    common = {
        "num_workers": workers,
        "pin_memory": run.device.type == "cuda",
        "persistent_workers": workers > 0,
        # Its own generator, so iterating a loader never draws from the global one (dropout's).
        "generator": torch.Generator().manual_seed(config.seed),
    }
    drop_last = sampler.per_rank > config.batch_size  # a last batch of 1 breaks batch norm
    train_loader = DataLoader(train_set, config.batch_size, sampler=sampler, drop_last=drop_last, **common)
    val_set = ManifestDataset(run.split("val"), run.spec)
    val_loader = DataLoader(val_set, config.batch_size * 2, shuffle=False, **common)
    return train_loader, sampler, val_loader, workers


def make_criterion(run: Run) -> nn.Module:
    """Cross-entropy, weighted by inverse class frequency when balance is "loss"."""
    weight = None
    if run.config.balance == "loss":
        counts = np.bincount([row.target for row in run.split("train")], minlength=len(LABELS)).astype(
            np.float64
        )
        if (counts == 0).any():
            missing = [LABELS[i] for i in np.flatnonzero(counts == 0)]
            raise ValueError(
                f"The training split has no {', '.join(missing)} images: a classifier needs both."
            )
        weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=run.device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=run.config.label_smoothing)


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


# ----------------------------------------------------------------------------------------------- fit
class MetricsLog:
    """metrics.csv (appended, so a resumed run continues it) and TensorBoard events, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.writer = run_dir / "metrics.csv", enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
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


def _selection_score(figures: dict[str, Any], train_loss: float) -> float:
    """Early stopping and best checkpoint follow validation ROC AUC; the loss only when AUC is undefined."""
    if figures["val_roc_auc"] is not None:
        return float(figures["val_roc_auc"])
    return -float(figures["val_loss"] if figures["val_loss"] is not None else train_loss)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule spans all epochs; max_steps only says where to stop, so a run stopped
    early and resumed follows the very schedule of an unbroken one."""

    total_steps: int
    warmup_steps: int
    stop_at: int

    @classmethod
    def for_run(cls, config: TrainConfig, steps_per_epoch: int) -> Schedule:
        total = config.epochs * steps_per_epoch
        warmup = min(round(config.warmup_epochs * steps_per_epoch), total // 2)
        stop_at = total if config.max_steps is None else min(total, config.max_steps)
        return cls(total, warmup, stop_at)

    def lr(self, config: TrainConfig, step: int) -> float:
        return config.lr * lr_factor(step, self.total_steps, self.warmup_steps, config.min_lr_ratio)


def fit(run: Run) -> dict[str, torch.Tensor]:
    """Trains until epochs or max_steps run out or validation stops improving; returns the best weights."""
    config, state, main = run.config, run.state, run.info.is_main
    train_loader, sampler, val_loader, _ = make_loaders(run)
    criterion = make_criterion(run)
    sampler.set_epoch(0)
    steps_per_epoch = len(train_loader)
    plan = Schedule.for_run(config, steps_per_epoch)
    log = MetricsLog(run.run_dir, main)
    best_path = run.run_dir / BEST
    try:
        while state.epoch < config.epochs and state.step < plan.stop_at:
            sampler.set_epoch(state.epoch, skip=state.epoch_step * config.batch_size)
            figures = train_one_epoch(run, train_loader, criterion, plan, log.writer)
            epoch_done = state.epoch_step >= steps_per_epoch
            stop = False
            if main:
                stop = _after_epoch(run, val_loader, figures, epoch_done, log, best_path)
            elif epoch_done:
                state.epoch, state.epoch_step = state.epoch + 1, 0
            if broadcast_flag(stop, run.info, run.device):
                break
    finally:
        log.close()
    sync_buffers(run.model, run.info)
    barrier(run.info)
    # The best weights: this run's best.pt, else (a finished run resumed without improving) its model.pt.
    for path in (best_path, run.run_dir / FINAL):
        if main and path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return _cpu_state_dict(run.model)


def _after_epoch(
    run: Run,
    val_loader: DataLoader,
    figures: dict[str, float],
    epoch_done: bool,
    log: MetricsLog,
    best_path: Path,
) -> bool:
    """Validates, logs, saves last (and best) checkpoints; returns whether to stop early (rank 0)."""
    state, config = run.state, run.config
    validation = validation_figures(*predict_logits(run, val_loader))
    score = _selection_score(validation, figures["train_loss"])
    improved = score > state.best_score + 1e-12
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    elif epoch_done:
        state.bad_epochs += 1
    record = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": figures["train_loss"],
        "train_images_per_s": figures["train_images_per_s"],
        **{key: (math.nan if value is None else value) for key, value in validation.items()},
    }
    state.history.append(record)
    log.write(record)
    auc = validation["val_roc_auc"]
    print(
        f"epoch {record['epoch']}: step {state.step}, train loss {figures['train_loss']:.4f}, "
        f"val loss {validation['val_loss']:.4f}, val ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}, "
        f"{figures['train_images_per_s']:.1f} img/s{' (best)' if improved else ''}",
        flush=True,
    )
    if epoch_done:
        state.epoch, state.epoch_step = state.epoch + 1, 0
    state_dict = _cpu_state_dict(run.model)
    if improved:
        save_atomic(checkpoint_dict(run, state_dict, with_optimizer=False), best_path)
    save_atomic(checkpoint_dict(run, state_dict, with_optimizer=True), run.run_dir / LAST)
    return config.patience > 0 and state.bad_epochs >= config.patience


# ----------------------------------------------------------------------------------------------- finish
def _groups(rows: list[ManifestRow]) -> dict[str, list[str]]:
    return {"product": [row.product or "unknown" for row in rows]}


def guard_run(
    run: Run, val_scores: np.ndarray, val_targets: np.ndarray, temperature: float, thresholds: dict[str, Any]
) -> list[str]:
    """The weak-run guard (training/guard.py): raises WeakRunError before anything is written."""
    from verity.training.guard import check_run, weak_signs
    from verity.training.metrics import roc_auc

    refuse, report = weak_signs(
        roc_auc(val_scores, val_targets),
        val_targets,
        thresholds["val_uncertain_rate"],
        temperature,
        run.state.history,
    )
    warnings = check_run(refuse, report, run.config.allow_weak)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    return warnings


def finish(run: Run, best_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Calibrates and chooses thresholds on validation, evaluates on test, writes every artifact.

    Returns {"run_dir", "model_pt", "card_json", "model_onnx", "report_html", "metrics", ...}.
    """
    from verity.inference.engine import calibrated_scores
    from verity.training.calibrate import choose_thresholds, fit_temperature
    from verity.training.evaluate import ModuleScorer, evaluate
    from verity.training.export import build_card, code_version, export_onnx
    from verity.training.metrics import compute_metrics

    config, run_dir = run.config, run.run_dir
    model = _unwrap(run.model)
    model.load_state_dict(best_state)
    model.eval()
    _, _, val_loader, workers = make_loaders(run)
    val_logits, val_targets = predict_logits(run, val_loader)
    temperature = fit_temperature(val_logits, val_targets)
    val_scores = calibrated_scores(val_logits, temperature)
    thresholds = choose_thresholds(
        val_scores, val_targets, config.target_false_alarm_rate, config.target_miss_rate
    )
    weak_warnings = guard_run(run, val_scores, val_targets, temperature, thresholds)
    metrics = {
        "val": compute_metrics(val_scores, val_targets, _groups(run.split("val")), thresholds),
        "test": None,
    }
    data_manifest = run_dir / "data.jsonl"  # the exact rows and splits used, for `verity eval`
    write_manifest(data_manifest, run.rows)
    outputs: dict[str, Any] = {"run_dir": str(run_dir), "data_manifest": str(data_manifest)}
    if run.split("test"):
        scorer = ModuleScorer(model, run.spec, config.name, config.version, temperature, thresholds)
        result = evaluate(
            scorer,
            data_manifest,
            split="test",
            out_dir=run_dir,
            batch_size=config.batch_size * 2,
            workers=workers or 1,
            progress=config.progress,
            report=config.report,
        )
        metrics["test"] = result["metrics"]
        outputs["report_html"] = result["outputs"].get("report_html")
        outputs["test_metrics_json"] = result["outputs"]["metrics_json"]
    card = build_card(
        config.name,
        config.version,
        run.spec.modality,
        config.model,
        run.spec,
        split_counts(run.rows),
        run.fingerprint,
        metrics,
        temperature,
        thresholds,
        code_version(),
    )
    card["warnings"] = [*card.get("warnings", []), *weak_warnings]
    checkpoint = checkpoint_dict(run, best_state, with_optimizer=False)
    checkpoint.update(
        metrics=json.loads(json.dumps(card["metrics"])),
        thresholds=card["thresholds"],
        calibration=card["calibration"],
        card=card,
        epoch=run.state.best_epoch + 1,
    )
    outputs["model_pt"] = str(save_atomic(checkpoint, run_dir / FINAL))
    (run_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    outputs["card_json"] = str(run_dir / "card.json")
    if config.export:
        sample = ManifestDataset(run.split("val")[:1], run.spec)[0][0].numpy()[None]
        outputs["export"] = export_onnx(model, run.spec, card, run_dir / "model.onnx", sample=sample)
        outputs["model_onnx"] = outputs["export"]["path"]
    (run_dir / BEST).unlink(missing_ok=True)  # model.pt now holds the best weights, with calibration
    outputs.update(metrics=metrics, thresholds=thresholds, temperature=temperature, card=card)
    return outputs


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs a whole training (rank 0 returns the artifact paths and figures; other ranks an empty dict)."""
    run, _ = build_run(config)
    try:
        check_validation_split(run.rows, run.data_description)
        if run.info.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            if not config.resume:  # a fresh run in an old folder replaces it; its log must not mix in
                for stale in (run.run_dir / "metrics.csv", run.run_dir / BEST, run.run_dir / LAST):
                    stale.unlink(missing_ok=True)
            save_config(run.config, run.run_dir / "config.yaml")
            from verity.training.augment import describe_preset

            variant = config.augment_preset or "full"
            run.augment_preset = describe_preset(run.spec.modality, variant) if config.augment else None
            text = json.dumps(run.augment_preset, indent=2)
            (run.run_dir / "augment.json").write_text(text + "\n", encoding="utf-8")
            run.fingerprint = data_fingerprint(run.rows)
            print(f"data: {run.data_description}; counts {json.dumps(split_counts(run.rows))}", flush=True)
            from verity.training.calibrate import validation_size_warnings  # the card repeats these warnings

            for warning in validation_size_warnings(run.rows, run.config):
                print(f"WARNING: {warning}", flush=True)
        best_state = fit(run)
        # Every rank reports a digest of its final weights: under DDP they must all agree.
        digest = {"rank": run.info.rank, "last_weights_digest": weights_digest(run.model)}
        if not run.info.is_main:
            return digest
        return {**finish(run, best_state), **digest}
    finally:
        cleanup(run.info)


def train_from_options(yaml_path: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Programmatic entry (tests, benchmarks): like the CLI, --resume takes the saved config as the base."""
    base = resume_base_config(overrides["resume"]) if overrides.get("resume") else None
    return train(build_config(yaml_path, overrides, base))


__all__ = ["EpochSampler", "TrainConfig", "finish", "fit", "lr_factor", "train", "train_from_options"]
