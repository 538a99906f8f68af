"""Torch models in miniature for the export and evaluation tests (imported by torch-marked tests only).

Both follow the model contract: Normalize with the spec's mean/std first, forward -> (logits, cam),
where the CAM is the linear classifier applied to each cell of the feature map (so the logits are its
spatial mean). `tiny_net` has small random weights and BatchNorm; `contrast_net` has hand-set weights
that read red minus blue, so a test set leaning red for counterfeits is separated without training.
"""

from __future__ import annotations

import torch

from verity.inference.spec import PreprocessSpec

torch.set_num_threads(1)


class Normalize(torch.nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class CamNet(torch.nn.Module):
    """Normalize -> `features` (width channels) -> linear classifier on the mean and on every cell."""

    def __init__(self, spec: PreprocessSpec, features: torch.nn.Module, width: int) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = features
        self.classifier = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.normalize(x))
        logits = self.classifier(features.mean(dim=(2, 3)))
        cam = torch.einsum("kc,nchw->nkhw", self.classifier.weight, features)
        return logits, cam + self.classifier.bias.view(1, -1, 1, 1)


def tiny_features(in_chans: int, width: int = 8) -> torch.nn.Sequential:
    """Two stride-2 convolutions (the first with BatchNorm), random weights from torch's current seed."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(width),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, stride=2, padding=1),
        torch.nn.ReLU(),
    )


def tiny_net(spec: PreprocessSpec, width: int = 8) -> CamNet:
    """A CamNet on `tiny_features`."""
    return CamNet(spec, tiny_features(spec.in_chans, width), width)


def contrast_net(spec: PreprocessSpec) -> CamNet:
    """An RGB model whose counterfeit logit is the normalized red minus blue and genuine its negative."""
    model = CamNet(spec, torch.nn.Conv2d(3, 2, 1), 2)
    with torch.no_grad():
        model.features.weight.zero_()
        model.features.bias.zero_()
        model.features.weight[1, 0] = 1.0  # red
        model.features.weight[1, 2] = -1.0  # minus blue
        model.classifier.weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
        model.classifier.bias.zero_()
    return model
