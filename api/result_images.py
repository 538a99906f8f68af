"""A /v1 result's pictures, rendered off the event loop (a PNG takes milliseconds) and handed whole to
`PredictionService.result`: the heatmap and the view (`inference.views`), and with the heatmap the
product check's difference overlay."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from verity.inference import views
from verity.inference.pipeline import Scored
from verity.inference.spec import PreprocessSpec


@dataclass(frozen=True)
class Images:
    """A result's pictures, as base64 PNGs: the heatmap and the view, each when asked for, and with the
    heatmap the product check's difference overlay and its largest value (when there is a map)."""

    heatmap_png: str | None = None
    view_png: str | None = None
    difference: tuple[str, float] | None = None


NO_IMAGES = Images()


def render_images(scored: Scored, spec: PreprocessSpec, heatmap: bool, view: bool) -> Images:
    """The pictures asked for (`inference.views`); blocking, so routes run it off the event loop (a PNG
    takes milliseconds)."""
    heatmap_png, view_png = views.render_images(scored, spec, heatmap, view)
    return Images(_base64(heatmap_png), _base64(view_png), _difference(scored, spec) if heatmap else None)


def _difference(scored: Scored, spec: PreprocessSpec) -> tuple[str, float] | None:
    reference = scored.reference
    difference = reference.difference_map() if reference is not None else None
    if difference is None:
        return None
    png = _base64(views.render_difference(scored, spec, difference))
    return None if png is None else (png, float(difference.max()))


def _base64(png: bytes | None) -> str | None:
    return None if png is None else base64.b64encode(png).decode("ascii")
