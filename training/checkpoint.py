"""model.pt and its siblings: what a checkpoint holds, how it is written, read back and resumed.

A run folder holds last.pt (weights, optimizer, RNG and run state: what `--resume` continues), best.pt
(the best weights so far) and, once the run is finished, model.pt (the best weights with calibration,
thresholds and card). Every file holds plain types only, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from verity.inference.spec import PreprocessSpec, resolve_spec
from verity.inference.vocabulary import LABELS
from verity.training.config import TrainConfig

if TYPE_CHECKING:
    from verity.training.run import Run

LAST, BEST, FINAL = "last.pt", "best.pt", "model.pt"
CHECKPOINT_KEYS = ("model_name", "spec", "state_dict")


def code_version() -> str:
    """The git commit of the code (with "-dirty" for uncommitted changes), or the package version."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"verity-{version('verity')}"
        except PackageNotFoundError:
            return "unknown"


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True)
    return done.stdout.strip()


# ----------------------------------------------------------------------------------------------- write
def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def checkpoint_dict(run: Run, state_dict: dict[str, torch.Tensor], with_optimizer: bool) -> dict[str, Any]:
    """The model.pt contract: plain types only (torch.load(weights_only=True) reads it)."""
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
        data["ema_state_dict"] = run.ema.state_dict() if run.ema is not None else None
    return data


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order (equal weights, equal digests)."""
    digest = hashlib.sha256()
    for key, value in unwrap(model).state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_atomic(data: dict[str, Any], path: Path) -> Path:
    """Writes next to the target then renames, so an interrupted save never leaves half a checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(data, temporary)
    os.replace(temporary, path)
    return path


# ----------------------------------------------------------------------------------------------- read
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a model.pt with `weights_only=True` (plain types, never unpickled objects); checks its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"{path} is not a readable Verity checkpoint (plain types only): {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a Verity checkpoint dict.")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"{path} lacks the checkpoint keys {', '.join(missing)} (needed to rebuild the model)."
        )
    return checkpoint


def checkpoint_spec(checkpoint: dict[str, Any]) -> PreprocessSpec:
    """The spec a checkpoint was trained with, through the one precedence rule (nothing overrides it)."""
    return resolve_spec(stored=checkpoint["spec"])


def _strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys saved from a DistributedDataParallel ("module.") or torch.compile ("_orig_mod.") wrapper."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuilds the trained model (eval mode, CPU) from a checkpoint dict via the model registry."""
    from verity.training.models import build_for_spec  # at call time: tests stand in their own registry

    name = checkpoint["model_name"]
    model = build_for_spec(name, checkpoint_spec(checkpoint))
    try:
        model.load_state_dict(_strip_wrapper_prefixes(checkpoint["state_dict"]))
    except RuntimeError as error:
        raise ValueError(f"The checkpoint's weights do not fit model {name!r}: {error}") from error
    return model.eval()


# ----------------------------------------------------------------------------------------------- resume
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


def load_resume(config: TrainConfig) -> dict[str, Any] | None:
    """The last.pt that --resume names, with its optimizer and run state; None without --resume."""
    if not config.resume:
        return None
    path = resume_path(config.resume)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in checkpoint or "run_state" not in checkpoint:
        raise ValueError(f"{path} holds no optimizer state: resume from a run's {LAST}.")
    return checkpoint


def load_init(config: TrainConfig) -> dict[str, Any] | None:
    """The model.pt that --init-from names (a file or its run folder); None without --init-from."""
    if not config.init_from:
        return None
    path = Path(config.init_from)
    return load_checkpoint(path / FINAL if path.is_dir() else path)
