"""Verity's pipeline inside Triton's Python backend (the model.py files that `verity export --triton`
writes import their TritonPythonModel from here; inference/triton_repository.py says what the
repository holds): the whole pipeline (`TritonPythonModel`), and the two ends of the ensemble for whole
images, decoding (`DecodeModel`) and the verdict (`VerdictModel`).

Each request carries `image_bytes` BYTES [N]: N encoded files. Each is scored by the one pipeline
(inference.pipeline.score_bytes: decode by content, the spec's preprocessing, the tiling rule, the
card's novelty gate and thresholds), with the classifier's graph run by the classifier model through
business logic scripting (`RemoteEngine`). One file that cannot be decoded fails its whole request with
the decoder's message (Triton answers a request whole), never the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from verity.inference.card import ModelCard
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeError
from verity.inference.engine import RemoteEngine, predictions
from verity.inference.pipeline import Scored, Upload, judge, prepare, score_bytes
from verity.inference.tiling import ScoringInput, TilingOptions
from verity.inference.triton_repository import IMAGE_INPUT


def _utils() -> Any:
    import triton_python_backend_utils  # provided by Triton's Python backend (a stand-in in the tests)

    return triton_python_backend_utils


def _recognised_code(recognised: bool | None) -> int:
    return -1 if recognised is None else int(recognised)


class TritonPythonModel:
    """The Python backend's model class: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"])
        card = ModelCard.from_json((folder / "card.json").read_text(encoding="utf-8"))
        self.classifier = parameters["classifier"]
        self.input_name = parameters["classifier_input"]
        self.max_batch_size = int(parameters["classifier_max_batch_size"])
        outputs = parameters["classifier_outputs"].split(",")
        self.engine = RemoteEngine(card, folder, outputs, self._run_classifier)

    def _run_classifier(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """The classifier model on a batch, through business logic scripting, in requests no larger than
        its max_batch_size (a scan's tiles can be more)."""
        parts = [self._run_part(batch[start : start + self.max_batch_size], outputs)
                 for start in range(0, len(batch), self.max_batch_size)]  # fmt: skip
        return {name: np.concatenate([part[name] for part in parts]) for name in outputs}

    def _run_part(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        utils = _utils()
        request = utils.InferenceRequest(
            model_name=self.classifier,
            requested_output_names=outputs,
            inputs=[utils.Tensor(self.input_name, batch)],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"The classifier {self.classifier} failed: {response.error().message()}")
        return {name: utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    def _score_all(self, images: np.ndarray) -> list[Scored]:
        return [score_bytes(bytes(image), self.engine, with_cam=False) for image in images.reshape(-1)]

    def _response(self, scored: list[Scored]) -> Any:
        utils = _utils()
        tensors = [
            utils.Tensor("score", np.array([s.score for s in scored], np.float32)),
            utils.Tensor("verdict", np.array([s.verdict.encode() for s in scored], np.object_)),
            utils.Tensor("recognised", np.array([_recognised_code(s.recognised) for s in scored], np.int8)),
            utils.Tensor("reasons", np.array([",".join(s.reasons).encode() for s in scored], np.object_)),
            utils.Tensor("logits", np.array([s.output.logits for s in scored], np.float32).reshape(-1, 2)),
        ]
        return utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = _utils()
        responses = []
        for request in requests:
            images = utils.get_input_tensor_by_name(request, IMAGE_INPUT)
            try:
                if images is None:
                    raise ValueError(f"The request has no {IMAGE_INPUT} input (BYTES [N], encoded files).")
                responses.append(self._response(self._score_all(images.as_numpy())))
            except (DecodeError, ValueError) as error:
                failed = utils.TritonError(str(error))
                responses.append(utils.InferenceResponse(output_tensors=[], error=failed))
        return responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]


def _card(args: dict[str, str]) -> tuple[ModelCard, Path]:
    folder = Path(args["model_repository"]) / str(args["model_version"])
    return ModelCard.from_json((folder / "card.json").read_text(encoding="utf-8")), folder


def _colour_code(colour: bool | None) -> int:
    return -1 if colour is None else int(colour)


def _stated_modalities(decoded: list[ScoringInput]) -> np.ndarray:
    """Each file's DICOM Modality as a Triton string tensor (N x 1 bytes; empty for another format)."""
    return np.array([[(d.dicom_modality or "").encode()] for d in decoded], dtype=np.object_)


class DecodeModel:
    """The ensemble's first step: each encoded file to its model input, by the spec's preprocessing, with
    what the gate needs of the decoded image (its shorter side, whether it held colour, and the Modality
    a DICOM file states). A file that the tiling rule would score in tiles fails its request, naming the
    pipeline model that takes it."""

    def initialize(self, args: dict[str, str]) -> None:
        self.card, _ = _card(args)

    def _decode(self, data: bytes) -> ScoringInput:
        decoded = prepare(data, self.card.spec, TilingOptions(), DEFAULT_LIMITS).decoded
        if decoded.model_input is None:
            raise ValueError(f"This scan is scored in tiles: send it to the {self.card.name} model, not "
                             "the ensemble.")  # fmt: skip
        return decoded

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = _utils()
        responses = []
        for request in requests:
            try:
                files = utils.get_input_tensor_by_name(request, IMAGE_INPUT).as_numpy().reshape(-1)
                decoded = [self._decode(bytes(data)) for data in files]
                tensors = [
                    utils.Tensor("image", np.stack([d.model_input for d in decoded]).astype(np.float32)),
                    utils.Tensor("shorter_side", np.array([[d.shorter_side] for d in decoded], np.int32)),
                    utils.Tensor("colour", np.array([[_colour_code(d.colour)] for d in decoded], np.int8)),
                    utils.Tensor("dicom_modality", _stated_modalities(decoded)),
                ]
                responses.append(utils.InferenceResponse(output_tensors=tensors))
            except (DecodeError, ValueError) as error:
                failed = utils.TritonError(str(error))
                responses.append(utils.InferenceResponse(output_tensors=[], error=failed))
        return responses

    def finalize(self) -> None:
        pass


class VerdictModel:
    """The ensemble's last step: the classifier's outputs and the decoded image's facts, judged by the one
    verdict rule with the card's thresholds and novelty gate (inference.pipeline.judge)."""

    def initialize(self, args: dict[str, str]) -> None:
        card, folder = _card(args)

        def no_graph(batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
            raise RuntimeError("the verdict step runs no graph")

        self.engine = RemoteEngine(card, folder, ["logits", "embedding"], no_graph)

    def _judge(self, request: Any) -> list[Scored]:
        utils = _utils()

        def tensor(name: str) -> np.ndarray:
            return utils.get_input_tensor_by_name(request, name).as_numpy()

        outputs = {"logits": tensor("logits")}
        if utils.get_input_tensor_by_name(request, "embedding") is not None:  # a model with a gate has one
            outputs["embedding"] = tensor("embedding")
        images, sides, colours = tensor("image"), tensor("shorter_side"), tensor("colour")
        stated = tensor("dicom_modality")
        scored = []
        for index, prediction in enumerate(predictions(outputs, self.engine.temperature, with_cam=False)):
            colour = int(colours[index].reshape(-1)[0])
            modality = bytes(stated[index].reshape(-1)[0]).decode() or None
            decoded = ScoringInput(images[index], None, int(sides[index].reshape(-1)[0]), "tensor",
                                   None if colour < 0 else bool(colour), dicom_modality=modality)  # fmt: skip
            scored.append(judge(Upload("", decoded), prediction, self.engine))
        return scored

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = _utils()
        responses = []
        for request in requests:
            scored = self._judge(request)
            recognised = [[_recognised_code(s.recognised)] for s in scored]
            reasons = [[",".join(s.reasons).encode()] for s in scored]
            tensors = [
                utils.Tensor("score", np.array([[s.score] for s in scored], np.float32)),
                utils.Tensor("verdict", np.array([[s.verdict.encode()] for s in scored], np.object_)),
                utils.Tensor("recognised", np.array(recognised, np.int8)),
                utils.Tensor("reasons", np.array(reasons, np.object_)),
            ]
            responses.append(utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        pass
