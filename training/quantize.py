"""INT8 (static QDQ, per-channel) and fp16 variants of an exported model, behind an accuracy gate.

INT8 on CPU: onnxruntime's static quantization with QDQ nodes and per-channel weight scales, calibrated
by running the SERVING preprocessor (`inference.preprocess.load_for_model`) on validation images, so the
activation ranges are those the server will see. `quant_pre_process` (shape inference and graph
folding) runs first, as onnxruntime recommends. Dynamic quantization is deliberately absent: for CNNs on
this CPU it is 6 to 19 times slower than fp32.

The accuracy gate (training/quantize_gate.py) compares the INT8 model with the fp32 one on the
validation images. Only a passing model is written (as model.int8.onnx beside model.onnx, which OnnxEngine's
precision="auto" then picks on CPU); both figures go into its card metadata and into the returned dict
(for card.json) whether it passed or not.

fp16 for GPU: `export_fp16` converts weights and activations to float16 with float32 inputs/outputs.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.card import ModelCard
from verity.inference.decode_limits import DecodeError
from verity.inference.engine import METADATA_CARD_KEY, METADATA_SPEC_KEY, OnnxEngine
from verity.inference.preprocess import load_for_model
from verity.inference.private_files import PUBLIC_FILE_MODE, staged_file
from verity.inference.spec import PreprocessSpec
from verity.inference.vocabulary import LABELS
from verity.training.quantize_gate import AUC_TOLERANCE, MIN_AGREEMENT, QuantizationError, accuracy_gate

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
EXTRA_QUANTIZED_OPS = ("Add", "Mul", "GlobalAveragePool")


def _label_index(label: Any) -> int:
    if isinstance(label, str):
        if label not in LABELS:
            raise ValueError(f"Invalid label {label!r}. Only {', '.join(LABELS)} are supported.")
        return LABELS.index(label)
    if int(label) not in (0, 1):
        raise ValueError(f"Invalid label {label!r}: use 0 (genuine) or 1 (counterfeit).")
    return int(label)


def load_validation(
    data: str | Path | Sequence[tuple[str | Path | bytes, Any]],
    spec: PreprocessSpec,
    split: str = "val",
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validation inputs (N x C x S x S, through the serving preprocessor) and targets (0/1).

    `data` is a manifest (rows of `split`), a folder (DIR/<split>/<label>/ or DIR/<label>/), or a list
    of (image path or bytes, label) pairs. Images that fail to decode are skipped; none left is an error.
    """
    if isinstance(data, str | Path):
        from verity.training.eval_samples import load_samples

        samples = load_samples(data, split, spec.modality).samples
        pairs: list[tuple[Any, int]] = [(s.path, s.target) for s in samples]
    else:
        pairs = [(source, _label_index(label)) for source, label in data]
    if limit is not None and len(pairs) > limit:
        # An even spread over the set rather than its first rows (manifests are often sorted by class).
        pairs = [pairs[int(i)] for i in np.linspace(0, len(pairs) - 1, limit).round()]
    inputs, targets = [], []
    for source, target in pairs:
        try:
            inputs.append(load_for_model(source, spec))
        except (DecodeError, OSError):
            continue
        targets.append(target)
    if not inputs:
        raise QuantizationError(f"None of the {len(pairs)} validation images could be decoded.")
    return np.stack(inputs), np.asarray(targets, dtype=np.int64)


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed inputs, in small batches."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 8) -> None:
        self.input_name = input_name
        self.inputs = inputs
        self.batch_size = batch_size
        self._iterator: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.inputs), self.batch_size):
            yield {self.input_name: np.ascontiguousarray(self.inputs[start : start + self.batch_size])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = self._batches()


def _copy_metadata(source: Path, target: Path, card_update: dict[str, Any]) -> None:
    """Quantization tools drop metadata_props: restore spec and card (with the gate figures)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    card = replace(ModelCard.from_json(props[METADATA_CARD_KEY]), **card_update)
    proto = onnx.load(str(target))
    del proto.metadata_props[:]
    for key, value in ((METADATA_SPEC_KEY, props[METADATA_SPEC_KEY]), (METADATA_CARD_KEY, card.to_json())):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target), save_as_external_data=False)


def quantize_static_model(
    source: Path,
    target: Path,
    inputs: np.ndarray,
    per_channel: bool = True,
    method: str = "minmax",
    keep_sensitive_float: bool = False,
) -> list[str]:
    """Static QDQ quantization of `source` into `target`, calibrated on `inputs` (no gate: see
    `quantize_model`). With `keep_sensitive_float`, the `sensitive_nodes` stay in float; returns the
    names of the nodes left in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="verity-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        proto = onnx.load(str(prepared))
        _name_nodes(proto.graph)  # exclusions are by node name; hand-built graphs may have none
        onnx.save(proto, str(prepared))
        float_nodes = sensitive_nodes(proto.graph) if keep_sensitive_float else []
        engine_input = OnnxEngine(source, provider="cpu", warmup=False).input_name
        quantize_static(
            str(prepared),
            str(target),
            _Reader(engine_input, inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # uint8 activations with int8 weights (U8S8): the combination onnxruntime's CPU kernels fuse
            # completely (every Conv to QLinearConv, every residual Add to QLinearAdd) and run on VNNI.
            # int8 activations left a third of the convs in float here, with no gain over fp32.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            # Residual Adds (and Mul, global pooling) are not in the QDQ registry by default; quantized,
            # their neighbours keep int8 tensors end to end (measured 1.6x faster than without them).
            op_types_to_quantize=sorted({*QDQRegistry, *EXTRA_QUANTIZED_OPS}),
            # Symmetric weights (zero point 0) are what the int8 GEMM kernels expect; activations keep a
            # zero point so the uint8 range covers ReLU6 outputs fully.
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            nodes_to_exclude=float_nodes,
        )
    return float_nodes


def _name_nodes(graph: Any) -> None:
    taken = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def sensitive_nodes(graph: Any) -> list[str]:
    """The nodes of an ONNX graph that INT8 hurts most, kept in float when full quantization fails its
    gate: the first convolution (it sees the raw image, whose fine intensity steps matter most for
    X-ray) and the nodes that write the graph's outputs (the classifier and the CAM). About 3% of the
    compute of efficientnet_lite0."""
    outputs = {output.name for output in graph.output}
    first_conv = next((node.name for node in graph.node if node.op_type == "Conv"), None)
    writers = [node.name for node in graph.node if outputs & set(node.output)]
    return [name for name in dict.fromkeys([first_conv, *writers]) if name]


def quantize_model(
    onnx_path: str | Path,
    data: str | Path | Sequence[tuple[str | Path | bytes, Any]],
    out_path: str | Path | None = None,
    *,
    split: str = "val",
    calibration_images: int = 200,
    gate_images: int | None = None,
    auc_tolerance: float = AUC_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
    per_channel: bool = True,
    method: str = "minmax",
) -> dict[str, Any]:
    """Quantizes model.onnx to INT8 (static QDQ) and writes `out_path` only if the accuracy gate passes.

    `data`: validation images (see `load_validation`). Calibration uses up to `calibration_images` of
    them; the gate uses all (or `gate_images`). When the all-INT8 model fails the gate on accuracy, a
    second one keeps `sensitive_nodes` in float. Returns the gate figures of the last attempt (with
    "float_nodes", and "first_attempt" when there were two) plus "written" and "path".
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Invalid method {method!r}. Only {', '.join(CALIBRATION_METHODS)} are supported.")
    source = Path(onnx_path)
    target = Path(out_path) if out_path is not None else source.with_name("model.int8.onnx")
    reference = OnnxEngine(source, provider="cpu", warmup=False)
    inputs, targets = load_validation(data, reference.spec, split, gate_images)
    picks = np.linspace(0, len(inputs) - 1, min(calibration_images, len(inputs))).round().astype(int)
    calibration = inputs[picks]
    target.parent.mkdir(parents=True, exist_ok=True)
    settings = {"format": "QDQ", "per_channel": per_channel, "method": method,
                "calibration_images": int(len(calibration))}
    # Everything in INT8 first (fastest); if that fails the gate, once more with the most sensitive
    # layers in float, which costs a few percent of the speed and usually recovers the accuracy.
    attempts: list[dict[str, Any]] = []
    for keep_sensitive_float in (False, True):
        gate = _quantize_and_gate(
            source, target, reference, inputs, targets, calibration,
            settings, keep_sensitive_float, auc_tolerance, min_agreement,
        )
        attempts.append(gate)
        if gate["passed"] or not _accuracy_failure(gate):
            break
    result = dict(attempts[-1])
    if len(attempts) > 1:
        result["first_attempt"] = {k: attempts[0][k] for k in ("reasons", "auc_int8", "verdict_agreement")}
    return result


def _accuracy_failure(gate: dict[str, Any]) -> bool:
    """A gate that failed on accuracy (worth a second try), not for want of both classes."""
    return gate["auc_drop"] is not None


def _quantize_and_gate(
    source: Path,
    target: Path,
    reference: OnnxEngine,
    inputs: np.ndarray,
    targets: np.ndarray,
    calibration: np.ndarray,
    settings: dict[str, Any],
    keep_sensitive_float: bool,
    auc_tolerance: float,
    min_agreement: float,
) -> dict[str, Any]:
    """One quantization into a temporary file, gated; published to `target` only if it passes."""
    with staged_file(target, PUBLIC_FILE_MODE) as staged:
        temporary_path = staged.path
        try:
            float_nodes = quantize_static_model(
                source, temporary_path, calibration, settings["per_channel"], settings["method"],
                keep_sensitive_float,
            )
        except Exception as error:  # onnxruntime raises assorted types for graphs it cannot quantize
            raise QuantizationError(f"onnxruntime could not quantize {source}: {error}") from error
        gate = accuracy_gate(
            reference,
            OnnxEngine(temporary_path, provider="cpu", warmup=False),
            inputs,
            targets,
            auc_tolerance,
            min_agreement,
        )
        settings = {**settings, "float_nodes": float_nodes}
        result = {**gate, **settings, "written": False, "path": None}
        if gate["passed"]:
            card_update = {"precision": "int8", "int8_gate": gate, "quantization": settings}
            _copy_metadata(source, temporary_path, card_update)
            staged.publish()
            result.update(written=True, path=str(target), size_bytes=target.stat().st_size)
    return result


def export_fp16(onnx_path: str | Path, out_path: str | Path | None = None) -> Path:
    """The fp16 variant for GPU serving (model.fp16.onnx): float16 weights and compute, float32 I/O.

    Not gated here: fp16 keeps about 3 significant digits, and on CPU onnxruntime would run it slower
    than fp32, so its check belongs on a GPU host (`benchmarks/gpu_bench.py`: scores against CPU fp32).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = Path(onnx_path)
    target = Path(out_path) if out_path is not None else source.with_name("model.fp16.onnx")
    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    converted.metadata_props.extend(model.metadata_props)
    card = next((p for p in converted.metadata_props if p.key == METADATA_CARD_KEY), None)
    if card is not None:
        card.value = replace(ModelCard.from_json(card.value), precision="fp16").to_json()
    onnx.save(converted, str(target), save_as_external_data=False)
    return target


# -- hooks for `verity export` ------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --int8/--fp16 and their options to the `verity export` parser."""
    parser.add_argument(
        "--int8", action="store_true", help="also write model.int8.onnx if it passes its accuracy gate"
    )
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPU serving")
    parser.add_argument(
        "--val-data", help="validation images for --int8: a manifest (its val split) or a labelled folder"
    )
    parser.add_argument("--calibration-images", type=int, default=200)
    parser.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="how --int8 chooses activation ranges; try percentile or entropy when minmax fails the gate",
    )


def run_export_variants(args: argparse.Namespace, onnx_path: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Writes the variants asked for. Returns the lines to print and the INT8 gate's record for card.json
    (None without --int8). Raises ValueError when --int8 lacks --val-data."""
    lines, int8_gate = [], None
    if getattr(args, "int8", False):
        if not args.val_data:
            raise ValueError("--int8 needs --val-data (a manifest or labelled folder of validation images).")
        result = quantize_model(
            onnx_path,
            args.val_data,
            calibration_images=args.calibration_images,
            method=getattr(args, "calibration_method", "minmax"),
        )
        int8_gate = {k: v for k, v in result.items() if k != "path"}
        reasons = "; ".join(result["reasons"])
        verdict = f"written to {result['path']}" if result["written"] else f"NOT written: {reasons}"
        stale = onnx_path.with_name("model.int8.onnx")
        if not result["written"] and stale.exists():
            # An INT8 file of an earlier export no longer matches this model.onnx (outputs, card, gate):
            # left there, the server's precision=auto would serve it instead.
            stale.unlink()
            verdict += f"; removed {stale}, the INT8 variant of the previous export"
        if "first_attempt" in result:
            first = result["first_attempt"]
            lines.append(
                f"int8, every layer: verdict agreement {first['verdict_agreement']:.2%}, AUC "
                f"{first['auc_int8']}; NOT kept: {'; '.join(first['reasons'])}. Retried with "
                f"{', '.join(result['float_nodes'])} in float."
            )
        lines.append(
            f"int8: AUC {result['auc_fp32']} -> {result['auc_int8']}, verdict agreement "
            f"{result['verdict_agreement']:.2%} on {result['images']} images; {verdict}"
        )
    if getattr(args, "fp16", False):
        lines.append(f"fp16: written to {export_fp16(onnx_path)}")
    return lines, int8_gate
