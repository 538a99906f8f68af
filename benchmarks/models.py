"""Models for benchmarks and tests: a tiny hand-built ONNX graph and the real efficientnet_lite0.

`tiny_onnx` writes, with onnx.helper only (no torch, milliseconds), a model that follows the Verity
contract: input "image" (N x C x S x S in [0, 1]), normalization as its first op, outputs "logits" and
"cam" (class activation map = 1x1 classifier applied to the final feature map; logits = its spatial
mean), spec and card in the metadata. Its "counterfeit" evidence is brightness: a bright region scores
high and lights up the CAM, which makes tiling and heatmap tests checkable: a black image scores about
0.2, a white one about 0.95. It is the one tiny model of the project: the API tests' model folders
(tests/api_fixtures.py) are made of it too.

`lite0_onnx` builds the default backbone through the training registry and the real exporter (with its
parity gate); random weights, since only speed is measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.engine import METADATA_CARD_KEY, METADATA_SPEC_KEY
from verity.inference.spec import PreprocessSpec, resolve_spec


def tiny_card(
    spec: PreprocessSpec,
    name: str | None = None,
    version: str = "0.0.1",
    alarm: float = 0.8,
    clear: float = 0.3,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """A minimal card with every key the engine and the API read (`name` defaults to tiny-<modality>)."""
    return {
        "name": name or f"tiny-{spec.modality}",
        "version": version,
        "modality": spec.modality,
        "backbone": "tiny-brightness",
        "created": "2026-01-01T00:00:00Z",
        "data": {"fingerprint": "none", "counts": {}},
        "metrics": {"val": {}, "test": {}},
        "calibration": {"temperature": temperature},
        "thresholds": {
            "alarm": alarm, "clear": clear, "target_false_alarm_rate": 0.01, "target_miss_rate": 0.05
        },
        "spec": spec.to_dict(),
        "code_version": "test",
    }


def tiny_spec(modality: str = "photo", size: int = 32) -> PreprocessSpec:
    """The modality's default spec at `size` px."""
    return resolve_spec(modality, override={"image_size": size})


def tiny_graph(
    spec: PreprocessSpec, features: int = 4, seed: int = 0, embedding: bool = False, patches: bool = False
) -> Any:
    """The tiny contract graph: Normalize, stride-4 conv, ReLU, 1x1 classifier as CAM, spatial mean.

    With `embedding`, it also outputs the L2-normalised spatial mean of the ReLU features (N x features),
    as a VerityNet export does; with `patches`, the ReLU feature map itself as `patches` (N x features x
    S/4 x S/4), the local features of the product reference check."""
    from onnx import TensorProto, helper, numpy_helper

    c = spec.in_chans
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.05, (features, c, 4, 4)).astype(np.float32)
    conv_w[0] = 1.0 / (c * 16)  # feature 0 = mean brightness of the 4x4 cell (normalized)
    cls_w = np.zeros((2, features, 1, 1), np.float32)
    cls_w[1, 0, 0, 0] = 2.0  # counterfeit evidence grows with brightness
    cls_w[:, 1:, 0, 0] = rng.normal(0, 0.1, (2, features - 1))
    weights = {
        "mean": np.array(spec.mean, np.float32).reshape(1, c, 1, 1),
        "std": np.array(spec.std, np.float32).reshape(1, c, 1, 1),
        "conv_w": conv_w,
        "conv_b": np.zeros(features, np.float32),
        "cls_w": cls_w,
        "cls_b": np.array([0.0, -1.5], np.float32),
    }
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalized"]),
        helper.make_node("Conv", ["normalized", "conv_w", "conv_b"], ["conv"], strides=[4, 4]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("Conv", ["features", "cls_w", "cls_b"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"], axis=1),
    ]
    s = spec.image_size
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 2, s // 4, s // 4]),
    ]
    if embedding:
        nodes += [
            helper.make_node("GlobalAveragePool", ["features"], ["feature_mean"]),
            helper.make_node("Flatten", ["feature_mean"], ["feature_rows"], axis=1),
            helper.make_node("LpNormalization", ["feature_rows"], ["embedding"], axis=1, p=2),
        ]
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", features]))
    if patches:
        nodes.append(helper.make_node("Identity", ["features"], ["patches"]))
        shape = ["N", features, s // 4, s // 4]
        outputs.append(helper.make_tensor_value_info("patches", TensorProto.FLOAT, shape))
    return helper.make_graph(
        nodes,
        "tiny_verity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", c, s, s])],
        outputs,
        [numpy_helper.from_array(value, key) for key, value in weights.items()],
    )


def tiny_onnx(
    path: str | Path,
    spec: PreprocessSpec | None = None,
    card: dict[str, Any] | None = None,
    features: int = 4,
    seed: int = 0,
    embedding: bool = False,
    patches: bool = False,
) -> Path:
    """Writes the tiny contract model with its spec and card in the metadata to `path` (with an
    `embedding` output when asked; the card then records its width)."""
    import onnx
    from onnx import helper

    spec = spec or tiny_spec()
    card = dict(card or tiny_card(spec))
    if embedding:
        card.setdefault("embedding_dim", features)
    graph = tiny_graph(spec, features, seed, embedding, patches)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    for key, value in ((METADATA_SPEC_KEY, spec.to_json()), (METADATA_CARD_KEY, json.dumps(card))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def lite0_torch(modality: str = "photo", size: int = 224) -> Any:
    """The registry's efficientnet_lite0 (random weights) for `modality` at `size` px, eval mode."""
    from verity.training.models import build_for_spec

    spec = resolve_spec(modality, override={"image_size": size})
    return build_for_spec("efficientnet_lite0", spec).eval(), spec


def lite0_onnx(path: str | Path, modality: str = "photo", size: int = 224) -> Path:
    """Exports the registry efficientnet_lite0 through training.export.export_onnx (parity gate on)."""
    from verity.inference.card import ModelCard
    from verity.training.export import export_onnx

    model, spec = lite0_torch(modality, size)
    card = ModelCard(
        name=f"bench-{modality}",
        version="0.0.0",
        modality=modality,
        backbone="efficientnet_lite0",
        spec=spec,
        thresholds={"alarm": 0.9, "clear": 0.1},
        temperature=1.0,
        metrics={},
        data_fingerprint="none",
        data_counts={},
        code_version="bench",
        warnings=(),
    )
    export_onnx(model, spec, card, path)
    return Path(path)


__all__ = ["lite0_onnx", "lite0_torch", "tiny_card", "tiny_graph", "tiny_onnx", "tiny_spec"]
