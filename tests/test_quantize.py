"""INT8 static quantization behind its accuracy gate; the fp16 variant; the export CLI hook."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_onnx
from verity.inference.engine import OnnxEngine
from verity.training.quantize import (
    add_export_arguments,
    export_fp16,
    quantize_model,
    run_export_variants,
    sensitive_nodes,
)

pytestmark = pytest.mark.torch  # training.quantize loads the exporter, which imports torch


def _png(value: int, rng: np.random.Generator) -> bytes:
    array = np.clip(rng.normal(value, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/val/<label>/*.png: dark genuine and bright counterfeit images (the tiny model's rule)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for label, value in (("genuine", 50), ("counterfeit", 190)):
        folder = root / "val" / label
        folder.mkdir(parents=True)
        for i in range(12):
            (folder / f"{i}.png").write_bytes(_png(value, rng))
    return root


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "model.onnx")


def test_int8_passes_its_gate_and_records_it_in_the_card(model: Path, val_folder: Path) -> None:
    result = quantize_model(model, val_folder, calibration_images=8)
    assert result["passed"] and result["written"], result
    assert result["auc_drop"] is not None and result["auc_drop"] <= 0.005
    assert result["verdict_agreement"] >= 0.99 and result["images"] == 24
    assert result["calibration_images"] == 8 and result["format"] == "QDQ" and result["per_channel"]
    int8_path = model.with_name("model.int8.onnx")
    assert int8_path.stat().st_mode & 0o777 == 0o644
    engine = OnnxEngine(int8_path, provider="cpu")
    assert engine.card.precision == "int8"
    assert engine.card.int8_gate is not None
    assert engine.card.int8_gate["verdict_agreement"] == result["verdict_agreement"]
    assert engine.spec == OnnxEngine(model, provider="cpu").spec
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}  # never dynamic
    # OnnxEngine's precision="auto" picks the INT8 file on CPU now that it exists.
    assert OnnxEngine(model, provider="cpu", precision="auto").precision == "int8"


def test_gate_failure_writes_nothing(model: Path, val_folder: Path) -> None:
    out = model.with_name("model.int8.onnx")
    result = quantize_model(model, val_folder, out, calibration_images=4, auc_tolerance=-1.0)
    assert not result["passed"] and not result["written"] and not out.exists()
    assert any("ROC AUC drops" in reason for reason in result["reasons"])
    result = quantize_model(model, val_folder, out, calibration_images=4, min_agreement=1.01)
    assert not result["written"] and any("verdict agreement" in r for r in result["reasons"])


def test_pairs_need_both_classes_for_the_gate(model: Path) -> None:
    rng = np.random.default_rng(1)
    pairs = [(_png(60, rng), "genuine") for _ in range(6)]
    result = quantize_model(model, pairs, calibration_images=4)
    assert not result["written"] and "both genuine and counterfeit" in result["reasons"][0]
    with pytest.raises(ValueError, match="Invalid label 'fake'"):
        quantize_model(model, [(pairs[0][0], "fake")])


def test_fp16_variant_and_export_cli_hook(model: Path, val_folder: Path) -> None:
    import onnx

    fp16 = export_fp16(model)
    proto = onnx.load(str(fp16))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O
    card = json.loads(next(p.value for p in proto.metadata_props if p.key == "verity.card"))
    assert card["precision"] == "fp16"

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    with pytest.raises(ValueError, match="--int8 needs --val-data"):
        run_export_variants(parser.parse_args(["--int8"]), model)
    lines, int8 = run_export_variants(
        parser.parse_args(["--int8", "--val-data", str(val_folder), "--calibration-images", "4"]), model
    )
    # The all-INT8 attempt of this tiny model can miss the verdict gate (it does with today's numpy 2.4 /
    # onnxruntime 1.32 stack) and the retry with sensitive layers in float passes: either way the last
    # line says where the file went.
    assert int8 is not None and int8["written"] and "written to" in lines[-1]
    assert int8["method"] == "minmax"
    args = ["--int8", "--val-data", str(val_folder), "--calibration-method", "percentile"]
    _, int8 = run_export_variants(parser.parse_args(args), model)
    assert int8 is not None and int8["method"] == "percentile"
    assert run_export_variants(parser.parse_args([]), model) == ([], None)


def _float_weight_convs(path: Path) -> set[str]:
    """Conv nodes whose weights come straight from a float initializer (not through DequantizeLinear)."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {init.name for init in graph.initializer}
    return {node.name for node in graph.node if node.op_type == "Conv" and node.input[1] in initializers}


def _named_graph(model: Path):  # noqa: ANN202 - onnx GraphProto
    import onnx

    from verity.training.quantize import _name_nodes

    graph = onnx.load(str(model)).graph
    _name_nodes(graph)
    return graph


def test_sensitive_layers_are_the_first_conv_and_the_output_writers(model: Path) -> None:
    graph = _named_graph(model)
    nodes = sensitive_nodes(graph)
    assert nodes[0] == next(node.name for node in graph.node if node.op_type == "Conv")
    outputs = {o.name for o in graph.output}
    writers = {node.name for node in graph.node if outputs & set(node.output)}
    assert writers and set(nodes[1:]) == writers


def test_failed_gate_is_retried_with_the_sensitive_layers_in_float(
    model: Path, val_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import verity.training.quantize as quantize

    real_gate = quantize.accuracy_gate
    calls: list[int] = []

    def gate_failing_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - wraps the real gate
        result = real_gate(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the all-INT8 model "loses accuracy"
            return {**result, "passed": False, "reasons": ["verdict agreement 98.00% < 99%"]}
        return result

    monkeypatch.setattr(quantize, "accuracy_gate", gate_failing_once)
    result = quantize_model(model, val_folder, calibration_images=8)
    assert len(calls) == 2 and result["passed"] and result["written"]
    expected = sensitive_nodes(_named_graph(model))
    assert result["float_nodes"] == expected and len(expected) == 3  # first conv, CAM conv, logits
    assert result["first_attempt"]["reasons"] == ["verdict agreement 98.00% < 99%"]
    int8_path = model.with_name("model.int8.onnx")
    assert expected[0] in _float_weight_convs(int8_path)
    engine = OnnxEngine(int8_path, provider="cpu")
    assert engine.card.quantization is not None and engine.card.quantization["float_nodes"] == expected

    calls.clear()  # `verity export --int8` says what happened and records it in card.json
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(["--int8", "--val-data", str(val_folder), "--calibration-images", "8"])
    lines, int8 = run_export_variants(args, model)
    assert "NOT kept: verdict agreement 98.00% < 99%" in lines[0] and "Retried with" in lines[0]
    assert "written to" in lines[1] and int8 is not None and int8["float_nodes"] == expected


def test_all_layers_are_int8_when_the_first_attempt_passes(model: Path, val_folder: Path) -> None:
    # A gate the all-INT8 attempt passes (see test_fp16_variant_and_export_cli_hook on its agreement).
    result = quantize_model(model, val_folder, calibration_images=8, min_agreement=0.5)
    assert result["written"] and result["float_nodes"] == [] and "first_attempt" not in result
    assert not _float_weight_convs(model.with_name("model.int8.onnx"))
