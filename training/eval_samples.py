"""The evaluation set: samples read as `verity train` reads its data, split as the model's run split them.

Data: a manifest (JSONL, rows filtered by split), a folder holding a manifest.jsonl, or a folder laid out
as DIR/genuine/... and DIR/counterfeit/... or DIR/<split>/genuine/... (a subfolder below the label names
the product; label folders may have any name ingest accepts: real/, fake/, ..., see
datasets.rows.LABEL_SYNONYMS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verity.datasets.rows import MANIFEST_NAMES, assign_missing_splits, read_rows, split_folder_rows
from verity.datasets.split import group_key
from verity.inference.vocabulary import DEFAULT_SPLIT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int  # 0 genuine, 1 counterfeit
    modality: str | None = None
    product: str | None = None
    source: str | None = None
    # The unit the split keeps on one side (`datasets.split.group_key`: the case, else the product, else
    # the file); None where the split is a folder's, one image a unit.
    group: str | None = None


@dataclass
class LoadedData:
    samples: list[Sample]
    description: str
    notes: list[str] = field(default_factory=list)
    skipped_other_modality: int = 0


@dataclass(frozen=True)
class SplitParams:
    """How `verity train` splits rows that have no split; evaluation must reproduce it exactly."""

    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SPLIT_SEED


def split_params_for(model_path: Path | None) -> SplitParams:
    """The split settings of the run that made the model: its config.yaml (or model.pt config), else
    the training defaults."""
    if model_path is None:
        return SplitParams()
    config: dict[str, Any] = {}
    config_yaml = model_path.parent / "config.yaml"
    if config_yaml.is_file():
        import yaml

        config = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
    elif model_path.suffix == ".pt":
        from verity.training.checkpoint import load_checkpoint

        config = load_checkpoint(model_path).get("config") or {}
    defaults = SplitParams()
    return SplitParams(
        val_fraction=float(config.get("val_fraction", defaults.val_fraction)),
        test_fraction=float(config.get("test_fraction", defaults.test_fraction)),
        seed=int(config.get("seed", defaults.seed)),
    )


def load_samples(
    data: str | Path, split: str | None, modality: str, params: SplitParams | None = None
) -> LoadedData:
    """Reads the evaluation set as `verity train` reads its data (`datasets.rows`): a manifest, a folder
    with manifest.jsonl, or a labelled folder DIR/genuine, DIR/counterfeit. Rows without a split get the
    same grouped split training gave them (`params`), so `--split test` never holds a training image.
    DIR/<split>/<label>/... folders are read as they are split.
    """
    params = params or SplitParams()
    path = Path(data)
    if path.is_dir() and not any((path / name).is_file() for name in MANIFEST_NAMES):
        folders = split_folder_rows(path, split, modality)
        if folders is not None:
            samples = [Sample(Path(row.path), row.target, row.modality, row.product, None) for row in folders]
            return LoadedData(samples, f"folder {path / split if split else path}")
    rows, description, skipped = read_rows(data, modality)
    notes = [f"Skipped {skipped} rows of another modality than the model's ({modality})."] if skipped else []
    if any(row.split is None for row in rows):
        rows = assign_missing_splits(rows, params.val_fraction, params.test_fraction, params.seed)
        notes.insert(
            0,
            "Rows without a split got the grouped split `verity train` gives them "
            f"(val {params.val_fraction:g}, test {params.test_fraction:g}, seed {params.seed}); "
            "--split all evaluates every image.",
        )
    if split:
        chosen = [row for row in rows if row.split == split]
        if not chosen:
            present = ", ".join(sorted({str(row.split) for row in rows}))
            raise ValueError(f"{data} has no {modality} rows in split {split!r}. Splits present: {present}.")
        rows = chosen
    samples = [
        Sample(Path(row.path), row.target, row.modality, row.product, row.source, group_key(row))
        for row in rows
    ]
    where = f"split {split!r} of " if split else ""
    return LoadedData(samples, f"{where}{description}", notes=notes, skipped_other_modality=skipped)
