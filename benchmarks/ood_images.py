"""Images that are no product at all, for measuring the "not recognised" gate.

Two kinds, kept apart in every figure:
- found: natural photographs nobody here made, from scikit-image's bundled sample data (public-domain
  and CC0 photographs: an astronaut, a cat, coffee, coins, a motorcycle, a rocket, a camera man, brick,
  grass, gravel, the moon, a printed page, ...; skimage/data/README.txt gives each one's source and
  licence) and its subset of Labeled Faces in the Wild (200 faces, 25 x 25 grey). They are read from
  the installed package at run time and never copied into this repository.
- drawn: flat colours, noise and gradients, the trivial inputs a camera or a console sends by mistake
  (a lens cap, a blank scan, a test pattern).

Each image is encoded the way a station would send it: photographs as JPEG (quality 90), drawn ones as
PNG (flat colours also as JPEG), grey as grey.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data files that are photographs of scenes or objects (not diagrams, test charts or scans
# of tissue); all bundled in the wheel, none downloaded.
FOUND_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
    "logo.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "rocket.jpg",
    "text.png", "cell.png", "ihc.png", "retina.jpg",
)  # fmt: skip
FLAT_COLOURS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30), "green": (30, 160, 60),
    "blue": (30, 60, 200), "grey": (128, 128, 128), "yellow": (240, 220, 40), "brown": (120, 80, 40),
}  # fmt: skip


@dataclass(frozen=True)
class OodImage:
    group: str  # "found: photographs", "found: faces", "drawn: flat", "drawn: noise", "drawn: gradient"
    name: str
    data: bytes


def _encode(pixels: np.ndarray, kind: str) -> bytes:
    image = Image.fromarray(pixels)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def found_images(faces: int = 200) -> Iterator[OodImage]:
    """The scikit-image photographs (JPEG) and up to `faces` LFW faces (PNG, their native 25 x 25)."""
    try:
        import skimage.data
    except ImportError as error:
        raise RuntimeError("The found images come from scikit-image: pip install -e '.[dev]'.") from error
    root = Path(skimage.data.__file__).parent
    for name in FOUND_PHOTOS:
        with Image.open(root / name) as image:
            pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
        yield OodImage("found: photographs", name, _encode(pixels, "JPEG"))
    lfw = np.load(root / "lfw_subset.npy")  # float 0..1, N x 25 x 25
    for index in range(min(faces, len(lfw))):
        pixels = np.clip(lfw[index] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        yield OodImage("found: faces", f"lfw-{index:03d}", _encode(pixels, "PNG"))


def drawn_images(size: tuple[int, int] = (480, 640), seed: int = 0) -> Iterator[OodImage]:
    """Flat colours (PNG and JPEG), noise (uniform, Gaussian, salt-and-pepper; grey and colour) and
    gradients (horizontal, vertical, diagonal, radial; grey and colour), 640 x 480."""
    height, width = size
    rng = np.random.default_rng(seed)
    for name, colour in FLAT_COLOURS.items():
        pixels = np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()
        yield OodImage("drawn: flat", f"flat-{name}.png", _encode(pixels, "PNG"))
        yield OodImage("drawn: flat", f"flat-{name}.jpg", _encode(pixels, "JPEG"))
    noises = {
        "uniform": lambda shape: rng.integers(0, 256, shape),
        "gaussian": lambda shape: np.clip(rng.normal(128, 40, shape), 0, 255),
        "salt-pepper": lambda shape: rng.choice([0, 255], shape),
    }
    for name, draw in noises.items():
        for channels in (1, 3):
            shape = (height, width) if channels == 1 else (height, width, 3)
            pixels = draw(shape).astype(np.uint8)
            yield OodImage("drawn: noise", f"noise-{name}-{channels}.png", _encode(pixels, "PNG"))
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    ramps = {
        "horizontal": x / (width - 1),
        "vertical": y / (height - 1),
        "diagonal": (x + y) / (width + height - 2),
        "radial": np.hypot(x - width / 2, y - height / 2) / np.hypot(width / 2, height / 2),
    }
    for name, ramp in ramps.items():
        grey = (ramp * 255).astype(np.uint8)
        colour = np.stack([grey, 255 - grey, np.full_like(grey, 90)], axis=-1)
        yield OodImage("drawn: gradient", f"gradient-{name}-grey.png", _encode(grey, "PNG"))
        yield OodImage("drawn: gradient", f"gradient-{name}-colour.png", _encode(colour, "PNG"))


PROBE = "probe: "  # groups that measure the gate's limits, apart from the headline figures


def probe_images(faces: int = 200) -> Iterator[OodImage]:
    """The found images resized to where the training envelope's size rule no longer decides: the LFW
    faces enlarged to 100 px, and the photographs turned grey and shrunk to 48 px (both above the
    X-ray model's 32 px). They show what the novelty gate alone makes of blurred grey images."""
    for image in found_images(faces):
        with Image.open(io.BytesIO(image.data)) as opened:
            grey = opened.convert("L")
        if image.group == "found: faces":
            resized, group = grey.resize((100, 100), Image.Resampling.BICUBIC), "faces at 100 px"
        else:
            resized, group = grey.resize((48, 48), Image.Resampling.LANCZOS), "grey photos at 48 px"
        yield OodImage(PROBE + group, image.name, _encode(np.asarray(resized), "PNG"))


def ood_images(faces: int = 200, probes: bool = False) -> list[OodImage]:
    """Every non-product image: found ones first, then drawn ones, then the probes when asked for."""
    return [*found_images(faces), *drawn_images(), *(probe_images(faces) if probes else ())]
