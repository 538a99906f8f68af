"""The float32 noise between torch and onnxruntime that the export parity gate must never trip on.

Exports models to ONNX without the gate and measures, per output, max |delta| / max(1, max |value|), the
figure training/export.PARITY_TOLERANCE bounds. The models: the shipped ones, every model.pt that the
robustness suite wrote under data/bench-runs/ (trained on real and synthetic sets), and freshly built
ones (packaged ImageNet backbone, random head; photo 3-channel and X-ray 1-channel) over several seeds.
The inputs: uniform noise, flat images, and real images when data/real/ holds the suite's manifests.

    .venv/bin/python benchmarks/parity_noise.py [--fresh 4] [--max-trained 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verity.datasets.manifest import read_manifest  # noqa: E402
from verity.inference.card import ModelCard  # noqa: E402
from verity.inference.preprocess import load_for_model  # noqa: E402
from verity.inference.spec import PreprocessSpec, resolve_spec  # noqa: E402
from verity.training import export  # noqa: E402
from verity.training.checkpoint import checkpoint_spec, load_checkpoint, model_from_checkpoint  # noqa: E402
from verity.training.export_cli import card_from_checkpoint  # noqa: E402
from verity.training.models import build_for_spec  # noqa: E402

GATED = tuple(export.PARITY_TOLERANCE)


def inputs(spec: PreprocessSpec, seed: int) -> list[np.ndarray]:
    """Noise, flat images at three levels, and up to 8 real images of the spec's modality."""
    shape = (spec.in_chans, spec.image_size, spec.image_size)
    rng = np.random.default_rng(seed)
    batches = [rng.random((5, *shape), dtype=np.float32)]
    batches.append(np.stack([np.full(shape, level, np.float32) for level in (0.0, 0.5, 1.0)]))
    manifests = sorted((ROOT / "data" / "real").glob("*/manifest.jsonl"))
    rows = [row for path in manifests for row in read_manifest(path) if row.modality == spec.modality]
    if rows:
        picked = [rows[i] for i in rng.choice(len(rows), size=min(8, len(rows)), replace=False)]
        batches.append(np.stack([load_for_model(Path(row.path), spec) for row in picked]))
    return batches


def measure(model: torch.nn.Module, spec: PreprocessSpec, card: ModelCard, seed: int) -> dict[str, float]:
    """Exports `model` to a temporary file and returns check_parity's figures, ungated."""
    model = model.eval()
    model.embedding_output = True
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        names = export._output_names(model, torch.from_numpy(inputs(spec, seed)[0][:2]))
        export._export_graph(model, torch.from_numpy(inputs(spec, seed)[0][:2]), path, "torchscript", names)
        export._add_metadata(path, spec, card)
        return export.check_parity(model, path, inputs(spec, seed))


def trained_models(limit: int) -> list[tuple[str, torch.nn.Module, PreprocessSpec, ModelCard]]:
    paths = sorted((ROOT / "checkpoints").glob("*/*/model.pt"))
    paths += sorted((ROOT / "data" / "bench-runs").glob("**/model.pt"))[:limit]
    found = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        card = card_from_checkpoint(checkpoint, path)
        found.append(
            (
                str(path.relative_to(ROOT)),
                model_from_checkpoint(checkpoint),
                checkpoint_spec(checkpoint),
                card,
            )
        )
    return found


def fresh_models(count: int) -> list[tuple[str, torch.nn.Module, PreprocessSpec, ModelCard]]:
    shipped = ModelCard.from_dict(load_checkpoint(ROOT / "checkpoints/photo-default/1.0.0/model.pt")["card"])
    found = []
    for seed in range(count):
        for modality, chans in (("photo", 3), ("xray", 1)):
            torch.manual_seed(seed)
            spec = resolve_spec(modality, override={"in_chans": chans, "image_size": 224})
            card = ModelCard.from_dict(
                {
                    **shipped.to_dict(),
                    "modality": modality,
                    "spec": spec.to_dict(),
                    "embedding_dim": None,
                    "novelty": None,
                }
            )
            found.append(
                (f"fresh {modality} seed {seed}", build_for_spec("efficientnet_lite0", spec), spec, card)
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", type=int, default=4, help="seeds of freshly built models per modality")
    parser.add_argument("--max-trained", type=int, default=12, help="suite models at most")
    args = parser.parse_args()
    worst = dict.fromkeys(GATED, 0.0)
    print("| model | " + " | ".join(f"{key} (relative)" for key in GATED) + " | largest logit |")
    print("| --- " * (len(GATED) + 2) + "|")
    for seed, (name, model, spec, card) in enumerate(
        trained_models(args.max_trained) + fresh_models(args.fresh)
    ):
        figures = measure(model, spec, card, seed)
        cells = [f"{figures.get(f'{key}_relative', float('nan')):.2e}" for key in GATED]
        print(f"| {name} | " + " | ".join(cells) + f" | {figures['largest_logit']:.2f} |", flush=True)
        for key in GATED:
            worst[key] = max(worst[key], figures.get(f"{key}_relative", 0.0))
    for key in GATED:
        tolerance = export.PARITY_TOLERANCE[key]
        margin = tolerance / max(worst[key], 1e-12)
        print(f"{key}: worst {worst[key]:.2e}, tolerance {tolerance:g} ({margin:.0f}x the worst)")


if __name__ == "__main__":
    main()
