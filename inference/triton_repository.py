"""A Triton Inference Server model repository for one Verity model (`verity export --triton DIR`).

Two models, self-describing:

    DIR/<name>-classifier/config.pbtxt   the ONNX classifier (onnxruntime backend): `image` FP32
                          1/model.onnx   [-1, C, S, S] in, its graph outputs out, dynamic batching
    DIR/<name>/config.pbtxt              Verity's pipeline (Python backend): `image_bytes` BYTES [-1]
               1/model.py                in (encoded files: JPEG, PNG, TIFF, DICOM/DICOS); score,
               1/card.json (+ the gate)  verdict, recognised, reasons, logits out

The Python model decodes with Verity's own decoder and the preprocessing spec that travels with the model,
tiles a large scan by the one tiling rule, has the classifier score the inputs through Triton's business
logic scripting (so they join the classifier's dynamic batches, on whatever device Triton gives it), and
applies the card's thresholds and novelty gate by the one verdict rule (inference.pipeline). The spec, the
card's name, version, thresholds and temperature are in each config's `parameters` too.

Why calls rather than an ensemble of (decode -> classifier -> verdict): an ensemble's steps pass tensors
of one shape per request, but a tiled scan is one request and many model inputs, and the open-set gate
needs the decoded image (its size, colour and profile) beside the model's embedding. The Python model
holds both, so it is the one entry point; the classifier stays a model of its own that Triton batches.

Triton's Python backend must have Verity's inference package (`pip install verity`, no torch) in the
environment it runs model.py in. Nothing here writes an audit log: a caller of this repository that must
keep Verity's guarantee (every verdict recorded before it is returned) has to write it (README, "Scaling
out").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from verity.inference.artifacts import resolve_model
from verity.inference.bank import BANK_FILE
from verity.inference.card import ModelCard
from verity.inference.engine import read_metadata
from verity.inference.input_profile import PROFILE_FILE

CLASSIFIER_SUFFIX = "-classifier"
IMAGE_INPUT = "image_bytes"
# The Python model's outputs: name, Triton type, dims (-1: one per image sent).
PIPELINE_OUTPUTS = (
    ("score", "TYPE_FP32", [-1]),
    ("verdict", "TYPE_STRING", [-1]),
    ("recognised", "TYPE_INT8", [-1]),  # 1 recognised, 0 not, -1 a model without a gate
    ("reasons", "TYPE_STRING", [-1]),  # comma-separated, as the audit log keeps them
    ("logits", "TYPE_FP32", [-1, 2]),
)
MODEL_PY = '''"""Verity's pipeline as a Triton Python-backend model (the code: inference.triton_backend)."""

from verity.inference.triton_backend import TritonPythonModel  # noqa: F401 - Triton looks for this name
'''


def _parameters(values: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
        for key, value in values.items()
    )


def _tensor(kind: str, name: str, data_type: str, dims: list[int]) -> str:
    return f'{kind} [ {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }} ]'


def _describing(card: ModelCard) -> dict[str, str]:
    """What makes the repository self-describing: the spec, and the card's identity and decision."""
    return {
        "verity_spec": card.spec.to_json(),
        "verity_model": f"{card.name}/{card.version}",
        "verity_thresholds": json.dumps({key: card.thresholds[key] for key in ("alarm", "clear")}),
        "verity_temperature": str(card.temperature),
    }


def classifier_config(card: ModelCard, outputs: dict[str, list[int]], input_name: str, max_batch_size: int,
                      queue_delay_us: int, instances: int) -> str:  # fmt: skip
    """config.pbtxt of the ONNX classifier: dynamic batching, the batch dimension implicit (-1)."""
    spec = card.spec
    lines = [
        f'name: "{card.name}{CLASSIFIER_SUFFIX}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        _tensor("input", input_name, "TYPE_FP32", [spec.in_chans, spec.image_size, spec.image_size]),
        *(_tensor("output", name, "TYPE_FP32", dims) for name, dims in outputs.items()),
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        f"instance_group [ {{ count: {instances} kind: KIND_AUTO }} ]",
        _parameters(_describing(card)),
    ]
    return "\n".join(lines) + "\n"


def pipeline_config(
    card: ModelCard, classifier_outputs: list[str], input_name: str, max_batch_size: int
) -> str:
    """config.pbtxt of the Python model: N encoded images in, one result each out."""
    lines = [
        f'name: "{card.name}"',
        'backend: "python"',
        "max_batch_size: 0",
        _tensor("input", IMAGE_INPUT, "TYPE_STRING", [-1]),
        *(_tensor("output", name, data_type, dims) for name, data_type, dims in PIPELINE_OUTPUTS),
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        _parameters({
            **_describing(card),
            "classifier": f"{card.name}{CLASSIFIER_SUFFIX}",
            "classifier_input": input_name,
            "classifier_outputs": ",".join(classifier_outputs),
            "classifier_max_batch_size": str(max_batch_size),  # a scan's tiles go in batches this large
        }),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _graph_outputs(onnx: Path) -> tuple[str, dict[str, list[int]]]:
    """The graph's input name and each output's dims after the batch dimension (-1 where dynamic)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    outputs = {
        output.name: [dim if isinstance(dim, int) else -1 for dim in output.shape[1:]]
        for output in session.get_outputs()
    }
    return session.get_inputs()[0].name, outputs


def write_repository(model: Path, out: Path, *, max_batch_size: int = 8, queue_delay_us: int = 4000,
                     instances: int = 1) -> list[Path]:  # fmt: skip
    """Writes the two models of the module docstring for `model` (a model.onnx, its version folder or a
    model folder) under `out`; returns the files written."""
    onnx = resolve_model(model)
    _, card = read_metadata(onnx)
    input_name, outputs = _graph_outputs(onnx)
    classifier = out / f"{card.name}{CLASSIFIER_SUFFIX}"
    pipeline = out / card.name
    (classifier / "1").mkdir(parents=True, exist_ok=True)
    (pipeline / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx, classifier / "1" / "model.onnx")
    written = [classifier / "1" / "model.onnx", classifier / "config.pbtxt", pipeline / "config.pbtxt",
               pipeline / "1" / "model.py", pipeline / "1" / "card.json"]  # fmt: skip
    config = classifier_config(card, outputs, input_name, max_batch_size, queue_delay_us, instances)
    (classifier / "config.pbtxt").write_text(config, encoding="utf-8")
    # The pipeline asks for what scoring uses; the patch maps serve the product reference check, which a
    # request to this repository cannot name.
    wanted = [name for name in outputs if name != "patches"]
    config = pipeline_config(card, wanted, input_name, max_batch_size)
    (pipeline / "config.pbtxt").write_text(config, encoding="utf-8")
    (pipeline / "1" / "model.py").write_text(MODEL_PY, encoding="utf-8")
    (pipeline / "1" / "card.json").write_text(card.to_json(indent=2) + "\n", encoding="utf-8")
    for name in _gate_files(card):  # the novelty gate's bank and profiles, which the card names
        shutil.copyfile(onnx.parent / name, pipeline / "1" / name)
        written.append(pipeline / "1" / name)
    return written


def _gate_files(card: ModelCard) -> list[str]:
    record = card.novelty
    if record is None:
        return []
    files = [str(record.get("bank_file", BANK_FILE))]
    if record.get("profile") is not None:
        files.append(str(record["profile"].get("file", PROFILE_FILE)))
    return files
