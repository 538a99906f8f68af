"""Large scans: one rule for when an image is tiled, then tiles scored in batches and aggregated.

`verity predict`, the server (every route) and `verity eval` all go through `load_for_scoring`, which
asks `should_tile` (the one rule) and hands back either the model input of an image scored whole or
the native pixels of a scan to tile; `score_scan` then scores the tiles. `TilingOptions` holds the one
default the three share.

When to tile (`should_tile`, mode "auto", the default everywhere):
- only X-ray. A transmission scan is a lane of objects and a counterfeit is one region of it; the
  X-ray model is trained on whole scans, crops and patches, so a tile is an image it knows. A photo
  frames one product: its model has only seen whole products, and the max over crops of a 12 MP
  phone photo (about 220 tiles) would be neither meaningful nor within the tile limit.
- only when resizing the whole scan to the model input would shrink it more than `TILE_ABOVE_INPUTS`
  (8) times along its longer side: above 1280 px for a 160 px model. Below that the whole image keeps
  its detail about as well as the training images did (whole scans of up to 256 px), and scoring it
  whole keeps the thresholds it was calibrated with: the maximum over tiles is higher than one
  whole-image score, so thresholds chosen on whole images give more alarms on tiled scans. A
  640 x 480 image is therefore scored whole; a 4000 x 1500 scan (25 times the input) is tiled.
"on" tiles any image larger than one tile (any modality); "off" never tiles.

Tiles are squares of `spec.image_size / scale` native pixels (default scale 0.5: a 224 px model
sees 448 px tiles at half resolution, which keeps a 4000 x 1500 scan at 60 tiles, under the 1 s budget
on 2 cores; scale 1.0 looks at native resolution at about 4x the tiles). Neighbouring tiles overlap by
`overlap` (default 25%) so an object on a tile border is seen whole by at least one tile. "auto" never
refuses a scan for its size: one that would need more than `max_tiles` tiles at `scale` (a 6000 x 4000
container scan needs 425 tiles of 320 px) is tiled coarser, with the smallest tiles that fit the limit,
so the time per scan stays bounded. "on" asks for that detail explicitly and is refused (413) instead.

Padding never raises a scan score: every tile lies fully inside the image (positions are spread evenly
so the last tile ends exactly at the border, never past it), so no tile is padded or empty. Along an
axis shorter than one tile the tile is as long as the image, and the spec handles that crop as it
handles a whole image (letterbox pads it, stretch stretches it), exactly as the model was trained.
(The constant 0.554 once seen for every 640 x 480 RGB image was not padding: the decoder of that time
clipped 8-bit RGB X-ray to a constant 1.0, and 0.554 was xray-default 1.0.0's score of pure air.)

Each tile goes through `inference.preprocess.to_model_input` with the model's own spec, i.e. exactly
the serving preprocessing (intensity window, resize).

Scan score (documented choice):
- "max" (default): the highest tile score. One counterfeit region is enough to raise an alarm, which
  is what an inspection lane needs.
- "topk": the mean of the `top_k` highest tile scores; less sensitive to one noisy tile.
The scan is then judged as one image by the pipeline (`inference.pipeline.judge`): that score against the
thresholds, one novelty search on the mean of the tiles' embeddings, and the training envelope.

Heatmap: each tile's CAM (counterfeit minus genuine, logit units) is upsampled onto the tile's footprint
and averaged where tiles overlap; without CAMs the tile's logit difference fills its footprint. The map
is kept at most `heatmap_max_side` pixels long.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from verity.inference.decode import decode_image, dicom_modality, sniff_format
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeLimits, check_structure
from verity.inference.engine import Engine, Prediction, usable_cores
from verity.inference.heatmap import over_input, upsample
from verity.inference.input_profile import input_profile
from verity.inference.open_set import scan_embedding
from verity.inference.preprocess import is_colour_content, load_for_model_sized, to_model_input
from verity.inference.spec import PreprocessSpec

AGGREGATES = ("max", "topk")
TILING_MODES = ("auto", "on", "off")
# Modalities "auto" tiles: a scan is a lane of objects, a photo frames one product (module docstring).
TILED_MODALITIES = ("xray",)
# "auto" tiles a scan whose longer side is more than this many model inputs (1280 px at 160 px).
TILE_ABOVE_INPUTS = 8


class TooManyTiles(ValueError):
    """The scan would need more tiles than the per-request limit allows."""


@dataclass(frozen=True)
class TilingOptions:
    """How images are tiled: one default shared by `verity predict`, the server and `verity eval`."""

    mode: str = "auto"  # auto | on | off (see `should_tile`)
    scale: float = 0.5  # model pixels per native pixel: tiles of image_size / scale native pixels
    overlap: float = 0.25
    aggregate: str = "max"
    top_k: int = 3
    max_tiles: int = 128

    def __post_init__(self) -> None:
        if self.mode not in TILING_MODES:
            raise ValueError(
                f"Invalid tiling mode {self.mode!r}. Only {', '.join(TILING_MODES)} are supported."
            )
        if not 0.0 < self.scale <= 4.0:
            raise ValueError(f"Invalid scale {self.scale}: it must lie in (0, 4].")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"Invalid overlap {self.overlap}: it must lie in [0, 1).")
        if self.max_tiles < 1:
            raise ValueError(f"Invalid tile limit {self.max_tiles}: it must be at least 1.")
        if self.aggregate not in AGGREGATES:
            raise ValueError(
                f"Invalid aggregate {self.aggregate!r}. Only {', '.join(AGGREGATES)} are supported."
            )


def should_tile(image_shape: tuple[int, ...], spec: PreprocessSpec, options: TilingOptions) -> bool:
    """The one tiling rule (module docstring): whether an image of `image_shape` (height, width, ...)
    is scored in tiles by a model of `spec`, rather than whole."""
    longer = max(image_shape[:2])
    if options.mode == "off" or longer <= tile_size(spec.image_size, options.scale):
        return False
    if options.mode == "on":
        return True
    return spec.modality in TILED_MODALITIES and longer > TILE_ABOVE_INPUTS * spec.image_size


@dataclass(frozen=True)
class ScoringInput:
    """What `load_for_scoring` gives: exactly one of `model_input` and `pixels` is set."""

    model_input: np.ndarray | None  # CxSxS float32 in [0, 1]: the image is scored whole
    pixels: np.ndarray | None  # native HxWxC pixels: the image is scored in tiles (`score_scan`)
    # The decoded image's shorter side in pixels (`preprocess.load_for_model_sized`): an image smaller
    # than any the model was trained on is not recognised (`open_set.outside_envelope`). A tensor sent
    # preprocessed is the model input, `spec.image_size` on each side.
    shorter_side: int
    kind: str  # the container format, by content (`decode.sniff_format`), sniffed once; "tensor" for one
    # Whether the decoded image held colour before the colour rule (`preprocess.is_colour_content`): the
    # open-set gate compares it with the training images'. None for a tensor sent preprocessed.
    colour: bool | None = None
    # A dual-energy pair (two-page TIFF, two-frame DICOM/DICOS, or a high and a low file): the answer
    # says which of its images the model scored (a single-energy model: the high-energy one).
    dual_energy: bool = False
    # The Modality code a DICOM file states (`decode.dicom_modality`): the gate does not recognise a
    # clinical image (`decode.CLINICAL_DICOM_MODALITIES`). None for any other format.
    dicom_modality: str | None = None

    @cached_property
    def profile(self) -> np.ndarray | None:
        """The input profile (`input_profile`) of an image scored whole, computed once when the gate
        asks; None for a scan scored in tiles (the profile is a whole-image statistic)."""
        return None if self.model_input is None else input_profile(self.model_input, self.shorter_side)


def _native_shape(data: bytes, kind: str, limits: DecodeLimits) -> tuple[int, int] | None:
    """Height and width from the header alone (Pillow reads no pixels until asked); None when Pillow
    cannot read it, and the decoder then says why. EXIF rotation swaps the sides, not the longer one.
    The structure is checked first: Pillow's header parsing is what a flood of empty parts slows."""
    check_structure(data, kind, limits)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001 - any failure here is reported by the real decode that follows
        return None


def load_for_scoring(
    data: bytes, spec: PreprocessSpec, options: TilingOptions, limits: DecodeLimits = DEFAULT_LIMITS
) -> ScoringInput:
    """Decodes an upload or a file's bytes as the one tiling rule wants it: an image scored whole gets
    exactly `load_for_model` (JPEG draft included), a scan to tile its full-resolution pixels. The
    format is sniffed here, once, and handed to every reader."""
    kind = sniff_format(data)
    if kind in ("tiff", "dicom"):
        # Their readers decode the whole image in any case; `load_for_model` is to_model_input of it.
        pixels = decode_image(data, limits, kind=kind)
        side = int(min(pixels.shape[:2]))
        colour = is_colour_content(pixels)
        pair = pixels.ndim == 3 and pixels.shape[2] == 2
        stated = dicom_modality(data) if kind == "dicom" else None
        if should_tile(pixels.shape, spec, options):
            return ScoringInput(None, pixels, side, kind, colour, pair, stated)
        return ScoringInput(to_model_input(pixels, spec), None, side, kind, colour, pair, stated)
    if _may_tile(spec, options):  # photos in "auto" never are: no header read before the decode
        shape = _native_shape(data, kind, limits)
        if shape is not None and should_tile(shape, spec, options):
            pixels = decode_image(data, limits, kind=kind)
            return ScoringInput(None, pixels, min(shape), kind, is_colour_content(pixels))
    model_input, side, colour = load_for_model_sized(data, spec, limits, kind)
    return ScoringInput(model_input, None, side, kind, colour)


def _may_tile(spec: PreprocessSpec, options: TilingOptions) -> bool:
    """Whether `should_tile` can say yes for some image size, given the model and the options."""
    return options.mode == "on" or (options.mode == "auto" and spec.modality in TILED_MODALITIES)


@dataclass(frozen=True)
class TileScore:
    top: int  # native pixels
    left: int
    height: int
    width: int
    score: float
    verdict: str  # the tile's score against the thresholds alone (the scan's verdict is the pipeline's)


@dataclass(frozen=True)
class ScanResult:
    score: float
    aggregate: str
    tiles: list[TileScore]
    grid: tuple[int, int]  # rows, columns of tiles
    image_shape: tuple[int, int]  # native height, width
    evidence: np.ndarray  # float32 map, counterfeit minus genuine (logit units), at `evidence_scale`
    evidence_scale: float  # evidence pixels per native pixel
    # The scan as one model output: its score, the logits equivalent to it and the normalised mean of
    # its tiles' embeddings (`open_set.scan_embedding`), judged by the pipeline as one image is.
    output: Prediction

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    @property
    def logits(self) -> tuple[float, ...]:
        """Logits equivalent to the scan score: softmax of (0, log-odds) is the score (for /v2 and
        evaluation's predictions table, which report logits)."""
        return self.output.logits

    def heatmap_png(self, image: np.ndarray, spec: PreprocessSpec | None = None, alpha: float = 0.5) -> bytes:
        """PNG overlay of the evidence on the decoded scan at the evidence map's size, over the view
        the server shows (`heatmap.scan_view_rgb`: the model's intensities, display-windowed X-ray)."""
        from verity.inference.heatmap import heatmap_over, scan_view_rgb, to_display_rgb, to_display_uint8

        height, width = self.evidence.shape
        if spec is not None:
            return heatmap_over(self.evidence, scan_view_rgb(image, spec, height, width), alpha)
        # Without the model's spec: the raw pixels stretched for display, shrunk before colour conversion.
        shown = to_display_uint8(image if image.ndim == 3 else image[..., None])
        shown = shown[..., 0] if shown.shape[2] == 1 else shown
        if shown.shape[:2] != (height, width):
            shown = np.asarray(Image.fromarray(shown).resize((width, height), Image.Resampling.BILINEAR))
        return heatmap_over(self.evidence, to_display_rgb(shown), alpha)


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


def fitting_tile(height: int, width: int, tile: int, overlap: float, max_tiles: int) -> int:
    """The smallest tile side from `tile` up whose grid over a height x width image has at most
    `max_tiles` tiles (one tile as long as the image always fits)."""
    while len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap)) > max_tiles:
        tile = math.ceil(tile * 1.1)
    return tile


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


def content_box(crop_h: int, crop_w: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Where the crop lies inside the model input (letterbox pads narrow edge tiles; stretch fills)."""
    size = spec.image_size
    if spec.resize_mode == "stretch":
        return 0, 0, size, size
    factor = size / max(crop_h, crop_w)
    h, w = max(1, round(crop_h * factor)), max(1, round(crop_w * factor))
    return (size - h) // 2, (size - w) // 2, h, w


def score_scan(
    image: np.ndarray,
    engine: Engine,
    options: TilingOptions = TilingOptions(),
    *,
    batch_size: int = 16,
    heatmap_max_side: int = 1024,
    workers: int | None = None,
) -> ScanResult:
    """Scores a decoded HxWxC image (from `decode_image`) with `engine` in tiles of
    `options`; an image no longer than one tile is scored whole (one "tile"). Which images to tile is
    `should_tile`'s decision, made before this is called. Tile batches run on `workers` threads at
    once (default: one per CPU core)."""
    if image.ndim == 2:
        image = image[..., None]
    spec = engine.spec
    height, width = image.shape[:2]
    tile = tile_size(spec.image_size, options.scale)
    if options.mode == "auto":
        tile = fitting_tile(height, width, tile, options.overlap, options.max_tiles)
    if max(height, width) <= tile:
        boxes, grid, tile = [(0, 0)], (1, 1), max(height, width)
    else:
        boxes, grid = plan_tiles(height, width, tile, options.overlap, options.max_tiles)
    workers = usable_cores() if workers is None else workers
    predictions = _predict_tiles(image, engine, boxes, tile, batch_size, workers)
    verdict = engine.thresholds.verdict
    tiles = [
        TileScore(top, left, min(tile, height - top), min(tile, width - left), p.score, verdict(p.score))
        for (top, left), p in zip(boxes, predictions, strict=True)
    ]
    score = aggregate_scores(np.array([t.score for t in tiles]), options.aggregate, options.top_k)
    evidence, factor = _assemble_evidence(
        tiles, predictions, (height, width), spec, heatmap_max_side, engine.feature_alignment
    )
    return ScanResult(
        score=score,
        output=_scan_output(score, predictions),
        aggregate=options.aggregate,
        tiles=tiles,
        grid=grid,
        image_shape=(height, width),
        evidence=evidence,
        evidence_scale=factor,
    )


def _scan_output(score: float, tile_predictions: list[Prediction]) -> Prediction:
    """The scan as one model output: its aggregate score, the logits equivalent to it, the mean of its
    tiles' embeddings and all their local features (None when the model gives none). Its patches have
    no `patch_grid`: they are the tiles' maps one after another, not one map of the view."""
    embeddings = [p.embedding for p in tile_predictions if p.embedding is not None]
    embedding = scan_embedding(np.stack(embeddings)) if len(embeddings) == len(tile_predictions) else None
    patches = [p.patches for p in tile_predictions if p.patches is not None]
    odds = min(max(score, 1e-7), 1 - 1e-7)
    return Prediction(
        score=score,
        logits=(0.0, math.log(odds / (1 - odds))),
        embedding=embedding,
        patches=np.concatenate(patches) if patches and len(patches) == len(tile_predictions) else None,
    )


def _predict_tiles(
    image: np.ndarray, engine: Engine, boxes: list[tuple[int, int]], tile: int, batch_size: int, workers: int
) -> list[Prediction]:
    """Runs the tiles in batches on `workers` threads at once; each thread preprocesses its batch and
    runs the model on it (both release the GIL), so every core works on the one scan."""
    spec = engine.spec

    def score(chunk: list[tuple[int, int]]) -> list[Prediction]:
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
    predictions: list[Prediction],
    shape: tuple[int, int],
    spec: PreprocessSpec,
    max_side: int,
    alignment: str,
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
            top, left, h, w = content_box(tile.height, tile.width, spec)
            cam = over_input(prediction.cam, size, alignment)[top : top + h, left : left + w]
            patch = upsample(cam, y1 - y0, x1 - x0)
        else:
            patch = np.full((y1 - y0, x1 - x0), prediction.logits[1] - prediction.logits[0], np.float32)
        total[y0:y1, x0:x1] += patch
        count[y0:y1, x0:x1] += 1.0
    return total / np.maximum(count, 1.0), factor
