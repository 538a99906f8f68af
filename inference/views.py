"""The heatmap and the view of a scored image, drawn one way for the server and `verity predict`.

The view is the image as the model saw it (`heatmap.view_rgb`: the model input; `heatmap.scan_view_rgb`:
a tiled scan at its evidence map's size), display-windowed for X-ray so a dim 16-bit scan is not shown
black. The heatmap is the evidence (a CAM, or a scan's tile evidence) over that view, at its size, so a
client can lay one over the other. The difference map of a product check
(`ReferenceCheck.difference_map`) is drawn the same way, on the same view, as a second overlay.
"""

from __future__ import annotations

import numpy as np

from verity.inference.heatmap import heatmap_over, png_bytes, scan_view_rgb, view_rgb
from verity.inference.pipeline import Scored
from verity.inference.spec import PreprocessSpec

# The difference overlay's colour starts at the genuine limit (1: what genuine images' locations stay
# within) and is full at twice it, so a genuine image stays almost uncoloured and an officer reads colour
# as "further from the genuine references than genuine items go", the same on every image.
DIFFERENCE_FULL = 2.0


def view_of(scored: Scored, spec: PreprocessSpec) -> np.ndarray | None:
    """The HxWx3 uint8 view: the model input, or the decoded scan at the tile evidence's size."""
    decoded = scored.upload.decoded
    if scored.scan is not None and decoded.pixels is not None:
        height, width = scored.scan.evidence.shape
        return scan_view_rgb(decoded.pixels, spec, height, width)
    if decoded.model_input is None:
        return None
    return view_rgb(decoded.model_input, spec)


def render_images(
    scored: Scored, spec: PreprocessSpec, heatmap: bool, view: bool
) -> tuple[bytes | None, bytes | None]:
    """PNGs of the heatmap and of the view, each when asked for (None without a CAM for the heatmap)."""
    if not (heatmap or view):
        return None, None
    shown = view_of(scored, spec)
    if shown is None:
        return None, None
    evidence = scored.evidence(spec.image_size)
    heatmap_png = heatmap_over(evidence, shown) if heatmap and evidence is not None else None
    return heatmap_png, png_bytes(shown) if view else None


def render_difference(
    scored: Scored, spec: PreprocessSpec, difference: np.ndarray | None = None
) -> bytes | None:
    """PNG of the product check's difference map (`difference`, else computed) over the view, at the
    heatmap's size; None without a map (no product, a model without local features, a scan scored in
    tiles) or a view."""
    if difference is None and scored.reference is not None:
        difference = scored.reference.difference_map()
    if difference is None:
        return None
    shown = view_of(scored, spec)
    if shown is None:
        return None
    over_view = scored.over_input(difference - 1.0, spec.image_size)
    return heatmap_over(over_view, shown, scale=DIFFERENCE_FULL - 1.0)
