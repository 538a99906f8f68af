"""The embedding output (issue 14 item 1): VerityNet's pooled, L2-normalised features from the same pass,
exported as the ONNX `embedding` output behind the parity gate and the INT8 gate, served by the engine;
models without it serve as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch_models import tiny_features, tiny_net

from benchmarks.models import tiny_onnx, tiny_spec
from verity.inference.card import CardError, ModelCard
from verity.inference.engine import OnnxEngine
from verity.inference.spec import PreprocessSpec
from verity.training import export as export_module
from verity.training.export import ExportError, ExportParityError, export_onnx
from verity.training.models import VerityNet
from verity.training.quantize import quantize_model
from verity.training.quantize_gate import EMBEDDING_MIN_COSINE, accuracy_gate, embedding_agreement

WIDTH = 8


def tiny_card(spec: PreprocessSpec, embedding_dim: int | None = None) -> ModelCard:
    thresholds = {"alarm": 0.7, "clear": 0.3}
    return ModelCard(
        name="tiny", version="0.0.1", modality=spec.modality, backbone="tiny", spec=spec,
        thresholds=thresholds, temperature=1.0, metrics={"val": {}}, data_fingerprint="abc",
        data_counts={}, code_version="test", warnings=(), embedding_dim=embedding_dim,
    )  # fmt: skip


def tiny_verity_net(spec: PreprocessSpec, seed: int = 0) -> VerityNet:
    """A VerityNet on two small convolutions, BatchNorm statistics warmed on random images."""
    torch.manual_seed(seed)
    model = VerityNet(tiny_features(spec.in_chans, WIDTH), WIDTH, 2, tuple(spec.mean), tuple(spec.std))
    with torch.no_grad():
        model(torch.rand(8, spec.in_chans, spec.image_size, spec.image_size))
    return model.eval()


def batch(spec: PreprocessSpec, size: int = 3, seed: int = 1) -> np.ndarray:
    shape = (size, spec.in_chans, spec.image_size, spec.image_size)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.torch
def test_forward_keeps_two_outputs_and_adds_the_embedding_on_request() -> None:
    spec = tiny_spec()
    model, images = tiny_verity_net(spec), torch.from_numpy(batch(spec))
    with torch.no_grad():
        logits, cam = model(images)
        model.embedding_output = True
        logits3, cam3, embedding = model(images)
        pooled = model.features(model.normalize(images)).mean(dim=(2, 3))
    assert torch.equal(logits, logits3) and torch.equal(cam, cam3)
    assert embedding.shape == (3, WIDTH) and model.embedding_dim == WIDTH
    torch.testing.assert_close(embedding, pooled / pooled.norm(dim=1, keepdim=True))
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))


@pytest.mark.torch
def test_export_has_the_embedding_output_within_the_parity_gate(tmp_path: Path) -> None:
    spec = tiny_spec()
    model = tiny_verity_net(spec)
    result = export_onnx(model, spec, tiny_card(spec), tmp_path / "model.onnx")
    assert not model.embedding_output  # the caller's model is untouched: training keeps two outputs
    assert result["embedding_dim"] == WIDTH
    assert result["max_abs_diff_embedding"] <= export_module.PARITY_TOLERANCE["embedding"]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "cam", "embedding"]
    dims = graph.output[2].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_value == WIDTH

    engine = OnnxEngine(tmp_path / "model.onnx", provider="cpu")
    assert engine.card.embedding_dim == WIDTH
    images = batch(spec, 5)
    predictions = engine.predict(images)
    embeddings = np.stack([p.embedding for p in predictions if p.embedding is not None])
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, WIDTH)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    model.embedding_output = True
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
    np.testing.assert_allclose(embeddings, expected[2].numpy(), atol=1e-5)
    np.testing.assert_allclose([p.logits for p in predictions], expected[0].numpy(), atol=1e-4)


@pytest.mark.torch
def test_embedding_drift_fails_the_gate_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_check = export_module.check_parity

    def drifting_check(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - wraps the real check
        return {**real_check(*args, **kwargs), "embedding_relative": 1e-3}

    monkeypatch.setattr(export_module, "check_parity", drifting_check)
    spec = tiny_spec()
    with pytest.raises(ExportParityError, match="embedding differ"):
        export_onnx(tiny_verity_net(spec), spec, tiny_card(spec), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.torch
def test_a_card_stating_another_width_is_refused(tmp_path: Path) -> None:
    spec = tiny_spec()
    with pytest.raises(ExportError, match="embedding_dim 16"):
        export_onnx(tiny_verity_net(spec), spec, tiny_card(spec, embedding_dim=16), tmp_path / "m.onnx")


@pytest.mark.torch
def test_models_without_an_embedding_serve_as_before(tmp_path: Path) -> None:
    spec = tiny_spec()
    torch.manual_seed(0)
    result = export_onnx(tiny_net(spec).eval(), spec, tiny_card(spec), tmp_path / "cam.onnx")
    assert result["embedding_dim"] is None and result["max_abs_diff_embedding"] is None
    for path in (tmp_path / "cam.onnx", tiny_onnx(tmp_path / "hand.onnx", spec)):
        engine = OnnxEngine(path, provider="cpu")
        assert "embedding" not in engine.output_names and engine.card.embedding_dim is None
        predictions = engine.predict(batch(spec), with_cam=True)
        assert all(p.embedding is None and p.cam is not None for p in predictions)


def test_card_embedding_dim_round_trips_and_old_cards_load() -> None:
    spec = tiny_spec()
    card = tiny_card(spec, embedding_dim=1280)
    assert ModelCard.from_json(card.to_json()).embedding_dim == 1280
    old = tiny_card(spec).to_dict()
    assert "embedding_dim" not in old and ModelCard.from_dict(old).embedding_dim is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(CardError, match="embedding_dim"):
            tiny_card(spec, embedding_dim=bad)  # type: ignore[arg-type]


def test_embedding_agreement_figures() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 4))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    same = embedding_agreement(reference, reference)
    assert same["embedding_cosine_mean"] == pytest.approx(1.0) and same["embedding_nn_agreement"] == 1.0
    flipped = embedding_agreement(reference, -reference)  # same neighbours, opposite directions
    assert flipped["embedding_cosine_min"] == pytest.approx(-1.0) and flipped["embedding_nn_agreement"] == 1.0


@pytest.mark.torch
def test_int8_gate_covers_the_embedding(tmp_path: Path) -> None:
    spec = tiny_spec()
    model_path = tmp_path / "model.onnx"
    export_onnx(tiny_verity_net(spec), spec, tiny_card(spec), model_path)
    rng = np.random.default_rng(0)
    for label, level in (("genuine", 60), ("counterfeit", 190)):
        folder = tmp_path / "val" / label
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    result = quantize_model(model_path, tmp_path, calibration_images=8)
    assert result["embedding_min_cosine"] == EMBEDDING_MIN_COSINE
    assert result["embedding_cosine_mean"] >= EMBEDDING_MIN_COSINE, result
    assert 0.0 <= result["embedding_nn_agreement"] <= 1.0 and result["written"], result
    int8 = OnnxEngine(tmp_path / "model.int8.onnx", provider="cpu")
    assert int8.card.precision == "int8" and "embedding" in int8.output_names
    assert int8.card.int8_gate is not None and "embedding_cosine_mean" in int8.card.int8_gate
    raw = int8.run(batch(spec, 4))["embedding"]  # quantized norms drift off 1; the engine renormalises
    served = np.stack([p.embedding for p in int8.predict(batch(spec, 4)) if p.embedding is not None])
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)

    # An INT8 model whose embeddings point elsewhere fails the gate on them alone.
    fp32 = OnnxEngine(model_path, provider="cpu")
    inputs = batch(spec, 6)
    targets = np.array([0, 1] * 3)
    assert accuracy_gate(fp32, fp32, inputs, targets)["passed"]
    original = fp32.run

    def turned_embeddings(images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = original(images)
        return {**outputs, "embedding": np.roll(outputs["embedding"], 1, axis=1)}

    candidate = OnnxEngine(model_path, provider="cpu")
    candidate.run = turned_embeddings  # type: ignore[method-assign]
    gate = accuracy_gate(fp32, candidate, inputs, targets)
    assert not gate["passed"] and gate["reasons"] == [
        f"embedding cosine similarity {gate['embedding_cosine_mean']:.4f} < {EMBEDDING_MIN_COSINE:g}"
    ]


@pytest.mark.torch
@pytest.mark.slow
def test_registry_models_embed_their_early_stages_texture_within_the_parity_gate(tmp_path: Path) -> None:
    """efficientnet_lite0 (no pretrained weights: the graph is what matters): the embedding is the
    per-stage normalised spatial std of its stride-4, 8 and 16 stages, 24 + 40 + 80 = 144 wide, and
    it exports within the parity gate."""
    from verity.training.models import build_for_spec, embedding_from

    spec = tiny_spec(size=64)
    model = build_for_spec("efficientnet_lite0", spec).eval()
    assert model.embedding_dim == 144
    images = torch.from_numpy(batch(spec, size=2))
    caught: list[torch.Tensor] = []
    hooks = [stage.register_forward_hook(lambda m, i, o: caught.append(o)) for stage in model._texture_stages]
    model.embedding_output = True
    with torch.no_grad():
        _, _, embedding, patches = model(images)
    for hook in hooks:
        hook.remove()
    assert [tuple(c.shape[1:]) for c in caught] == [(24, 16, 16), (40, 8, 8), (80, 4, 4)]
    expected = torch.cat([torch.nn.functional.normalize(c.std(dim=(2, 3), unbiased=False), dim=1)
                          for c in caught], dim=1) / 3**0.5
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embedding_from(caught), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(patches, caught[1])  # the stride-8 stage's map, for the product check
    model.embedding_output = False
    result = export_onnx(model, spec, tiny_card(spec), tmp_path / "model.onnx")
    assert result["embedding_dim"] == 144 and result["max_abs_diff_embedding"] <= 1e-5
    assert result["max_rel_diff_patches"] <= 1e-4
    served = OnnxEngine(tmp_path / "model.onnx", warmup=False).predict(batch(spec, size=2))
    np.testing.assert_allclose(np.stack([p.embedding for p in served]), embedding.numpy(), atol=1e-5)
    local = patches[0].numpy().reshape(40, -1).T
    local /= np.linalg.norm(local, axis=1, keepdims=True)
    assert served[0].patches is not None and served[0].patches.shape == (64, 40)
    np.testing.assert_allclose(served[0].patches, local, atol=1e-4)
