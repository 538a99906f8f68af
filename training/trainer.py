"""The trainer: read top to bottom as `EpochSampler`, `Schedule`, `train_one_epoch`, `fit`, `train`.

AdamW with linear warm-up then cosine decay (the backbone at a fraction of the head's rate), weighted
loss or sampler for class imbalance, optional AMP, channels_last, a moving average of the weights that is
validated and exported (training/averaging.py), early stopping that cannot fire before the floor
(`stop_floor`) and judges a smoothed validation figure, last checkpoints and exact resume (the sampler is
a function of (seed, epoch), so a resumed run replays the very batches it would have seen), DDP under
torchrun.

Why no "best epoch": choosing the epoch with the best validation ROC AUC on a split of a hundred images
picks noise (a 0.53, 0.67, 0.89, 0.79, 0.85, 0.86 run stopped at its sixth of 23 epochs on 32 px
casting patches). The run trains its schedule, or stops early once the smoothed figure has stopped
improving past the floor, and keeps the averaged weights of where it ended.

The run's setup is training/run.py, its checkpoints training/checkpoint.py, and what a finished run
writes (calibration, test evaluation, model.pt, model.onnx, card.json, report.html in
<out>/<name>/<version>/) training/artifacts.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from verity.datasets.torch_dataset import ManifestDataset
from verity.inference.vocabulary import LABELS
from verity.training.artifacts import finish
from verity.training.averaging import WeightAverage
from verity.training.checkpoint import (
    LAST,
    checkpoint_dict,
    cpu_state_dict,
    resume_base_config,
    save_atomic,
    unwrap,
    weights_digest,
)
from verity.training.config import TrainConfig, build_config
from verity.training.distributed import DistInfo, barrier, broadcast_flag, cleanup, sync_buffers
from verity.training.guard import WeakRunError
from verity.training.run import (
    MetricsLog,
    Run,
    build_run,
    check_validation_split,
    discard_refused_run,
    peak_lr,
    prepare_run_dir,
    worker_count,
)

# Early stopping may fire only after warm-up plus this share of the planned epochs, and judges the mean
# of the last SMOOTHING epochs' validation figure, never one epoch's.
STOP_FLOOR_SHARE = 0.5
SMOOTHING = 3


# ----------------------------------------------------------------------------------------------- schedule
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
        """The head's rate at `step`; each optimizer group takes its `lr_scale` of it."""
        return peak_lr(config) * lr_factor(step, self.total_steps, self.warmup_steps, config.min_lr_ratio)


def stop_floor(config: TrainConfig) -> float:
    """Epochs that must have run before early stopping may fire: warm-up plus STOP_FLOOR_SHARE of the
    planned epochs, so a run is never judged while its rate is still climbing or at its peak."""
    return (config.warmup_epochs or 0.0) + STOP_FLOOR_SHARE * (config.epochs or 0)


# ----------------------------------------------------------------------------------------------- data


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
            group["lr"] = lr * group.get("lr_scale", 1.0)
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
        if run.ema is not None:
            run.ema.update(unwrap(model), state.step)
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
    """Logits (float64) and targets over a loader, by the evaluated weights (the average) in eval mode."""
    model = run.evaluated_model()
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


# ----------------------------------------------------------------------------------------------- fit


def _selection_score(figures: dict[str, Any], train_loss: float) -> float:
    """Early stopping and best checkpoint follow validation ROC AUC; the loss only when AUC is undefined."""
    if figures["val_roc_auc"] is not None:
        return float(figures["val_roc_auc"])
    return -float(figures["val_loss"] if figures["val_loss"] is not None else train_loss)


def start_average(run: Run, total_steps: int) -> None:
    """The weight average of the run (a resumed run's saved one), when the config keeps one."""
    if not run.config.ema:
        return
    run.ema = WeightAverage(unwrap(run.model), total_steps)
    if run.resumed_ema is not None:
        run.ema.load_state_dict(run.resumed_ema)


def describe_plan(run: Run, plan: Schedule) -> str:
    """One line: the peak rates, the weight average and when early stopping may fire."""
    config = run.config
    scales = sorted({group.get("lr_scale", 1.0) for group in run.optimizer.param_groups})
    rates = [f"{peak_lr(config) * scale:.1e}" for scale in scales]
    rate = (
        f"peak learning rate {rates[0]}"
        if len(rates) == 1
        else f"peak rates {rates[0]} backbone, {rates[1]} head"
    )
    average = f"weights averaged over about {1 / (1 - run.ema.decay):.0f} steps" if run.ema else "no average"
    stopping = (
        f"early stopping after {config.patience} epochs without a better smoothed validation figure, "
        f"not before {math.ceil(stop_floor(config))} epochs have run"
        if config.patience > 0
        else "no early stopping"
    )
    return f"plan: {plan.total_steps} steps, {rate}; {average}; {stopping}"


def fit(run: Run) -> dict[str, torch.Tensor]:
    """Trains until epochs or max_steps run out or the smoothed validation figure stops improving past
    the floor; returns the weights the run ends with (the average, when kept)."""
    config, state, main = run.config, run.state, run.info.is_main
    train_loader, sampler, val_loader, _ = make_loaders(run)
    criterion = make_criterion(run)
    sampler.set_epoch(0)
    steps_per_epoch = len(train_loader)
    plan = Schedule.for_run(config, steps_per_epoch)
    start_average(run, plan.total_steps)
    if main:
        print(describe_plan(run, plan), flush=True)
    log = MetricsLog(run.run_dir, main)
    try:
        while state.epoch < config.epochs and state.step < plan.stop_at:
            sampler.set_epoch(state.epoch, skip=state.epoch_step * config.batch_size)
            figures = train_one_epoch(run, train_loader, criterion, plan, log.writer)
            epoch_done = state.epoch_step >= steps_per_epoch
            stop = False
            if main:
                stop = _after_epoch(run, val_loader, figures, epoch_done, log)
            elif epoch_done:
                state.epoch, state.epoch_step = state.epoch + 1, 0
            if broadcast_flag(stop, run.info, run.device):
                break
    finally:
        log.close()
    sync_buffers(run.model, run.info)
    barrier(run.info)
    return cpu_state_dict(run.evaluated_model())


def smoothed(history: list[dict[str, Any]], latest: float) -> float:
    """The mean of the last SMOOTHING epochs' selection scores, the latest included."""
    earlier = history[-(SMOOTHING - 1) :] if SMOOTHING > 1 else []
    scores = [record["val_score"] for record in earlier if "val_score" in record] + [latest]
    return float(np.mean(scores))


def _after_epoch(
    run: Run,
    val_loader: DataLoader,
    figures: dict[str, float],
    epoch_done: bool,
    log: MetricsLog,
) -> bool:
    """Validates, logs, saves the last checkpoint; returns whether to stop early (rank 0)."""
    state, config = run.state, run.config
    validation = validation_figures(*predict_logits(run, val_loader))
    score = _selection_score(validation, figures["train_loss"])
    smooth = smoothed(state.history, score)
    improved = smooth > state.best_score + 1e-12
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = smooth, state.epoch, 0
    elif epoch_done:
        state.bad_epochs += 1
    record = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": figures["train_loss"],
        "train_images_per_s": figures["train_images_per_s"],
        **{key: (math.nan if value is None else value) for key, value in validation.items()},
        "val_score": score,
        "val_score_smoothed": smooth,
    }
    state.history.append(record)
    log.write(record)
    auc = validation["val_roc_auc"]
    print(
        f"epoch {record['epoch']}: step {state.step}, train loss {figures['train_loss']:.4f}, "
        f"val loss {validation['val_loss']:.4f}, val ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}, "
        f"{figures['train_images_per_s']:.1f} img/s",
        flush=True,
    )
    if epoch_done:
        state.epoch, state.epoch_step = state.epoch + 1, 0
    save_atomic(checkpoint_dict(run, cpu_state_dict(run.model), with_optimizer=True), run.run_dir / LAST)
    return should_stop(state.epoch, state.bad_epochs, config)


def should_stop(epochs_done: int, bad_epochs: int, config: TrainConfig) -> bool:
    """Early stopping: `patience` epochs without a better smoothed figure, and never before the floor."""
    past_floor = epochs_done >= stop_floor(config)
    return config.patience > 0 and past_floor and bad_epochs >= config.patience


# ----------------------------------------------------------------------------------------------- train
def load_final(run: Run, best_state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Puts the final weights into the model (eval mode); returns its validation logits and targets."""
    model = unwrap(run.model)
    model.load_state_dict(best_state)
    model.eval()
    _, _, val_loader, _ = make_loaders(run)
    return predict_logits(run, val_loader)


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs a whole training (rank 0 returns the artifact paths and figures; other ranks a digest)."""
    run, _ = build_run(config)
    try:
        check_validation_split(run.rows, run.data_description)
        if run.info.is_main:
            prepare_run_dir(run)
        best_state = fit(run)
        # Every rank reports a digest of its final weights: under DDP they must all agree.
        digest = {"rank": run.info.rank, "last_weights_digest": weights_digest(run.model)}
        if not run.info.is_main:
            return digest
        try:
            return {**finish(run, best_state, *load_final(run, best_state)), **digest}
        except WeakRunError:
            discard_refused_run(run)
            raise
    finally:
        cleanup(run.info)


def train_from_options(yaml_path: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Programmatic entry (tests, benchmarks): like the CLI, --resume takes the saved config as the base."""
    base = resume_base_config(overrides["resume"]) if overrides.get("resume") else None
    return train(build_config(yaml_path, overrides, base))


__all__ = [
    "EpochSampler", "Schedule", "fit", "lr_factor", "should_stop", "stop_floor", "train",
    "train_from_options",
]  # fmt: skip
