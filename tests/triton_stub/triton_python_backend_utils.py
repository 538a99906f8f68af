"""A small stand-in for Triton's `triton_python_backend_utils`, enough to run a Python-backend model's
`execute` in a test: tensors, requests, responses, errors, and business logic scripting calls
(`InferenceRequest.exec`) that run a repository's ONNX model with onnxruntime, as Triton's onnxruntime
backend would, refusing a batch over the model's max_batch_size as Triton does.

Set REPOSITORY to the repository folder before a model calls another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REPOSITORY: Path | None = None
_SESSIONS: dict[str, tuple[Any, int]] = {}


class TritonError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self._tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors


def _session(model_name: str) -> tuple[Any, int]:
    """onnxruntime on <REPOSITORY>/<model>/1/model.onnx, and the max_batch_size its config.pbtxt gives."""
    if model_name not in _SESSIONS:
        import onnxruntime as ort
        from google.protobuf import text_format
        from triton_schema import model_config_pb2

        assert REPOSITORY is not None, "set triton_python_backend_utils.REPOSITORY first"
        folder = REPOSITORY / model_name
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2().ModelConfig())
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        _SESSIONS[model_name] = (session, config.max_batch_size)
    return _SESSIONS[model_name]


class InferenceRequest:
    def __init__(self, model_name: str = "", requested_output_names: list[str] | None = None,
                 inputs: list[Tensor] | None = None) -> None:  # fmt: skip
        self.model_name = model_name
        self._outputs, self._inputs = list(requested_output_names or []), inputs or []

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def exec(self) -> InferenceResponse:
        session, max_batch_size = _session(self.model_name)
        feeds = {tensor.name(): tensor.as_numpy() for tensor in self._inputs}
        batch = len(next(iter(feeds.values())))
        if batch > max_batch_size:
            message = f"inference request batch-size must be <= {max_batch_size} for '{self.model_name}'"
            return InferenceResponse([], TritonError(message))
        outputs = session.run(self._outputs, feeds)
        tensors = [Tensor(name, value) for name, value in zip(self._outputs, outputs, strict=True)]
        return InferenceResponse(tensors)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((tensor for tensor in request.inputs() if tensor.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((tensor for tensor in response.output_tensors() if tensor.name() == name), None)
