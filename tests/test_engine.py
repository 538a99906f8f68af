"""OnnxEngine: provider choice (mocked GPU availability), options, precision variants, IO binding."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import verity.inference.engine as engine_module
from benchmarks.models import tiny_onnx
from verity.inference.engine import (
    ModelLoadError,
    OnnxEngine,
    choose_providers,
    provider_options,
    resolve_variant,
)

GPU_BOX = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_BOX = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BOX = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")


def test_best_available_provider_first() -> None:
    assert choose_providers(None, GPU_BOX) == GPU_BOX
    assert choose_providers(None, CUDA_BOX) == CUDA_BOX
    assert choose_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == CPU_BOX


def test_forced_provider_and_its_cpu_fallback() -> None:
    assert choose_providers("cpu", GPU_BOX) == CPU_BOX
    assert choose_providers("cuda", GPU_BOX) == CUDA_BOX
    assert choose_providers("tensorrt", GPU_BOX) == GPU_BOX  # TensorRT, then CUDA for what it cannot run
    trt_only = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("TensorrtExecutionProvider", trt_only) == trt_only
    with pytest.raises(ModelLoadError, match="'cuda' is not available here. Available: CPUExecutionProvider"):
        choose_providers("cuda", CPU_BOX)


def test_provider_options_are_deliberate(tmp_path: Path) -> None:
    options = dict(provider_options(GPU_BOX, fp16=True, cache_dir=tmp_path))
    assert options["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    assert options["TensorrtExecutionProvider"]["trt_engine_cache_path"] == str(tmp_path)
    assert options["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["CPUExecutionProvider"] == {}
    assert dict(provider_options(GPU_BOX))["TensorrtExecutionProvider"]["trt_fp16_enable"] is False


def test_precision_variants(tmp_path: Path, model_path: Path) -> None:
    fp32 = tmp_path / "model.onnx"
    shutil.copy(model_path, fp32)
    assert resolve_variant(fp32, "auto", CPU_BOX) == (fp32, "fp32")
    assert resolve_variant(fp32, "auto", CUDA_BOX) == (fp32, "fp32")
    with pytest.raises(ModelLoadError, match="No int8 model at .*model.int8.onnx"):
        resolve_variant(fp32, "int8", CPU_BOX)
    with pytest.raises(ModelLoadError, match="fp16 runs only on a GPU provider"):
        resolve_variant(fp32, "fp16", CPU_BOX)
    with pytest.raises(ValueError, match="Invalid precision 'int4'. Only auto, fp32, fp16, int8"):
        resolve_variant(fp32, "int4", CPU_BOX)
    shutil.copy(model_path, tmp_path / "model.int8.onnx")
    shutil.copy(model_path, tmp_path / "model.fp16.onnx")
    assert resolve_variant(fp32, "auto", CPU_BOX) == (tmp_path / "model.int8.onnx", "int8")
    assert resolve_variant(fp32, "auto", CUDA_BOX) == (tmp_path / "model.fp16.onnx", "fp16")
    # TensorRT builds its own fp16 engine from the fp32 graph.
    assert resolve_variant(fp32, "auto", GPU_BOX) == (fp32, "fp16")
    assert resolve_variant(fp32, "fp32", CPU_BOX) == (fp32, "fp32")


def test_engine_on_mocked_gpu_asks_for_cuda_and_uses_io_binding(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    """With CUDA "available", the session is requested with CUDA options first; the IO-binding run path
    (real on CPU here, since the mock only fakes availability) gives the same outputs as session.run."""
    requested: list[Any] = []
    real_open = engine_module._open_session

    def spy(path: Any, options: Any, providers: list[Any]) -> Any:
        requested.append(providers)
        return real_open(path, options, ["CPUExecutionProvider"])

    monkeypatch.setattr(engine_module, "available_providers", lambda: CUDA_BOX)
    monkeypatch.setattr(engine_module, "_open_session", spy)
    gpu = OnnxEngine(model_path, warmup=False)
    assert [name for name, _ in requested[0]] == CUDA_BOX
    assert requested[0][0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    gpu.io_binding = True  # the session is really CPU; force the bound path to check it
    plain = OnnxEngine(model_path, provider="cpu", warmup=False)
    assert not plain.io_binding
    batch = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    bound, unbound = gpu.run(batch), plain.run(batch)
    for key in ("logits", "cam"):
        np.testing.assert_allclose(bound[key], unbound[key], rtol=1e-6, atol=1e-6)


def test_engine_predicts_with_cam_and_refuses_bad_shapes(model_path: Path) -> None:
    engine = OnnxEngine(model_path, provider="cpu")
    dark, bright = np.zeros((3, 32, 32), np.float32), np.ones((3, 32, 32), np.float32)
    low, high = engine.predict([dark, bright], with_cam=True)
    assert engine.thresholds.verdict(low.score) == "genuine"
    assert engine.thresholds.verdict(high.score) == "counterfeit"
    assert high.cam is not None and high.cam.shape == (8, 8) and float(high.cam.mean()) > 0
    assert engine.precision == "fp32" and engine.providers == CPU_BOX
    with pytest.raises(ValueError, match=r"Expected a batch of shape \(N, 3, 32, 32\)"):
        engine.run(np.zeros((1, 3, 16, 16), np.float32))


def _write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_predict_cli_prints_verdicts_heatmaps_and_clear_errors(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from verity.inference.cli import main

    bright = _write_png(tmp_path / "bright.png", np.full((50, 70, 3), 230, np.uint8))
    dark = _write_png(tmp_path / "dark.png", np.zeros((50, 70, 3), np.uint8))
    heat = str(tmp_path / "h.png")
    assert main(["--model", str(model_path.parent), str(bright), str(dark), "--heatmap", heat]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = f"{bright}: counterfeit [classifier] (score"
    assert lines[0].startswith(first) and lines[1].startswith(f"{dark}: genuine")
    assert (tmp_path / "h-bright.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["--model", str(model_path), str(bright), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "counterfeit" and result["model"]["name"] == "tiny-photo"

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert main(["--model", str(model_path), str(text)]) == 1
    assert "notes.txt: Not a supported image" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="No model at"):
        main(["--model", str(tmp_path / "missing"), str(bright)])


def test_predict_cli_tiles_a_large_xray_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from benchmarks.models import tiny_spec
    from verity.inference.cli import main

    model = tiny_onnx(tmp_path / "xray" / "model.onnx", tiny_spec("xray", 32))
    scan = np.zeros((150, 400), np.uint16)
    scan[40:100, 280:340] = 65535
    path = _write_png(tmp_path / "scan.png", scan)
    heat = str(tmp_path / "scan-heat.png")
    assert main(["--model", str(model), str(path), "--json", "--heatmap", heat]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "counterfeit" and result["tiles"] == 24 and result["grid"] == [3, 8]
    assert (tmp_path / "scan-heat.png").is_file()
    assert main(["--model", str(model), str(path), "--tiles", "on", "--max-tiles", "5"]) == 1  # refused
    assert "over the limit of 5 per request" in capsys.readouterr().err
