"""Large-scan tiling (coverage, aggregation, tile limit, evidence map) and heatmap rendering."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_onnx, tiny_spec
from verity.inference.engine import OnnxEngine
from verity.inference.heatmap import colour_map, heatmap_png, normalise_cam, to_display_rgb
from verity.inference.tiling import (
    TilingOptions,
    TooManyTiles,
    aggregate_scores,
    fitting_tile,
    plan_tiles,
    score_scan,
    tile_starts,
)


@pytest.fixture(scope="module")
def xray_engine(tmp_path_factory: pytest.TempPathFactory) -> OnnxEngine:
    path = tiny_onnx(tmp_path_factory.mktemp("xray") / "model.onnx", tiny_spec("xray", 32))
    return OnnxEngine(Path(path), provider="cpu")


@pytest.mark.parametrize(("length", "tile", "overlap"), [(400, 64, 0.25), (1500, 448, 0.25), (65, 64, 0.5)])
def test_tiles_cover_the_axis_with_the_requested_overlap(length: int, tile: int, overlap: float) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length  # flush with both borders
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert (gaps <= tile * (1 - overlap)).all()  # neighbours overlap at least as asked


def test_short_axis_is_one_tile_and_tile_limit_is_a_clear_error() -> None:
    assert tile_starts(30, 64, 0.25) == [0]
    boxes, grid = plan_tiles(1500, 4000, 448, 0.25, max_tiles=64)
    assert grid == (5, 12) and len(boxes) == 60
    with pytest.raises(TooManyTiles, match=r"needs 60 tiles of 448 px \(5 x 12\), over the limit of 59"):
        plan_tiles(1500, 4000, 448, 0.25, max_tiles=59)


def test_aggregation_rules() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert aggregate_scores(scores, "max") == 0.9
    assert aggregate_scores(scores, "topk", top_k=2) == pytest.approx(0.8)
    assert aggregate_scores(scores, "topk", top_k=10) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="Invalid aggregate 'mean'. Only max, topk"):
        aggregate_scores(scores, "mean")


def test_scan_finds_the_bright_object_and_locates_it(xray_engine: OnnxEngine) -> None:
    """The tiny model calls bright regions counterfeit: one bright object in a dark 16-bit scan must give
    a counterfeit scan verdict by max aggregation, while most tiles stay genuine, and the evidence map
    must peak on the object."""
    scan = np.zeros((150, 400, 1), np.uint16)
    scan[40:100, 280:340] = 65535
    result = score_scan(scan, xray_engine, TilingOptions(scale=0.5, overlap=0.25))
    assert result.tiled and result.grid == (3, 8) and len(result.tiles) == 24
    assert xray_engine.thresholds.verdict(result.score) == "counterfeit"
    assert result.score == max(t.score for t in result.tiles)
    assert sum(t.verdict == "genuine" for t in result.tiles) >= 16
    assert result.evidence.shape == (150, 400)
    peak_y, peak_x = np.unravel_index(result.evidence.argmax(), result.evidence.shape)
    assert 40 <= peak_y < 100 and 280 <= peak_x < 340
    top_mean = score_scan(scan, xray_engine, TilingOptions(aggregate="topk", top_k=5))
    assert top_mean.score < result.score
    png = Image.open(io.BytesIO(result.heatmap_png(scan)))
    assert png.format == "PNG" and png.size == (400, 150)
    with pytest.raises(TooManyTiles):
        score_scan(scan, xray_engine, TilingOptions(mode="on", scale=1.0, max_tiles=10))


def test_small_image_is_scored_whole(xray_engine: OnnxEngine) -> None:
    small = np.full((50, 60), 255, np.uint8)
    result = score_scan(small, xray_engine)
    assert not result.tiled and result.grid == (1, 1)
    whole = xray_engine.predict([_model_input(small, xray_engine)])[0]
    assert result.score == pytest.approx(whole.score)


def _model_input(image: np.ndarray, engine: OnnxEngine) -> np.ndarray:
    from verity.inference.preprocess import to_model_input

    return to_model_input(image[..., None] if image.ndim == 2 else image, engine.spec)


def test_heatmap_normalisation_colours_and_png() -> None:
    cam = np.array([[-2.0, 0.0], [1.0, 4.0]], np.float32)
    assert normalise_cam(cam).tolist() == [[0.0, 0.0], [0.25, 1.0]]
    assert not normalise_cam(-np.ones((2, 2))).any()  # no positive evidence: a cold map
    colours = colour_map(np.array([0.0, 1.0]))
    assert colours.dtype == np.uint8 and colours[0, 2] > colours[0, 0] and colours[1, 0] > colours[1, 2]
    model_input = np.zeros((3, 32, 32), np.float32)
    png = Image.open(io.BytesIO(heatmap_png(cam, model_input)))
    assert png.size == (32, 32)
    rgb = np.asarray(png)
    assert rgb[-1, -1].sum() > rgb[0, 0].sum()  # the hot corner is coloured, the cold one stays black
    assert to_display_rgb(np.full((4, 5), 65535, np.uint16)).shape == (4, 5, 3)
    big = Image.open(io.BytesIO(heatmap_png(cam, np.zeros((3000, 1500), np.uint8), max_side=300)))
    assert big.size == (150, 300)


def test_tile_batches_run_on_several_threads_with_the_same_result(xray_engine: OnnxEngine) -> None:
    scan = np.zeros((150, 400, 1), np.uint16)
    scan[40:100, 280:340] = 65535
    alone = score_scan(scan, xray_engine, batch_size=4, workers=1)

    class TwoAtOnce:
        """The engine, but each batch waits until a second batch is in flight (one thread breaks it)."""

        def __init__(self, engine: OnnxEngine) -> None:
            self.engine, self.spec, self.thresholds = engine, engine.spec, engine.thresholds
            self.feature_alignment = engine.feature_alignment
            self.barrier = threading.Barrier(2, timeout=5)

        def predict(self, batch: np.ndarray, with_cam: bool = False) -> list:
            self.barrier.wait()
            return self.engine.predict(batch, with_cam=with_cam)

    together = score_scan(scan, TwoAtOnce(xray_engine), batch_size=4, workers=2)  # 24 tiles: 6 batches
    assert [t.score for t in together.tiles] == [t.score for t in alone.tiles]
    assert together.score == alone.score and together.output.logits == alone.output.logits
    np.testing.assert_array_equal(together.evidence, alone.evidence)


def test_auto_tiles_a_scan_too_big_for_the_limit_coarser_and_on_refuses_it(xray_engine) -> None:
    container = np.zeros((4000, 6000, 1), dtype=np.uint16)  # 425 tiles of 320 px at the default scale
    def count(tile: int) -> int:
        return len(tile_starts(4000, tile, 0.25)) * len(tile_starts(6000, tile, 0.25))

    tile = fitting_tile(4000, 6000, 320, 0.25, 128)
    assert count(320) == 425 and count(tile) <= 128 < count(round(tile * 0.9))  # the finest tiles that fit
    result = score_scan(container, xray_engine, TilingOptions())
    assert 1 < len(result.tiles) <= 128 and result.image_shape == (4000, 6000)
    with pytest.raises(TooManyTiles):
        score_scan(container, xray_engine, TilingOptions(mode="on", max_tiles=128))
