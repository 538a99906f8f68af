"""Large scans: tile an image bigger than the model input, score the tiles in batches, aggregate.

A 4000 x 1500 X-ray scan squeezed into 224 px loses the detail that tells a counterfeit; tiling keeps
it. Tiles are squares of `spec.image_size / scale` native pixels (default scale 0.5: a 224 px model
sees 448 px tiles at half resolution, which keeps a 4000 x 1500 scan at 60 tiles, under the 1 s budget
on 2 cores; scale 1.0 looks at native resolution at about 4x the tiles). Neighbouring tiles overlap by
`overlap` (default 25%) so an object on a tile border is seen whole by at least one tile; tile
positions are spread evenly so the last tile ends exactly at the image border.

Each tile goes through `inference.decode.to_model_input` with the model's own spec, i.e. exactly the
serving preprocessing (intensity window, resize; a scan thinner than one tile gives tiles that a
letterbox spec pads and a stretch spec stretches, exactly as for a whole image).

Scan score (documented choice):
- "max" (default): the highest tile score. One counterfeit region is enough to raise an alarm, which
  is what an inspection lane needs. Note that the maximum over many tiles is higher than a single
  whole-image score, so thresholds chosen on whole images give more alarms on tiled scans.
- "topk": the mean of the `top_k` highest tile scores; less sensitive to one noisy tile.
The verdict applies the model's thresholds to that score.

Heatmap: each tile's CAM (counterfeit minus genuine, logit units) is upsampled onto the tile's footprint
and averaged where tiles overlap; without CAMs the tile's logit difference fills its footprint. The map
is kept at most `heatmap_max_side` pixels long.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from verity.inference.engine import usable_cores
from verity.inference.heatmap import heatmap_png, upsample
from verity.inference.preprocess import to_model_input

AGGREGATES = ("max", "topk")


class TooManyTiles(ValueError):
    """The scan would need more tiles than the per-request limit allows."""


@dataclass(frozen=True)
class TileScore:
    top: int  # native pixels
    left: int
    height: int
    width: int
    score: float
    verdict: str


@dataclass(frozen=True)
class ScanResult:
    score: float
    verdict: str
    aggregate: str
    tiles: list[TileScore]
    grid: tuple[int, int]  # rows, columns of tiles
    image_shape: tuple[int, int]  # native height, width
    evidence: np.ndarray  # float32 map, counterfeit minus genuine (logit units), at `evidence_scale`
    evidence_scale: float  # evidence pixels per native pixel

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    def heatmap_png(self, image: np.ndarray, alpha: float = 0.5) -> bytes:
        """PNG overlay of the evidence on the decoded scan, at the evidence map's size."""
        from PIL import Image
        from verity.inference.heatmap import to_display_rgb, to_display_uint8

        height, width = self.evidence.shape
        # Shrink before colour conversion: a 4000 px scan is 6 M pixels, its overlay a fraction of that.
        shown = to_display_uint8(image)
        shown = shown[..., 0] if shown.shape[2] == 1 else shown
        if shown.shape[:2] != (height, width):
            shown = np.asarray(Image.fromarray(shown).resize((width, height), Image.Resampling.BILINEAR))
        return heatmap_png(self.evidence, to_display_rgb(shown), alpha=alpha, max_side=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "verdict": self.verdict,
            "aggregate": self.aggregate,
            "grid": list(self.grid),
            "tiles": [tile.__dict__ for tile in self.tiles],
        }


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis: evenly spread, overlapping by at least `overlap`, last one flush."""
    if length <= tile:
        return [0]
    stride = max(1, math.floor(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return [round(x) for x in np.linspace(0, length - tile, count)]


def tile_size(spec_image_size: int, scale: float) -> int:
    """Native pixels per tile side for a model input of `spec_image_size` at `scale`."""
    return max(1, round(spec_image_size / scale))


def plan_tiles(
    height: int, width: int, tile: int, overlap: float, max_tiles: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(top, left) of every tile and the (rows, columns) grid; refuses more than `max_tiles`."""
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    count = len(rows) * len(cols)
    if count > max_tiles:
        raise TooManyTiles(
            f"A {width}x{height} scan needs {count} tiles of {tile} px ({len(rows)} x {len(cols)}), over the "
            f"limit of {max_tiles} per request. Use a smaller scale (coarser tiles) or raise the tile limit."
        )
    return [(top, left) for top in rows for left in cols], (len(rows), len(cols))


def aggregate_scores(scores: np.ndarray, how: str = "max", top_k: int = 3) -> float:
    """Scan score from tile scores: the maximum, or the mean of the `top_k` highest."""
    if how not in AGGREGATES:
        raise ValueError(f"Invalid aggregate {how!r}. Only {', '.join(AGGREGATES)} are supported.")
    if scores.size == 0:
        raise ValueError("No tile scores to aggregate.")
    if how == "max":
        return float(scores.max())
    k = max(1, min(int(top_k), scores.size))
    return float(np.sort(scores)[-k:].mean())


def _content_box(crop_h: int, crop_w: int, spec: Any) -> tuple[int, int, int, int]:
    """Where the crop lies inside the model input (letterbox pads narrow edge tiles; stretch fills)."""
    size = spec.image_size
    if spec.resize_mode == "stretch":
        return 0, 0, size, size
    factor = size / max(crop_h, crop_w)
    h, w = max(1, round(crop_h * factor)), max(1, round(crop_w * factor))
    return (size - h) // 2, (size - w) // 2, h, w


def score_scan(
    image: np.ndarray,
    engine: Any,
    *,
    scale: float = 0.5,
    overlap: float = 0.25,
    aggregate: str = "max",
    top_k: int = 3,
    max_tiles: int = 128,
    batch_size: int = 16,
    heatmap_max_side: int = 1024,
    workers: int | None = None,
) -> ScanResult:
    """Scores a decoded HxWxC image (from `decode_image`) with `engine` (an OnnxEngine), tiled when its
    longer side exceeds one tile; smaller images are scored whole (one "tile"). Tile batches run on
    `workers` threads at once (default: one per CPU core)."""
    if not 0.0 < scale <= 4.0:
        raise ValueError(f"Invalid scale {scale}: it must lie in (0, 4].")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"Invalid overlap {overlap}: it must lie in [0, 1).")
    if aggregate not in AGGREGATES:
        raise ValueError(f"Invalid aggregate {aggregate!r}. Only {', '.join(AGGREGATES)} are supported.")
    if image.ndim == 2:
        image = image[..., None]
    spec = engine.spec
    height, width = image.shape[:2]
    tile = tile_size(spec.image_size, scale)
    if max(height, width) <= tile:
        boxes, grid, tile = [(0, 0)], (1, 1), max(height, width)
    else:
        boxes, grid = plan_tiles(height, width, tile, overlap, max_tiles)
    workers = usable_cores() if workers is None else workers
    predictions = _predict_tiles(image, engine, boxes, tile, batch_size, workers)
    tiles = [
        TileScore(top, left, min(tile, height - top), min(tile, width - left), p.score, p.verdict)
        for (top, left), p in zip(boxes, predictions, strict=True)
    ]
    score = aggregate_scores(np.array([t.score for t in tiles]), aggregate, top_k)
    evidence, factor = _assemble_evidence(tiles, predictions, (height, width), spec, heatmap_max_side)
    return ScanResult(
        score=score,
        verdict=engine.thresholds.verdict(score),
        aggregate=aggregate,
        tiles=tiles,
        grid=grid,
        image_shape=(height, width),
        evidence=evidence,
        evidence_scale=factor,
    )


def _predict_tiles(
    image: np.ndarray, engine: Any, boxes: list[tuple[int, int]], tile: int, batch_size: int, workers: int
) -> list[Any]:
    """Runs the tiles in batches on `workers` threads at once; each thread preprocesses its batch and
    runs the model on it (both release the GIL), so every core works on the one scan."""
    spec = engine.spec

    def score(chunk: list[tuple[int, int]]) -> list[Any]:
        batch = np.stack([to_model_input(image[t : t + tile, x : x + tile], spec) for t, x in chunk])
        return list(engine.predict(batch, with_cam=True))

    step = max(1, batch_size)
    chunks = [boxes[i : i + step] for i in range(0, len(boxes), step)]
    if workers <= 1 or len(chunks) == 1:
        return [prediction for chunk in chunks for prediction in score(chunk)]
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks)), thread_name_prefix="verity-tiles") as pool:
        return [prediction for result in pool.map(score, chunks) for prediction in result]


def _assemble_evidence(
    tiles: list[TileScore],
    predictions: list[Any],
    shape: tuple[int, int],
    spec: Any,
    max_side: int,
) -> tuple[np.ndarray, float]:
    height, width = shape
    factor = min(1.0, max_side / max(height, width))
    out_h, out_w = max(1, round(height * factor)), max(1, round(width * factor))
    total = np.zeros((out_h, out_w), np.float32)
    count = np.zeros((out_h, out_w), np.float32)
    size = spec.image_size
    for tile, prediction in zip(tiles, predictions, strict=True):
        y0, x0 = round(tile.top * factor), round(tile.left * factor)
        y1 = max(y0 + 1, min(out_h, round((tile.top + tile.height) * factor)))
        x1 = max(x0 + 1, min(out_w, round((tile.left + tile.width) * factor)))
        if prediction.cam is not None:
            top, left, h, w = _content_box(tile.height, tile.width, spec)
            cam = upsample(prediction.cam, size, size)[top : top + h, left : left + w]
            patch = upsample(cam, y1 - y0, x1 - x0)
        else:
            patch = np.full((y1 - y0, x1 - x0), prediction.logits[1] - prediction.logits[0], np.float32)
        total[y0:y1, x0:x1] += patch
        count[y0:y1, x0:x1] += 1.0
    return total / np.maximum(count, 1.0), factor
