"""ONNX export with the spec and card in the metadata, behind a torch-vs-onnxruntime parity gate.

The exported file is what the server runs, so the gate compares torch (eval mode) with the server's own
path, `inference.engine.OnnxEngine`, on the same inputs; max |delta logit| above PARITY_TOLERANCE fails
the export and leaves no model file behind (an existing file at the destination is left untouched).

Exporter choice (torch 2.14): both the dynamo exporter and the TorchScript one (`dynamo=False`) give a
single-file graph with a working dynamic batch axis and parity near 1e-5 on efficientnet_lite0. The
TorchScript exporter takes about 1 s for that model where dynamo takes about 30 s on 2 cores, so it is
the default; `exporter="dynamo"` selects the other, and a TorchScript failure falls back to dynamo.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import subprocess
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from verity.inference.engine import METADATA_CARD_KEY, METADATA_SPEC_KEY
from verity.inference.spec import PreprocessSpec

OPSET = 18
PARITY_TOLERANCE = 1e-4
EXPORTERS = ("torchscript", "dynamo")
CHECKPOINT_KEYS = ("model_name", "spec", "state_dict")


class ExportParityError(RuntimeError):
    """torch and onnxruntime disagree on the exported model beyond the parity tolerance."""


class ExportError(RuntimeError):
    """The model cannot be exported (bad inputs, exporter failure, or a broken graph)."""


def publish(temporary: Path, path: Path) -> None:
    """Moves a finished temporary file into place atomically, readable by all like any model file.

    mkstemp creates files 0600; a server running as another user must still be able to load the model.
    """
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)

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


def code_version() -> str:
    """The git commit of the code (with "-dirty" for uncommitted changes), or the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"verity-{version('verity')}"
        except PackageNotFoundError:
            return "unknown"


def build_card(
    name: str,
    version: str,
    modality: str,
    backbone: str,
    spec: PreprocessSpec | dict[str, Any],
    data_counts: dict[str, dict[str, int]],
    data_fingerprint: str,
    metrics: dict[str, Any],
    temperature: float,
    thresholds: dict[str, Any],
    code_version: str,
) -> dict[str, Any]:
    """The model card (DESIGN.md §3, team contract): plain JSON types, ready for card.json and ONNX."""
    spec_dict = (
        spec.to_dict() if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec).to_dict()
    )
    if spec_dict["modality"] != modality:
        raise ValueError(
            f"The card's modality {modality!r} differs from the spec's {spec_dict['modality']!r}."
        )
    missing = [key for key in ("alarm", "clear") if key not in thresholds]
    if missing:
        raise ValueError(
            f"thresholds lack {', '.join(missing)}: a served model needs both (see choose_thresholds)."
        )
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"The calibration temperature must be a positive number, got {temperature!r}.")
    from verity.training.calibrate import card_warnings

    return to_jsonable(
        {
            "name": name,
            "version": version,
            "modality": modality,
            "backbone": backbone,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": {"fingerprint": data_fingerprint, "counts": data_counts},
            "metrics": metrics,
            "calibration": {"temperature": float(temperature)},
            "thresholds": thresholds,
            "spec": spec_dict,
            "code_version": code_version,
            # What a reader of the card must know before trusting the thresholds (e.g. too few
            # validation images for the target rates); the same lines `verity train` printed.
            "warnings": card_warnings(thresholds),
        }
    )


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


def _strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys saved from a DistributedDataParallel ("module.") or torch.compile ("_orig_mod.") wrapper."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def build_registry_model(name: str, spec: PreprocessSpec, pretrained: bool = False) -> torch.nn.Module:
    """`training.models.build_model` for a spec: 2 classes, the spec's channels and normalization."""
    from verity.training.models import build_model

    options: dict[str, Any] = {"num_classes": 2, "in_chans": spec.in_chans, "pretrained": pretrained}
    accepted = inspect.signature(build_model).parameters
    # The registry takes the spec (or its mean/std) to build the Normalize layer; a checkpoint's state
    # dict then restores the very values training used.
    if "spec" in accepted:
        options["spec"] = spec
    for key in ("mean", "std"):
        if key in accepted:
            options[key] = getattr(spec, key)
    return build_model(name, **options)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """Rebuilds the trained model (eval mode, CPU) from a checkpoint dict via the model registry."""
    model = build_registry_model(checkpoint["model_name"], PreprocessSpec.from_dict(checkpoint["spec"]))
    try:
        model.load_state_dict(_strip_wrapper_prefixes(checkpoint["state_dict"]))
    except RuntimeError as error:
        name = checkpoint["model_name"]
        raise ValueError(f"The checkpoint's weights do not fit model {name!r}: {error}") from error
    return model.eval()


def _find_normalize(model: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if type(module).__name__ == "Normalize" and hasattr(module, "mean") and hasattr(module, "std"):
            return module
    return None


def _check_model_matches_spec(model: torch.nn.Module, spec: PreprocessSpec) -> None:
    """Normalization lives in the graph: the model's Normalize must use the spec's mean and std."""
    normalize = _find_normalize(model)
    if normalize is None:
        raise ExportError("The model has no Normalize layer; Verity models normalize inside the graph.")
    for key in ("mean", "std"):
        values = torch.as_tensor(getattr(normalize, key)).detach().float().reshape(-1).cpu().numpy()
        expected = np.asarray(getattr(spec, key), dtype=np.float32)
        if values.shape != expected.shape or not np.allclose(values, expected, atol=1e-6):
            raise ExportError(
                f"The model normalizes with {key} {values.tolist()} but the spec says {expected.tolist()}."
            )


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str) -> str:
    """Writes the raw graph (no metadata yet); returns the exporter that succeeded."""
    common: dict[str, Any] = dict(input_names=["image"], output_names=["logits", "cam"], opset_version=OPSET)
    if exporter == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript exporter
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "cam": {0: "N"}},
                    **common,
                )
            return exporter
        except Exception as error:  # an exporter failure of any kind: try the other one before giving up
            warnings.warn(f"TorchScript ONNX export failed ({error}); retrying with dynamo.", stacklevel=3)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        verbose=False,
        dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},),
        **common,
    )
    return "dynamo"


def _add_metadata(path: Path, spec: PreprocessSpec, card: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in (
        (METADATA_SPEC_KEY, spec.to_json()),
        (METADATA_CARD_KEY, json.dumps(card, sort_keys=True)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path), save_as_external_data=False)


def _check_card(card: dict[str, Any], spec: PreprocessSpec) -> None:
    """The server refuses a model whose card lacks these; refuse it here, before exporting."""
    missing = [key for key in ("name", "version", "thresholds") if key not in card]
    missing += [f"thresholds.{key}" for key in ("alarm", "clear") if key not in card.get("thresholds", {})]
    if missing:
        raise ExportError(f"The card lacks {', '.join(missing)}; build it with training.export.build_card.")
    if card.get("modality", spec.modality) != spec.modality:
        raise ExportError(f"The card says modality {card['modality']!r} but the spec says {spec.modality!r}.")


def _parity_inputs(spec: PreprocessSpec, sample: np.ndarray | None) -> list[np.ndarray]:
    """Batches of 1 and 5 (proving the dynamic batch axis) plus the caller's sample, if any."""
    shape = (spec.in_chans, spec.image_size, spec.image_size)
    rng = np.random.default_rng(0)
    batches = [rng.random((1, *shape), dtype=np.float32), rng.random((5, *shape), dtype=np.float32)]
    if sample is not None:
        sample = np.asarray(sample, dtype=np.float32)
        sample = sample[None] if sample.ndim == 3 else sample
        if sample.shape[1:] != shape:
            raise ExportError(
                f"The parity sample has shape {sample.shape}; the spec needs (N, *{shape})."
            )
        batches.append(sample)
    return batches


def check_parity(
    model: torch.nn.Module, onnx_path: str | Path, batches: list[np.ndarray]
) -> dict[str, float]:
    """Runs the batches through torch and through OnnxEngine (the server path); returns max |delta|."""
    from verity.inference.engine import OnnxEngine

    engine = OnnxEngine(onnx_path, provider="cpu", warmup=False)
    worst = {"logits": 0.0, "cam": 0.0, "largest_logit": 0.0}
    with torch.no_grad():
        for batch in batches:
            expected = dict(zip(("logits", "cam"), model(torch.from_numpy(batch)), strict=True))
            got = engine.run(batch)
            worst["largest_logit"] = max(worst["largest_logit"], float(expected["logits"].abs().max()))
            for key in ("logits", "cam"):
                if got[key].shape != tuple(expected[key].shape):
                    raise ExportParityError(
                        f"ONNX output {key!r} has shape {got[key].shape} for a batch of {len(batch)}, "
                        f"torch gives {tuple(expected[key].shape)}: the dynamic batch axis is broken."
                    )
                delta = float(np.abs(got[key].astype(np.float64) - expected[key].double().numpy()).max())
                worst[key] = max(worst[key], delta)
    return worst


def export_onnx(
    model: torch.nn.Module,
    spec: PreprocessSpec | dict[str, Any],
    card: dict[str, Any],
    path: str | Path,
    sample: np.ndarray | None = None,
    exporter: str = "torchscript",
) -> dict[str, Any]:
    """Exports `model` to one ONNX file with spec and card metadata, then enforces the parity gate.

    The model must take NxCxSxS float32 in [0, 1] and return (logits, cam). The caller's model is not
    modified (a CPU copy in eval mode is exported). Raises ExportParityError when max |delta logit|
    between torch and onnxruntime exceeds PARITY_TOLERANCE; no file is written at `path` then.
    Returns {"path", "opset", "exporter", "max_abs_diff", "max_abs_diff_cam", "max_abs_logit", "size_bytes"}.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"Invalid exporter {exporter!r}. Only {', '.join(EXPORTERS)} are supported.")
    spec = spec if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # and torch.compile
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    _check_card(card, spec)
    _check_model_matches_spec(model, spec)
    batches = _parity_inputs(spec, sample)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        used = _export_graph(model, torch.from_numpy(batches[1][:2].copy()), temporary_path, exporter)
        _add_metadata(temporary_path, spec, to_jsonable(card))
        worst = check_parity(model, temporary_path, batches)
        if not worst["logits"] <= PARITY_TOLERANCE:
            raise ExportParityError(
                f"Export parity gate failed: max |delta logit| between torch and onnxruntime is "
                f"{worst['logits']:.3g} > {PARITY_TOLERANCE:g} (largest |logit| "
                f"{worst['largest_logit']:.3g}; float32 rounding alone gives about 1e-6 of it). "
                "The ONNX model was not written."
            )
        publish(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)
    return {
        "path": str(path),
        "opset": OPSET,
        "exporter": used,
        "max_abs_diff": worst["logits"],
        "max_abs_diff_cam": worst["cam"],
        "max_abs_logit": worst["largest_logit"],
        "size_bytes": path.stat().st_size,
    }
