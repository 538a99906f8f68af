"""ONNX export: metadata, dynamic batch, the parity gate, and the server engine reading the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch_models import CamNet, tiny_net

from benchmarks.models import tiny_spec
from verity.inference.card import ModelCard, to_jsonable
from verity.inference.engine import ModelLoadError, OnnxEngine, calibrated_scores, read_metadata
from verity.inference.spec import PreprocessSpec
from verity.training import export as export_module
from verity.training.calibrate import card_warnings
from verity.training.checkpoint import load_checkpoint
from verity.training.export import ExportError, ExportParityError, export_onnx

pytestmark = pytest.mark.torch


def tiny_card(spec: PreprocessSpec, temperature: float = 1.5) -> ModelCard:
    thresholds = {
        "alarm": 0.7,
        "clear": 0.3,
        "target_false_alarm_rate": 0.01,
        "target_miss_rate": 0.05,
        "val_false_alarm_rate": 0.0,
        "val_miss_rate": 0.0,
    }
    return ModelCard(
        name="tiny",
        version="0.0.1",
        modality=spec.modality,
        backbone="tinynet",
        spec=spec,
        thresholds=thresholds,
        temperature=temperature,
        metrics={"val": {"roc_auc": 0.9}},
        data_fingerprint="abc123",
        data_counts={"train": {"genuine": 4, "counterfeit": 4}},
        code_version="test",
        warnings=tuple(card_warnings(thresholds)),
    )


def trained_tiny(spec: PreprocessSpec, seed: int = 0) -> CamNet:
    torch.manual_seed(seed)
    model = tiny_net(spec)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.rand(8, spec.in_chans, spec.image_size, spec.image_size))
    return model


def torch_runs(model: CamNet, spec: PreprocessSpec) -> list[tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
    """(batch, torch logits, torch CAM shape) for random batches of 1 and 5 images, in eval mode."""
    model.eval()
    runs = []
    for batch_size in (1, 5):
        shape = (batch_size, spec.in_chans, spec.image_size, spec.image_size)
        batch = np.random.default_rng(batch_size).random(shape, dtype=np.float32)
        with torch.no_grad():
            logits, cam = model(torch.from_numpy(batch))
        runs.append((batch, logits.numpy(), tuple(cam.shape)))
    return runs


@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_export_metadata_dynamic_batch_and_parity(tmp_path: Path, modality: str) -> None:
    spec = tiny_spec(modality)
    model = trained_tiny(spec)
    card = tiny_card(spec)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, spec, card, path)
    assert result["path"] == str(path) and path.is_file()
    assert path.stat().st_mode & 0o777 == 0o644, "a server running as another user must read the model"
    assert result["opset"] >= 17
    assert result["max_abs_diff"] <= 1e-4
    assert model.training, "export must not change the caller's model mode"

    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))
    names = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    assert names == (["image"], ["logits", "cam"])
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name} has a fixed batch axis"
    props = {p.key: p.value for p in proto.metadata_props}
    assert PreprocessSpec.from_json(props["verity.spec"]) == spec
    assert json.loads(props["verity.card"])["name"] == "tiny"

    stored_spec, stored_card = read_metadata(path)
    assert stored_spec == spec and stored_card == card

    engine = OnnxEngine(path, warmup=False)
    for batch, logits, cam_shape in torch_runs(model, spec):
        predictions = engine.predict(batch, with_cam=True)
        assert len(predictions) == len(batch)
        onnx_logits = np.array([p.logits for p in predictions])
        assert np.abs(onnx_logits - logits).max() <= 1e-4
        expected_scores = calibrated_scores(logits, 1.5)
        assert np.allclose([p.score for p in predictions], expected_scores, atol=1e-5)
        assert predictions[0].cam.shape == cam_shape[2:]


def test_parity_gate_fails_loudly_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")
    real_check = export_module.check_parity

    def drifting_check(
        model: torch.nn.Module, onnx_path: Path, batches: list[np.ndarray]
    ) -> dict[str, float]:
        # Same inputs through a torch model whose weights drifted after export: a real mismatch.
        measured = real_check(model, onnx_path, batches)
        with torch.no_grad():
            model.classifier.bias.add_(1e-2)
        drifted = real_check(model, onnx_path, batches)
        assert measured["logits"] <= 1e-4
        return drifted

    monkeypatch.setattr(export_module, "check_parity", drifting_check)
    with pytest.raises(ExportParityError, match="parity gate failed"):
        export_onnx(trained_tiny(spec), spec, tiny_card(spec), path)
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_refuses_mismatched_normalization_and_bad_card(tmp_path: Path) -> None:
    spec = tiny_spec()
    other = PreprocessSpec.from_dict({**spec.to_dict(), "mean": (0.5, 0.5, 0.5)})
    with pytest.raises(ExportError, match="normalizes with mean"):
        export_onnx(trained_tiny(spec), other, tiny_card(other), tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="card says modality 'xray'"):
        export_onnx(trained_tiny(spec), spec, tiny_card(tiny_spec("xray")), tmp_path / "b.onnx")
    with pytest.raises(ExportError, match="parity sample"):
        export_onnx(
            trained_tiny(spec), spec, tiny_card(spec), tmp_path / "c.onnx", sample=np.zeros((1, 3, 8, 8))
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_engine_refuses_model_without_metadata(tmp_path: Path) -> None:
    spec = tiny_spec()
    model = trained_tiny(spec).eval()
    path = tmp_path / "bare.onnx"
    torch.onnx.export(
        model,
        (torch.rand(2, 3, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits", "cam"],
        opset_version=18,
    )
    with pytest.raises(ModelLoadError, match="lacks the metadata"):
        OnnxEngine(path, warmup=False)


def test_export_with_sample_and_dynamo_exporter(tmp_path: Path) -> None:
    spec = tiny_spec("xray")
    sample = np.random.default_rng(3).random((3, 1, 32, 32), dtype=np.float32)
    result = export_onnx(
        trained_tiny(spec), spec, tiny_card(spec), tmp_path / "m.onnx", sample=sample, exporter="dynamo"
    )
    assert result["exporter"] == "dynamo" and result["max_abs_diff"] <= 1e-4
    engine = OnnxEngine(tmp_path / "m.onnx", warmup=False)
    assert engine.run(sample)["logits"].shape == (3, 2)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    spec = tiny_spec()
    assert to_jsonable({"a": np.float32(0.5), "b": (np.int64(2), float("nan"))}) == {"a": 0.5, "b": [2, None]}

    model = trained_tiny(spec)
    path = tmp_path / "model.pt"
    torch.save(
        {
            "model_name": "tinynet",
            "spec": spec.to_dict(),
            "state_dict": model.state_dict(),
            "config": {"lr": 1e-3},
        },
        path,
    )
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_name"] == "tinynet"
    torch.save({"spec": spec.to_dict()}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="model_name, state_dict"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_card_states_threshold_intervals_and_validation_warnings() -> None:
    from verity.training.calibrate import choose_thresholds, sample_size_warnings

    spec = tiny_spec()
    # 100 genuine (fewer than the 300 a 1% false-alarm target needs), 200 counterfeit (enough for 5%).
    rng = np.random.default_rng(0)
    scores = np.r_[rng.beta(2, 6, 100), rng.beta(6, 2, 200)]
    thresholds = choose_thresholds(scores, np.r_[np.zeros(100), np.ones(200)], 0.01, 0.05)
    card = ModelCard(
        name="n", version="1", modality="photo", backbone="b", spec=spec, thresholds=thresholds,
        temperature=1.0, metrics={}, data_fingerprint="f", data_counts={}, code_version="c",
        warnings=tuple(card_warnings(thresholds)),
    )  # fmt: skip
    assert card.warnings == tuple(sample_size_warnings(100, 200, 0.01, 0.05))
    assert len(card.warnings) == 1 and "100 genuine" in card.warnings[0]
    for key in ("val_false_alarm_rate_ci", "val_miss_rate_ci", "n_val_genuine", "n_val_counterfeit"):
        assert key in card.thresholds
    assert ModelCard.from_json(card.to_json()) == card
    assert tiny_card(spec).warnings == ()  # hand-made thresholds without counts: nothing to judge


@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_registry_backbone_exports_with_parity(tmp_path: Path, modality: str) -> None:
    """The real model registry's default backbone, 64 px, through `verity export` (model.pt -> ONNX)."""
    from verity.training import export_cli
    from verity.training.models import build_for_spec

    spec = tiny_spec(modality, size=64)
    torch.manual_seed(0)
    model = build_for_spec("efficientnet_lite0", spec, pretrained=False)
    folder = tmp_path / "lite" / "1"
    folder.mkdir(parents=True)
    torch.save(
        {
            "model_name": "efficientnet_lite0",
            "spec": spec.to_dict(),
            "state_dict": model.state_dict(),
            "config": {},
            "card": tiny_card(spec).to_dict(),
        },
        folder / "model.pt",
    )
    assert export_cli.main(["--checkpoint", str(folder / "model.pt")]) == 0
    engine = OnnxEngine(folder / "model.onnx", warmup=False)
    for batch, logits, cam_shape in torch_runs(model, spec):
        outputs = engine.run(batch)
        assert np.abs(outputs["logits"] - logits).max() <= 1e-4
        assert outputs["cam"].shape == cam_shape
