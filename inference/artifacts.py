"""Model artifacts on disk: the natural version order, and which model file a path names.

`verity train --out DIR` writes DIR/<name>/<version>/model.onnx (and model.pt); the server serves every
<name>/<version>/model.onnx below its models folder. `verity predict`, `verity eval` and the server's
registry order versions by `version_sort_key` and find a model by `resolve_model`, so all of them take
version 10 over 9 and 1.10.0 over 1.9.0.
"""

from __future__ import annotations

import re
from pathlib import Path

# What a version folder may hold, in order of preference: the ONNX export is what the server runs.
MODEL_FILES = ("model.onnx", "model.pt")
ONNX_FILES = ("model.onnx",)
# `verity compare`'s result; beside a candidate version (`verity retrain` leaves it there), `verity promote`
# judges the version by it and the admin's /v1/lifecycle shows it.
COMPARISON_FILE = "compare.json"


def version_sort_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order of version names: numbers compare as numbers (2026.11.2 < 2026.11.10, v9 < v10),
    text as text, and a number sorts before text in the same place (1.0 < 1.0rc1 < 1.0x)."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|\D+", version)
    )


def scan_model_files(models_dir: Path) -> list[Path]:
    """<models_dir>/<name>/<version>/model.onnx, sorted; other files (model.int8.onnx, ...) are ignored."""
    if not models_dir.is_dir():
        return []
    return sorted(models_dir.glob("*/*/model.onnx"))


def _model_file(folder: Path, files: tuple[str, ...]) -> Path | None:
    """The folder's first file of `files` that exists."""
    return next((folder / name for name in files if (folder / name).is_file()), None)


def _version_folders(folder: Path, files: tuple[str, ...]) -> list[Path]:
    """Sub-folders holding a model file, oldest to newest in natural version order."""
    found = [p for p in folder.iterdir() if p.is_dir() and _model_file(p, files)]
    return sorted(found, key=lambda p: version_sort_key(p.name))


def _kinds(files: tuple[str, ...]) -> str:
    return " or ".join(files)


def _wrong_suffix(path: Path, suffixes: tuple[str, ...]) -> str:
    names = {".onnx": "an ONNX model (.onnx)", ".pt": "a checkpoint (.pt)"}
    wanted = " nor ".join(names.get(suffix, f"a {suffix} file") for suffix in suffixes)
    return f"{path} is {'neither' if len(suffixes) > 1 else 'not'} {wanted}."


def resolve_model(model: str | Path, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """The model file a path names: a model file itself, or a folder at any of the three levels
    `verity train --out DIR` writes:

    * a version folder DIR/<name>/<version>/ holding one of `files` (the first one present);
    * a model folder DIR/<name>/: its newest version, in natural order (10 after 9);
    * the --out folder DIR/ itself, when it holds exactly one model (several: an error that lists them).

    `files` are the names a version folder may hold, preferred first; a file given directly must have
    one of their suffixes.
    """
    path = Path(model)
    suffixes = tuple(dict.fromkeys(Path(name).suffix for name in files))
    if path.is_file():
        if path.suffix not in suffixes:
            raise ValueError(_wrong_suffix(path, suffixes))
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"No model at {path}: give a model file ({_kinds(files)}) or its folder.")
    found = _model_file(path, files)
    if found:
        return found
    versions = _version_folders(path, files)
    if versions:
        return _model_file(versions[-1], files) or versions[-1]
    models = sorted(p for p in path.iterdir() if p.is_dir() and _version_folders(p, files))
    if len(models) == 1:
        return resolve_model(models[0], files)
    if models:
        raise ValueError(
            f"{path} holds {len(models)} models ({', '.join(p.name for p in models)}); "
            f"choose one, e.g. --model {models[0]}."
        )
    raise FileNotFoundError(
        f"{path} holds no {_kinds(files)}, nor <version>/ or <name>/<version>/ folders with one."
    )
