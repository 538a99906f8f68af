"""A dual-energy X-ray from two uploads or files, the high- and the low-energy image: each decoded by
`inference/decode.py`, checked to be a single grey plane of the same size, and stacked HxWx2 (channel 0
high, channel 1 low), the layout of a two-page TIFF or a two-frame DICOM. `pair_tiff` writes such a pair
as the two-page TIFF it equals, so two uploads take the one path a pair file takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from verity.inference.decode import decode_image, read_image_bytes
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeError, DecodeLimits


def _single_plane(image: np.ndarray, which: str) -> np.ndarray:
    if image.shape[2] == 1:
        return image[..., 0]
    grey_as_rgb = image.shape[2] == 3 and bool((image == image[..., :1]).all())
    if grey_as_rgb:
        return image[..., 0]  # a grey image saved as RGB
    raise DecodeError(
        f"The {which}-energy image has {image.shape[2]} channels; each image of a dual-energy pair must be "
        "a single grey channel."
    )


def _unit_float(plane: np.ndarray) -> np.ndarray:
    if plane.dtype == np.uint8:
        return plane.astype(np.float32) / 255.0
    if plane.dtype == np.uint16:
        return plane.astype(np.float32) / 65535.0
    return plane.astype(np.float32)


def decode_dual_energy(
    high: bytes | str | Path, low: bytes | str | Path, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decodes a high/low energy pair (two uploads or files) to HxWx2: channel 0 high, channel 1 low.

    Both must be single-channel and the same size. Same integer type: kept; otherwise both become float32
    in [0, 1] (8-bit / 255, 16-bit / 65535, DICOM already windowed). `preprocess.to_model_input` makes
    the pair a model input.
    """
    high_plane = _single_plane(decode_image(read_image_bytes(high, limits), limits), "high")
    low_plane = _single_plane(decode_image(read_image_bytes(low, limits), limits), "low")
    if high_plane.shape != low_plane.shape:
        raise DecodeError(
            f"The high- and low-energy images differ in size: {high_plane.shape[1]}x{high_plane.shape[0]} "
            f"and {low_plane.shape[1]}x{low_plane.shape[0]}."
        )
    if high_plane.dtype != low_plane.dtype or high_plane.dtype == np.float32:
        high_plane, low_plane = _unit_float(high_plane), _unit_float(low_plane)
    return np.stack([high_plane, low_plane], axis=2)


def pair_tiff(high: bytes, low: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The pair of `decode_dual_energy` as a two-page TIFF (high first): decoded by the same reader as a
    two-page TIFF sent whole, so a pair scores the same in either form."""
    import io

    import tifffile

    pair = decode_dual_energy(high, low, limits)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(pair.transpose(2, 0, 1)))  # pages: high, low
    return buffer.getvalue()


def energy_used(dual_energy: bool, in_chans: int) -> str | None:
    """Which images of a pair the model scored: both for a two-channel model, else the high-energy one
    (`preprocess.match_channels`); None for a single image."""
    if not dual_energy:
        return None
    return "high and low" if in_chans == 2 else "high"
