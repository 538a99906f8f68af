"""A Triton Inference Server model repository for one Verity model (`verity export --triton DIR`).

Five models, self-describing:

    DIR/<name>-classifier/config.pbtxt   the ONNX classifier (onnxruntime backend): `image` FP32
                          1/model.onnx   [-1, C, S, S] in, its graph outputs out, dynamic batching
    DIR/<name>/config.pbtxt              Verity's pipeline (Python backend): `image_bytes` BYTES [-1]
               1/model.py                in (encoded files: JPEG, PNG, TIFF, DICOM/DICOS); score,
               1/card.json (+ the gate)  verdict, recognised, reasons, logits out. Takes every image.
    DIR/<name>-ensemble/config.pbtxt     for whole images: <name>-decode (Python) -> <name>-classifier
    DIR/<name>-decode/..., <name>-verdict/...  -> <name>-verdict (Python); `image_bytes` BYTES [1] a
                                         batch item in, score, verdict, recognised, reasons out

The Python model decodes with Verity's own decoder and the preprocessing spec that travels with the model,
tiles a large scan by the one tiling rule, has the classifier score the inputs through Triton's business
logic scripting (so they join the classifier's dynamic batches, on whatever device Triton gives it), and
applies the card's thresholds and novelty gate by the one verdict rule (inference.pipeline). The spec, the
card's name, version, thresholds and temperature are in each config's `parameters` too.

Why two entry points: an ensemble's steps pass tensors of one shape per request, so the ensemble takes
images scored whole (the decode step refuses a scan the tiling rule would tile, naming `<name>`), while
`<name>` calls the classifier for a scan's many tiles itself. Both judge by the one verdict rule; the
ensemble's verdict step gets the model input too, for the gate's input profile.

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
MODEL_PY = '''"""Verity's {what} as a Triton Python-backend model (the code: inference.triton_backend)."""

from verity.inference.triton_backend import {cls} as TritonPythonModel  # noqa: F401 - the name Triton wants
'''
# Each Python-backend model's class in inference.triton_backend, by the suffix of its name.
PYTHON_MODELS = {"": ("pipeline", "TritonPythonModel"), "-decode": ("decoding", "DecodeModel"),
                 "-verdict": ("verdict", "VerdictModel")}  # fmt: skip


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


def _python_config(name: str, max_batch_size: int, inputs: list[tuple[str, str, list[int]]],
                   outputs: list[tuple[str, str, list[int]]], card: ModelCard) -> str:  # fmt: skip
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
             *(_tensor("input", *spec) for spec in inputs), *(_tensor("output", *spec) for spec in outputs),
             "instance_group [ { count: 1 kind: KIND_CPU } ]", _parameters(_describing(card))]  # fmt: skip
    return "\n".join(lines) + "\n"


def ensemble_configs(
    card: ModelCard, input_name: str, embedding: int | None, max_batch_size: int
) -> dict[str, str]:
    """The decode and verdict steps and the ensemble joining them around the classifier, by model name."""
    spec, name = card.spec, card.name
    image = ("image", "TYPE_FP32", [spec.in_chans, spec.image_size, spec.image_size])
    facts = [("shorter_side", "TYPE_INT32", [1]), ("colour", "TYPE_INT8", [1]),  # colour: 1, 0, -1 unknown
             ("dicom_modality", "TYPE_STRING", [1])]  # fmt: skip
    graph = [("logits", "TYPE_FP32", [2])] + ([("embedding", "TYPE_FP32", [embedding])] if embedding else [])
    answers = [("score", "TYPE_FP32", [1]), ("verdict", "TYPE_STRING", [1]), ("recognised", "TYPE_INT8", [1]),
               ("reasons", "TYPE_STRING", [1])]  # fmt: skip
    files = [(IMAGE_INPUT, "TYPE_STRING", [1])]

    def step(model: str, inputs: dict[str, str], outputs: list[str]) -> str:
        maps = [f'input_map {{ key: "{key}" value: "{value}" }}' for key, value in inputs.items()]
        maps += [f'output_map {{ key: "{key}" value: "{key}" }}' for key in outputs]
        return f'{{ model_name: "{model}" model_version: -1 {" ".join(maps)} }}'

    decoded = ["image", *(fact[0] for fact in facts)]
    graph_names = [output[0] for output in graph]
    steps = [
        step(f"{name}-decode", {IMAGE_INPUT: IMAGE_INPUT}, decoded),
        step(f"{name}{CLASSIFIER_SUFFIX}", {input_name: "image"}, graph_names),
        step(f"{name}-verdict", {key: key for key in graph_names + decoded}, [a[0] for a in answers]),
    ]
    ensemble = [f'name: "{name}-ensemble"', 'platform: "ensemble"', f"max_batch_size: {max_batch_size}",
                *(_tensor("input", *spec) for spec in files), *(_tensor("output", *spec) for spec in answers),
                f"ensemble_scheduling {{ step [ {', '.join(steps)} ] }}",
                _parameters(_describing(card))]  # fmt: skip
    return {
        f"{name}-decode": _python_config(f"{name}-decode", max_batch_size, files, [image, *facts], card),
        f"{name}-verdict": _python_config(f"{name}-verdict", max_batch_size, [*graph, image, *facts], answers,
                                          card),  # fmt: skip
        f"{name}-ensemble": "\n".join(ensemble) + "\n",
    }


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
    written = [classifier / "1" / "model.onnx", classifier / "config.pbtxt", pipeline / "config.pbtxt"]
    config = classifier_config(card, outputs, input_name, max_batch_size, queue_delay_us, instances)
    (classifier / "config.pbtxt").write_text(config, encoding="utf-8")
    # The pipeline asks for what scoring uses; the patch maps serve the product reference check, which a
    # request to this repository cannot name.
    wanted = [name for name in outputs if name != "patches"]
    config = pipeline_config(card, wanted, input_name, max_batch_size)
    (pipeline / "config.pbtxt").write_text(config, encoding="utf-8")
    embedding = outputs["embedding"][0] if "embedding" in outputs else None
    for name, text in ensemble_configs(card, input_name, embedding, max_batch_size).items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text, encoding="utf-8")
        written.append(out / name / "config.pbtxt")
    for suffix, (what, cls) in PYTHON_MODELS.items():
        folder = out / f"{card.name}{suffix}" / "1"
        (folder / "model.py").write_text(MODEL_PY.format(what=what, cls=cls), encoding="utf-8")
        (folder / "card.json").write_text(card.to_json(indent=2) + "\n", encoding="utf-8")
        written += [folder / "model.py", folder / "card.json"]
        for gate_file in _gate_files(card):  # the novelty gate's bank and profiles, which the card names
            shutil.copyfile(onnx.parent / gate_file, folder / gate_file)
            written.append(folder / gate_file)
    return sorted(set(written))


def _gate_files(card: ModelCard) -> list[str]:
    record = card.novelty
    if record is None:
        return []
    files = [str(record.get("bank_file", BANK_FILE))]
    if record.get("profile") is not None:
        files.append(str(record["profile"].get("file", PROFILE_FILE)))
    return files
