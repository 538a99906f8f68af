"""What an officer compares a suspect with (issue 28 scope 3): the product's closest genuine references,
and the difference map, where the suspect differs from every genuine reference
(inference/references/patch_check.GenuinePool, check.ReferenceCheck).

The product is a synthetic label photo; its genuine references are that photo with a little noise and
a brightness change each, and a counterfeit is a genuine one with a square painted over in a pattern no
reference shows. The model is the tiny ONNX model with local features (a stride-4 map, 16 x 16 here).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.inference.engine import OnnxEngine, Prediction
from verity.inference.pipeline import Scored, score_bytes
from verity.inference.references.check import CLOSEST, ReferenceCheck, image_features
from verity.inference.references.patch_check import MAX_POOL, calibrate_patches, unit_patches
from verity.inference.references.store import ReferenceStore
from verity.inference.tiling import _scan_output
from verity.inference.views import render_difference, render_images

SIZE, GRID, CELL = 64, 16, 4  # the model's input, its local feature map, and the pixels of one location
PRODUCT = "velmor-tea"
PAINTED = (40, 4)  # top, left of the painted 16 px square: locations rows 10-13, columns 1-4


def label_photo(rng: np.random.Generator, painted: tuple[int, int] | None = None) -> bytes:
    """The product: a smooth background, a yellow label with dark text; each photo with its own noise and
    brightness. `painted`: a black and white chequer square over that corner, which no genuine photo has."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([120 + 80 * np.sin(x / 5), 100 + 60 * np.cos(y / 7), 90 + 40 * np.sin((x + y) / 9)], -1)
    pixels[20:44, 8:56] = (230, 210, 40)
    pixels[28:36, 16:48] = (30, 30, 30)
    pixels = pixels + rng.normal(0, 4, pixels.shape) + rng.normal(0, 5)
    if painted is not None:
        top, left = painted
        chequer = ((np.mgrid[0:16, 0:16] // 2).sum(axis=0) % 2) * 255
        pixels[top : top + 16, left : left + 16] = chequer[..., None]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


Enrolled = tuple[OnnxEngine, ReferenceStore, dict[str, bytes]]


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Enrolled:
    """The tiny model with local features and 12 genuine references of the product (id -> image)."""
    root = tmp_path_factory.mktemp("compare")
    spec = tiny_spec("photo", SIZE)
    path = tiny_onnx(root / "m" / "model.onnx", spec, tiny_card(spec, "photo-patch", "1"), features=16,
                     embedding=True, patches=True)  # fmt: skip
    engine = OnnxEngine(path, warmup=False)
    store = ReferenceStore(root / "refs")
    rng = np.random.default_rng(0)
    images = {}
    for index in range(12):
        data = label_photo(rng)
        done = store.add(engine.name, PRODUCT, data, source=f"{index}.png", actor="t", role="admin",
                         embed=store.embedder(engine))  # fmt: skip
        images[done.reference_id] = data
    return engine, store, images


def scored(engine: OnnxEngine, store: ReferenceStore, data: bytes, product: str = PRODUCT) -> Scored:
    """The pipeline's result for one image naming the product, as the server and `verity predict` check it."""

    def check(output: Prediction) -> ReferenceCheck:
        assert output.embedding is not None
        return store.check(engine, product, output.embedding, output.patches, output.patch_grid)

    return score_bytes(data, engine, product_check=check)


def test_the_difference_map_is_high_exactly_where_the_suspect_differs(enrolled: Enrolled) -> None:
    engine, store, _ = enrolled
    rng = np.random.default_rng(1)
    suspect = scored(engine, store, label_photo(rng, painted=PAINTED)).reference
    assert suspect is not None
    difference = suspect.difference_map()
    assert difference is not None and difference.shape == (GRID, GRID)
    rows = slice(PAINTED[0] // CELL, PAINTED[0] // CELL + 4)
    columns = slice(PAINTED[1] // CELL, PAINTED[1] // CELL + 4)
    painted = np.zeros((GRID, GRID), bool)
    painted[rows, columns] = True
    top = np.unravel_index(int(difference.argmax()), difference.shape)
    assert painted[top], (top, np.round(difference, 1))
    # Every painted location lies beyond the genuine limit, several times over; nothing else comes near.
    assert difference[painted].min() > 3.0
    assert difference[~painted].max() < 0.5 * difference[painted].min()
    # Genuine photos stay within it: at most a few locations just above 1, none near the painted square's.
    for _ in range(5):
        genuine = scored(engine, store, label_photo(rng)).reference
        assert genuine is not None
        genuine_map = genuine.difference_map()
        assert genuine_map is not None
        assert genuine_map.max() < 0.5 * difference[painted].min()
        assert np.mean(genuine_map > 1.0) <= 0.05


def test_the_closest_references_are_the_nearest_by_embedding_in_order(enrolled: Enrolled) -> None:
    engine, store, images = enrolled
    ids = list(images)
    embeddings = np.stack([image_features(engine, images[i])[0] for i in ids])
    query = label_photo(np.random.default_rng(2))
    reference = scored(engine, store, query).reference
    assert reference is not None and len(reference.closest) == CLOSEST == 3
    distances = 1.0 - embeddings @ image_features(engine, query)[0]
    expected = np.argsort(distances)[:CLOSEST]
    assert [near.reference_id for near in reference.closest] == [ids[i] for i in expected]
    assert [near.distance for near in reference.closest] == pytest.approx(distances[expected], abs=1e-5)
    assert list(np.diff([near.distance for near in reference.closest]) >= 0) == [True, True]
    # A reference itself sent as the suspect: it is its own closest, at distance 0.
    own = scored(engine, store, images[ids[5]]).reference
    assert own is not None and own.closest[0].reference_id == ids[5]
    assert own.closest[0].distance == pytest.approx(0.0, abs=1e-5)
    described = own.to_dict()
    assert described["closest"][0] == {"reference_id": ids[5], "distance": own.closest[0].distance}
    assert "comparison" not in described and described["difference_max"] is not None


def test_the_overlay_is_drawn_over_the_view_at_the_heatmaps_size(enrolled: Enrolled) -> None:
    engine, store, _ = enrolled
    result = scored(engine, store, label_photo(np.random.default_rng(3), painted=PAINTED))
    overlay = render_difference(result, engine.spec)
    heatmap, view = render_images(result, engine.spec, heatmap=True, view=True)
    assert overlay is not None and heatmap is not None and view is not None
    sizes = {Image.open(io.BytesIO(png)).size for png in (overlay, heatmap, view)}
    assert sizes == {(SIZE, SIZE)}
    # Coloured over the painted square (the overlay differs from the view there), the view elsewhere.
    drawn = np.asarray(Image.open(io.BytesIO(overlay)), dtype=np.int16)
    shown = np.asarray(Image.open(io.BytesIO(view)), dtype=np.int16)
    changed = np.abs(drawn - shown).sum(axis=2)
    assert changed[44:52, 8:16].mean() > 10 * max(changed[4:12, 40:60].mean(), 1.0)


def test_without_a_map_the_closest_references_still_come(tmp_path: Path, enrolled: Enrolled) -> None:
    engine, store, _ = enrolled
    data = label_photo(np.random.default_rng(4))
    embedding, patches = image_features(engine, data)
    # Patches that are not one map of the image (a scan's tiles) or no grid at all: no map, same check.
    whole = store.check(engine, PRODUCT, embedding, patches, (GRID, GRID))
    for grid in (None, (GRID, GRID // 2)):
        checked = store.check(engine, PRODUCT, embedding, patches, grid)
        assert checked.comparison is None and checked.difference_map() is None
        assert checked == whole and checked.closest == whole.closest
    # A model without local features: the embedding check, its closest references, no map.
    spec = tiny_spec("photo", SIZE)
    plain = OnnxEngine(tiny_onnx(tmp_path / "plain" / "model.onnx", spec, tiny_card(spec, "plain", "1"),
                                 features=16, embedding=True), warmup=False)  # fmt: skip
    rng = np.random.default_rng(5)
    for index in range(6):
        store.add(plain.name, PRODUCT, label_photo(rng), source=f"{index}.png", actor="t", role="admin",
                  embed=store.embedder(plain))  # fmt: skip
    result = scored(plain, store, data).reference
    assert result is not None and result.status != "abstained" and len(result.closest) == 3
    assert result.difference_map() is None and result.to_dict()["difference_max"] is None
    # A product with fewer references than the check needs abstains: the closest still show, no map.
    for index in range(2):
        store.add(engine.name, "kestra-charger", label_photo(rng), source=f"k{index}.png", actor="t",
                  role="admin", embed=store.embedder(engine))  # fmt: skip
    few = scored(engine, store, data, product="kestra-charger").reference
    assert few is not None and few.status == "abstained"
    assert len(few.closest) == 2 and few.difference_map() is None


def test_a_scan_scored_in_tiles_gives_no_grid() -> None:
    """A tiled scan's patches are its tiles' maps one after another: they are no map of the view."""
    tile = Prediction(0.5, (0.0, 0.0), embedding=np.ones(4, np.float32) / 2,
                      patches=unit_patches(np.ones((4, 2, 2))), patch_grid=(2, 2))  # fmt: skip
    assert _scan_output(0.5, [tile, tile]).patch_grid is None
    assert _scan_output(0.5, [tile, tile]).patches.shape == (8, 4)


def test_the_genuine_pool_is_bounded_and_matches_its_definition() -> None:
    """The pool's figures against a direct computation: each location's distance to its nearest genuine
    patch, over that patch's own leave-one-out distance (floored at the median), in genuine limits."""
    rng = np.random.default_rng(6)
    parts = unit_patches(rng.standard_normal((30, 8)))
    references = [unit_patches(parts + rng.normal(0, 0.1, parts.shape)) for _ in range(6)]
    calibration = calibrate_patches(references, false_alarm_rate=0.01)
    pool = calibration.pool
    assert len(pool.patches) == 180 <= MAX_POOL
    own = []
    for i, rows in enumerate(references):
        others = np.concatenate([r for j, r in enumerate(references) if j != i])
        own.append(1.0 - (rows @ others.T).max(axis=1))
    expected_spread = np.maximum(np.concatenate(own), np.median(np.concatenate(own)))
    assert pool.spread == pytest.approx(expected_spread, abs=1e-5)
    query = unit_patches(parts + rng.normal(0, 0.1, parts.shape))
    stacked = np.concatenate(references)
    similarity = query @ stacked.T
    best = similarity.argmax(axis=1)
    direct = (1.0 - similarity.max(axis=1)) / expected_spread[best] / pool.limit
    assert pool.relative(query) / pool.limit == pytest.approx(direct, abs=1e-4)
    # The limit: the 99th percentile of every reference's locations against the others' patches.
    ratios = np.concatenate([pool.relative(rows, np.repeat(np.arange(6), 30) == i)
                             for i, rows in enumerate(references)])  # fmt: skip
    assert pool.limit == pytest.approx(float(np.quantile(ratios, 0.99)), rel=1e-5)
    assert 0.98 <= np.mean(ratios <= pool.limit) < 1.0
    # Many references: a coreset of MAX_POOL patches, and the check still answers.
    many = [unit_patches(rng.standard_normal((900, 8))) for _ in range(3)]
    assert len(calibrate_patches(many, 0.01).pool.patches) == MAX_POOL
