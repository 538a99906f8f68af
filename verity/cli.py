"""`verity`: one command with subcommands, each imported only when used.

Serving and prediction must not pay for (or even have installed) torch, so the training stack is
imported only by the subcommands that need it. Each subcommand module exposes `main(argv) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("verity.datasets.cli", "main", "generate synthetic data, ingest images, print manifest stats"),
    "train": ("verity.training.cli", "train_main", "train a model on a manifest or a folder of images"),
    "eval": ("verity.training.eval_cli", "main", "evaluate a model on a manifest or folder"),
    "export": ("verity.training.export_cli", "main", "export a checkpoint to ONNX with its spec and card"),
    "compare": ("verity.training.compare", "main", "a champion against a challenger on a frozen benchmark"),
    "retrain": ("verity.training.retrain", "main", "new seizures: ingest, fine-tune, compare"),
    "serve": ("verity.api.cli", "serve_main", "run the HTTP service"),
    "predict": ("verity.inference.cli", "main", "give a verdict for image files from the command line"),
    "keys": ("verity.api.cli", "keys_main", "add, revoke and list station API keys"),
    "promote": ("verity.api.lifecycle_cli", "promote_main", "point a model's production alias at a version"),
    "rollback": ("verity.api.lifecycle_cli", "rollback_main", "point a model's alias back"),
    "drift": ("verity.api.lifecycle_cli", "drift_main", "how far live answers drifted from validation"),
    "shadow": ("verity.api.lifecycle_cli", "shadow_main", "the shadow model's answers beside production"),
    "audit": ("verity.api.cli", "audit_main", "export the audit log"),
    "refs": ("verity.api.refs_cli", "refs_main", "enrol, list and remove genuine product references"),
    "alerts": ("verity.api.alerts_cli", "alerts_main", "seizure alerts: endpoints, outbox, retries"),
}


# Set before the command's module imports numpy, whose OpenBLAS reads it once. A server runs one model
# thread per core and decodes on every core; the matrix products of its novelty gate and reference
# check are small (one image against a 10,000-row bank), and OpenBLAS's default of a thread per core
# spun idle threads for them: 32 ms of CPU for a gated request with a product, 10.7 ms on one thread
# (9.2 ms without the checks; the shipped photo model, in process, 2 cores). An operator's own value wins.
SERVING_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1"}
SERVING_COMMANDS = ("serve",)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: verity <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Run `verity <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"verity: unknown command {name!r}. Valid commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    if name in SERVING_COMMANDS:
        for variable, value in SERVING_ENVIRONMENT.items():
            os.environ.setdefault(variable, value)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(rest) or 0)
    except KeyboardInterrupt:
        print("verity: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as error:
        # User-facing failures (bad paths, bad files, bad options) get one clear line, not a traceback.
        if os.environ.get("VERITY_DEBUG"):
            raise
        from verity.inference.terminal import terminal_safe  # an error may quote a file name or a field

        for line in _error_lines(error):
            print(terminal_safe(f"verity {name}: error: {line}"), file=sys.stderr)
        return 1


def _error_lines(error: Exception) -> list[str]:
    """One line per problem: a settings error (pydantic's ValidationError) names each VERITY_ variable and
    what is wrong with it; any other error is its message."""
    problems = getattr(error, "errors", None)
    if type(error).__name__ != "ValidationError" or not callable(problems):
        return [str(error)]
    lines = []
    for problem in problems():
        field = "_".join(str(part) for part in problem.get("loc", ()))
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"VERITY_{field.upper()}: {message}" if field else message)
    return lines or [str(error)]


if __name__ == "__main__":
    sys.exit(main())
