"""The yardstick: a plain fine-tune that every change to Verity's training recipe must beat.

Deliberately plain: PIL opens each file as RGB and squashes it to 224x224, ImageNet normalization,
random horizontal and vertical flips, Adam at 1e-4 for a fixed number of epochs, the last epoch's
weights; the same backbone and packaged ImageNet weights as `verity train` (efficientnet_lite0). It
reads nothing of Verity's preprocessing, so a fault there cannot hide in both sides of a comparison.

    .venv/bin/python benchmarks/baseline_finetune.py --data MANIFEST --seed 0 [--epochs 8]

It trains on the manifest's train split and prints one JSON line with the test split's ROC AUC.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from verity.datasets.manifest import read_manifest, resolve_image_path
from verity.training.metrics import bootstrap_intervals, roc_auc
from verity.training.models import build_model

SIZE = 224


def load(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    # [0, 1]: the model's first layer normalizes with the ImageNet statistics.
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def split(manifest: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [row for row in read_manifest(manifest) if row.split == name]
    images = torch.stack([load(str(resolve_image_path(manifest, row))) for row in rows])
    return images, torch.tensor([row.target for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a manifest with train and test splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_x, train_y = split(args.data, "train")
    test_x, test_y = split(args.data, "test")
    model = build_model("efficientnet_lite0", num_classes=2, in_chans=3, pretrained=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train_x)).split(32):
            images = train_x[batch]
            images = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, images.flip(3), images)
            images = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, images.flip(2), images)
            loss = torch.nn.functional.cross_entropy(model(images)[0], train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk)[0] for chunk in test_x.split(64)])
    scores, targets = torch.softmax(logits, dim=1)[:, 1].numpy(), test_y.numpy()
    intervals = bootstrap_intervals(scores, targets) or {}
    figures = {"seed": args.seed, "epochs": args.epochs, "test_roc_auc": roc_auc(scores, targets),
               "test_roc_auc_ci": intervals.get("roc_auc"), "train_n": len(train_y), "test_n": len(test_y),
               "seconds": time.perf_counter() - started}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
