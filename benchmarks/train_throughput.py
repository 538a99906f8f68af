"""Training images/s of `verity train` next to a bare torch loop over the same model and data.

Both sides decode the same files with the same augmentation through the same Dataset, use the same
DataLoader workers, batch size, AdamW, channels_last and precision; the bare loop has nothing else
(no schedule, no class weights, no logging, no checkpoints). Each side is timed over the same number of
optimizer steps, first batch included, as `verity train` times its epochs. The trainer's figure is the
one it logs itself (train_images_per_s in metrics.csv). The target: ours within 15% of the bare loop.

    .venv/bin/python benchmarks/train_throughput.py --steps 8 --batch-size 32 --image-size 224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from verity.datasets.rows import load_rows
from verity.datasets.torch_dataset import ManifestDataset
from verity.inference.spec import resolve_spec
from verity.training.augment import Augmenter
from verity.training.config import TrainConfig
from verity.training.distributed import DistInfo
from verity.training.models import build_for_spec
from verity.training.run import worker_count
from verity.training.trainer import EpochSampler, train_from_options


def make_images(root: Path, count: int, size: int) -> Path:
    """Label-like test images: noise, a coloured patch, saved as JPEG (the usual upload format)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        label = ("genuine", "counterfeit")[index % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (size, size * 4 // 3, 3), dtype=np.uint8)
        image[size // 4 : size // 2, size // 4 : size // 2] = (200, 30, 30) if index % 2 else (30, 30, 200)
        Image.fromarray(image).save(root / label / f"{index:04d}.jpg", quality=90)
    return root


def ours(data: Path, out: Path, args: argparse.Namespace) -> float:
    """images/s of the trainer, as it logs it, over `steps` steps (validation and setup excluded)."""
    steps_per_epoch = int(len(load_rows(data, "photo", val=0.1, test=0.1)[0]) * 0.8) // args.batch_size
    if steps_per_epoch < args.steps:
        raise SystemExit(f"Need at least {args.steps} training batches; raise --images.")
    train_from_options(
        data=str(data), out=str(out), name="bench", model=args.model, pretrained=False, epochs=1,
        max_steps=args.steps, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
        val_fraction=0.1, test_fraction=0.1, export=False, report=False, progress=False, amp=args.amp,
        allow_weak=True,
    )  # fmt: skip
    history = torch.load(out / "bench" / "dev" / "last.pt", weights_only=True)["run_state"]["history"]
    return float(history[0]["train_images_per_s"])


def bare_loop(data: Path, args: argparse.Namespace) -> float:
    """The same model and data through the plainest loop torch offers."""
    torch.manual_seed(0)
    spec = resolve_spec("photo", override={"image_size": args.image_size})
    rows = [row for row in load_rows(data, "photo", val=0.1, test=0.1)[0] if row.split == "train"]
    augmenter = Augmenter("photo", spec)
    dataset = ManifestDataset(rows, spec, augmenter, augmenter.set_seed)
    sampler = EpochSampler(len(dataset), 0, DistInfo())
    workers = worker_count(TrainConfig(workers=args.workers))
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)  # fmt: skip
    model = build_for_spec(args.model, spec).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = torch.bfloat16 if args.amp == "bf16" else None
    started, seen = time.perf_counter(), 0
    for step, (images, targets) in enumerate(loader):
        if step == args.steps:
            break
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _ = model(images.contiguous(memory_format=torch.channels_last))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(targets)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        data = make_images(root / "data", args.images, args.image_size * 2)
        results: dict[str, list[float]] = {"verity train": [], "bare torch loop": []}
        for repeat in range(args.repeats):  # alternate, so load from other processes hits both alike
            results["bare torch loop"].append(bare_loop(data, args))
            results["verity train"].append(ours(data, root / f"run{repeat}", args))
    best = {name: max(values) for name, values in results.items()}
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"workers {args.workers if args.workers is not None else 'auto'}, amp {args.amp}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    for name, values in results.items():
        runs = ", ".join(f"{value:.1f}" for value in values)
        print(f"  {name:<16} {best[name]:7.1f} images/s  (runs: {runs})")
    ratio = best["verity train"] / best["bare torch loop"]
    verdict = "within" if ratio >= 0.85 else "NOT within"
    print(f"  verity train / bare loop = {ratio:.3f} ({verdict} 15%)")


if __name__ == "__main__":
    main()
