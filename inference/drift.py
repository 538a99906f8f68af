"""Drift: how far the images a station sends have moved from what the model was validated on.

The measure is the population stability index (PSI) over the deciles of the validation distribution: the
validation split's scores (and its images' median brightness, from the input profile) are cut into ten
bins of 10% each when the model is exported (`drift_reference`, the card's `novelty.drift`), and a window
of live answers is binned by the same cuts:

    PSI = sum over bins of (live share - 0.1) * ln(live share / 0.1)

0 is the validation distribution itself; by the usual reading, under 0.1 is stable, 0.1 to 0.25 a
moderate shift and above DRIFT_ALERT_PSI (0.25) a shift to act on: the model is seeing images it was not
validated on (another scanner setting, another product line, a darker X-ray), and its thresholds no longer
mean what its card says. A window of fewer than MIN_WINDOW answers is too small to judge and raises none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DRIFT_ALERT_PSI = 0.25
DECILES = tuple(range(10, 100, 10))  # percent: nine cuts, ten bins of 10% each
MIN_WINDOW = 100
WINDOW = 500  # the live answers held per station and modality
SMOOTHING = 1e-4  # an empty bin's share, so that its log stays finite
SIGNALS = ("score", "brightness")


def decile_cuts(values: np.ndarray) -> list[float]:
    """The nine cut points of the validation distribution."""
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), DECILES)]


def psi(live: np.ndarray, cuts: list[float]) -> float:
    """The population stability index of `live` against the ten equal bins `cuts` defines."""
    counts = np.bincount(np.searchsorted(np.asarray(cuts), np.asarray(live, dtype=np.float64), side="right"),
                         minlength=len(cuts) + 1)  # fmt: skip
    shares = np.maximum(counts / max(1, counts.sum()), SMOOTHING)
    expected = 1.0 / (len(cuts) + 1)
    return float(np.sum((shares - expected) * np.log(shares / expected)))


def drift_reference(
    val_scores: np.ndarray, val_brightness: np.ndarray, val_not_recognised: float
) -> dict[str, Any]:
    """The card's `novelty.drift`: the validation split's decile cuts for each signal, and its
    not-recognised rate."""
    brightness = np.asarray(val_brightness, dtype=np.float64)
    brightness = brightness[np.isfinite(brightness)]
    return {
        "score": decile_cuts(val_scores),
        "brightness": decile_cuts(brightness) if len(brightness) else None,  # none: every image in tiles
        "not_recognised_rate": float(val_not_recognised),
        "val_images": int(len(val_scores)),
    }


def drift_figures(reference: dict[str, Any], scores: np.ndarray, brightness: np.ndarray,
                  not_recognised: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """PSI of each signal, the live not-recognised rate beside validation's, and whether to alert."""
    figures: dict[str, Any] = {"window": int(len(scores))}
    for signal, live in (("score", scores), ("brightness", brightness)):
        live, cuts = live[np.isfinite(live)], reference.get(signal)
        figures[f"{signal}_psi"] = psi(live, cuts) if cuts and len(live) >= MIN_WINDOW else None
    figures["not_recognised_rate"] = float(np.mean(not_recognised)) if len(not_recognised) else None
    figures["val_not_recognised_rate"] = reference.get("not_recognised_rate")
    figures["alert"] = any((figures[f"{s}_psi"] or 0.0) > DRIFT_ALERT_PSI for s in SIGNALS)
    return figures
