"""`verity train`: every TrainConfig field is a flag (--batch-size, --no-pretrained, ...).

Precedence: defaults < the resumed run's config (--resume) < --config YAML < flags given here.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import MISSING, fields
from typing import Any

from verity.training.config import ConfigError, TrainConfig, build_config, field_types

# Exit statuses besides 0 and 2 (a bad flag): 3, the weak-run guard refused the run; 4, the run finished
# and is kept (model.pt, card, report) but its ONNX export failed a gate.
WEAK_RUN, EXPORT_FAILED = 3, 4

# Flags worth a line of help beyond the field comment; the rest explain themselves.
_HELP = {
    "data": "a manifest (JSONL), a folder with manifest.jsonl, or a folder DIR/genuine/*, DIR/counterfeit/*",
    "modality": "photo or xray",
    "model": "backbone: efficientnet_lite0 (default), mobilenet_v3_large, resnet18, resnet50, convnext_tiny",
    "weights": "local weights file for the backbone (pretrained from a file, for any model)",
    "pretrained": "start from ImageNet weights (default: yes)",
    "amp": "auto, off, bf16, fp16 (auto: bf16/fp16 on CUDA, off on CPU)",
    "balance": "class imbalance: loss (weighted cross-entropy, default), sampler, none",
    "resume": "continue a run: its folder or last.pt (other flags override its config, e.g. --epochs)",
    "init_from": "fine-tune from a previous model.pt (or its folder)",
    "max_steps": "stop after this many optimizer steps in all (the schedule still spans --epochs)",
    "workers": "DataLoader decode workers (default: CPU cores - 1, at most 8)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verity train",
        description="Train a genuine/counterfeit classifier, then calibrate, evaluate and export it.",
    )
    parser.add_argument("--config", help="YAML file of config keys (flags given here override it)")
    types_by_name = field_types()
    for item in fields(TrainConfig):
        if item.name == "extra":
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not MISSING else None
        help_text = _HELP.get(item.name, "") + (f" (default: {default})" if item.name not in _HELP else "")
        kind = types_by_name[item.name]
        # SUPPRESS: a flag not given stays absent, so YAML and resumed values are not overwritten.
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=item.name.upper()
            )
    return parser


def _unknown_flags_error(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    valid = [option for action in parser._actions for option in action.option_strings]
    parts = []
    for flag in unknown:
        if not flag.startswith("-"):
            parts.append(f"unexpected argument {flag!r}")
            continue
        close = difflib.get_close_matches(flag.split("=")[0], valid, n=3, cutoff=0.6)
        parts.append(f"unknown option {flag!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return "; ".join(parts) + ". See `verity train --help`."


def parse_config(argv: list[str]) -> TrainConfig:
    """Flags -> TrainConfig with the documented precedence; raises ConfigError with close matches."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_flags_error(unknown, parser))
    overrides: dict[str, Any] = vars(namespace)
    yaml_path = overrides.pop("config", None)
    base = None
    if overrides.get("resume"):
        from verity.training.checkpoint import resume_base_config

        base = resume_base_config(overrides["resume"])
    config = build_config(yaml_path, overrides, base)
    if not config.data:
        raise ConfigError("No training data: give --data MANIFEST|DIR (or data: in the --config file).")
    return config


def _print_outputs(outputs: dict[str, Any]) -> None:
    metrics = outputs["metrics"]
    test = metrics.get("test") or {}
    val = metrics["val"]
    thresholds = outputs["thresholds"]
    print(
        f"\nvalidation ROC AUC {val.get('roc_auc')}, "
        f"test ROC AUC {test.get('roc_auc', 'n/a (no test split)')}"
    )
    print(
        f"temperature {outputs['temperature']:.3f}; thresholds alarm {thresholds['alarm']:.4f}, "
        f"clear {thresholds['clear']:.4f} (val false-alarm rate {thresholds['val_false_alarm_rate']:.4f}, "
        f"miss rate {thresholds['val_miss_rate']:.4f})"
    )
    print(f"run folder:  {outputs['run_dir']}")
    for key, label in (
        ("model_pt", "checkpoint"),
        ("model_onnx", "ONNX model"),
        ("card_json", "model card"),
        ("report_html", "report"),
        ("data_manifest", "data used"),
    ):
        if outputs.get(key):
            print(f"{label + ':':<12} {outputs[key]}")
    if outputs.get("export"):
        print(f"export parity: max |delta logit| {outputs['export']['max_abs_diff']:.2e}")
    if outputs.get("novelty"):
        from verity.training.open_set import describe

        print(describe(outputs["novelty"]))
    print(
        f"evaluate again: verity eval --model {outputs['run_dir']} "
        f"--data {outputs['data_manifest']} --split test"
    )


def train_main(argv: list[str] | None = None) -> int:
    """`verity train` entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(argv)
    except ConfigError as error:
        print(f"verity train: error: {error}", file=sys.stderr)
        return 2
    from verity.training.guard import WeakRunError
    from verity.training.trainer import train

    try:
        outputs = train(config)
    except WeakRunError as error:
        print(f"verity train: {error}", file=sys.stderr)
        return WEAK_RUN
    if outputs.get("model_pt"):  # rank 0 writes and reports; other ranks return a digest only
        _print_outputs(outputs)
    if outputs.get("export_error"):
        print(f"verity train: {outputs['export_error']}", file=sys.stderr)
        return EXPORT_FAILED
    return 0


main = train_main
