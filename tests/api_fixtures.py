"""Helpers for the API tests: tiny real ONNX models with Verity metadata, images, and a live server.

The models are built directly with onnx.helper (no torch needed, built in milliseconds): Normalize ->
3x3 conv -> ReLU -> 4x4 average pool -> 1x1 conv (the classifier, giving the CAM) -> global average
pool (the logits). Brighter images score as more counterfeit, so tests can steer the verdict.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from verity.inference.spec import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def build_model_bytes(
    name: str,
    version: str,
    modality: str = "photo",
    gain: float = 6.0,
    alarm: float = 0.6,
    clear: float = 0.4,
    image_size: int = IMAGE_SIZE,
) -> bytes:
    """A valid Verity ONNX model: input "image" [N,C,S,S], outputs "logits" [N,2] and "cam" [N,2,S/4,S/4]."""
    channels = 3 if modality == "photo" else 1
    spec = PreprocessSpec(
        modality=modality,
        in_chans=channels,
        image_size=image_size,
        resize_mode="stretch" if modality == "photo" else "letterbox",
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
    )
    conv1 = np.zeros((4, channels, 3, 3), np.float32)
    conv1[:, :, 1, 1] = 1.0 / channels  # each feature: the mean intensity, shifted by its bias
    conv1_bias = np.array([0.0, 0.5, -0.5, 0.25], np.float32)
    classifier = np.zeros((2, 4, 1, 1), np.float32)
    classifier[1, 0, 0, 0], classifier[0, 0, 0, 0] = gain / 2, -gain / 2
    classifier_bias = np.array([gain / 4, -gain / 4], np.float32)  # mid-grey lands near 0.5
    initializers = [
        numpy_helper.from_array(np.full((1, channels, 1, 1), 0.5, np.float32), "mean"),
        numpy_helper.from_array(np.full((1, channels, 1, 1), 0.5, np.float32), "std"),
        numpy_helper.from_array(conv1, "w1"),
        numpy_helper.from_array(conv1_bias, "b1"),
        numpy_helper.from_array(classifier, "w2"),
        numpy_helper.from_array(classifier_bias, "b2"),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalized"]),
        helper.make_node("Conv", ["normalized", "w1", "b1"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("AveragePool", ["features"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "w2", "b2"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["logits"]),
    ]
    grid = image_size // 4
    graph = helper.make_graph(
        nodes,
        "verity_tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, image_size, image_size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 2, grid, grid]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    card = {
        "name": name,
        "version": version,
        "modality": modality,
        "backbone": "tiny-test",
        "created": "2026-11-29T00:00:00+00:00",
        "data": {"fingerprint": "test", "counts": {}},
        "metrics": {"val": {"roc_auc": 1.0}},
        "calibration": {"temperature": 1.0},
        "thresholds": {
            "alarm": alarm,
            "clear": clear,
            "target_false_alarm_rate": 0.01,
            "target_miss_rate": 0.05,
        },
        "spec": spec.to_dict(),
        "code_version": "test",
    }
    onnx.helper.set_model_props(model, {"verity.spec": spec.to_json(), "verity.card": json.dumps(card)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_model(models_dir: Path, name: str, version: str, modality: str = "photo", **kwargs) -> Path:
    """Writes <models_dir>/<name>/<version>/model.onnx and returns its path."""
    path = Path(models_dir) / name / version / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_model_bytes(name, version, modality, **kwargs))
    return path


def make_models_dir(root: Path) -> Path:
    """photo-test 1 and 2 (2 is the default) and xray-test 1."""
    models = root / "models"
    write_model(models, "photo-test", "1", "photo")
    write_model(models, "photo-test", "2", "photo")
    write_model(models, "xray-test", "1", "xray")
    return models


def image_bytes(
    value: int = 128, size: tuple[int, int] = (48, 40), fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """A flat image of one intensity: 0 scores genuine, 255 counterfeit with the tiny models."""
    buffer = io.BytesIO()
    color = value if mode in ("L", "I;16") else (value,) * len(mode)
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """`verity serve` in a subprocess on 127.0.0.1 and a free port, with the environment given."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        self.args = args or []
        self.process: subprocess.Popen | None = None
        self.log_path = Path(env.get("VERITY_AUDIT_DB", "/tmp/verity")).with_suffix(f".{self.port}.log")

    def start(self, timeout: float = 60.0) -> LiveServer:
        import httpx

        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "verity",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
