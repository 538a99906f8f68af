"""Synthetic X-ray transmission scans of parcels and container sections with packed goods.

Physics, simplified but of the right form: each object adds its projected thickness t (cm, computed from
its shape: slab, cylinder, shell, ellipsoid) times its linear attenuation coefficient mu (1/cm) to a line
integral per pixel, at a low and a high energy, and the detector sees I = I0 * exp(-sum mu * t). mu is
material-dependent and falls faster with energy for heavier elements, so the low/high ratio separates
organics (~1.4) from minerals (~2-2.5) and metals (> 3). The detector adds broad scatter (a blurred fraction
of the primary beam), a small point-spread blur, shot noise (Gaussian approximation of Poisson, exact for
the counts here) and line artefacts (gain per detector element, source flicker per scan line).

Genuine goods follow their product's spec (structure, fill material and level, parts, packing pattern);
counterfeits deviate in one to three cues (CUES) drawn per case. Scene type, parcel size and pose, clutter,
dose and artefacts are drawn per image, identically for both labels.

Console export styles (EXPORT_STYLES): a scan leaves the generator in one of the forms real scanner consoles
send: 16-bit grey PNG (or the dual-energy 2-page TIFF), 8-bit grey PNG or JPEG,
grey saved as RGB JPEG, or the dual-energy pseudo-colour view (see pseudo_colour). `mixed` draws a style
and a crop per image (one in five keeps the whole scan; see crop_box). Style and crop come from their own
per-image stream (seed, index), never from the label, so neither form nor crop size says anything about
genuine vs counterfeit.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from verity.datasets.synth import (
    EXPORT_STYLES,
    STREAM_EXPORT,
    ImageJob,
    case_rng,
    encode_png16,
    image_rng,
    rng_for,
)

CUES = ("filler_density", "fill_level", "missing_part", "substituted_part", "packing_pattern")

# Linear attenuation (1/cm) at the low and the high energy. Powders are given at bulk density.
MATERIALS: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "cardboard": (0.20, 0.13),
    "paper": (0.45, 0.30),
    "plastic": (0.26, 0.18),
    "organic": (0.30, 0.21),  # tablets, sugar, starch, milk powder
    "liquid": (0.24, 0.17),
    "textile": (0.10, 0.07),
    "silica": (0.55, 0.28),
    "talc": (0.78, 0.38),
    "gypsum": (1.00, 0.44),
    "brick": (1.20, 0.50),
    "sand": (0.95, 0.43),
    "glass": (0.95, 0.45),
    "aluminium": (0.95, 0.45),
    "fr4": (0.60, 0.31),
    "battery": (3.0, 1.0),  # electrode stack of a Li-ion cell
    "steel": (9.0, 1.5),
    "copper": (12.0, 1.9),
}
FILLERS = ("talc", "gypsum", "brick")


def mu(name: str) -> np.ndarray:
    """(low, high) attenuation of a material; raises ValueError naming the known materials."""
    if name not in MATERIALS:
        raise ValueError(f"Unknown material {name!r}. Known: {', '.join(MATERIALS)}.")
    return np.array(MATERIALS[name], dtype=np.float32)


def transmission(mu_pair: np.ndarray, thickness_cm: np.ndarray | float) -> np.ndarray:
    """Beer-Lambert I/I0 = exp(-mu t) for each energy (last axis: low, high)."""
    return np.exp(-np.multiply.outer(np.asarray(thickness_cm, dtype=np.float32), mu_pair))


# ------------------------------------------------------------------------------------------- canvas


class Canvas:
    """Line integrals sum(mu * t) at two energies over an H x W detector, drawn in cm."""

    def __init__(self, height: int, width: int, px_per_cm: float) -> None:
        self.att = np.zeros((2, height, width), dtype=np.float32)
        self.ppc = px_per_cm
        # Where the goods lie (x0, y0, x1, y1 in cm), so crops can keep the evidence in view.
        self.goods: tuple[float, float, float, float] | None = None

    def _box(
        self, x: float, y: float, w: float, h: float
    ) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
        """Pixel bounds clipped to the canvas, and pixel-centre coordinates in cm relative to (x, y)."""
        _, height, width = self.att.shape
        x0, y0 = max(0, int(np.floor(x * self.ppc))), max(0, int(np.floor(y * self.ppc)))
        x1, y1 = min(width, int(np.ceil((x + w) * self.ppc))), min(height, int(np.ceil((y + h) * self.ppc)))
        xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) / self.ppc - x
        ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) / self.ppc - y
        return x0, y0, x1, y1, xs, ys

    def add(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        material: np.ndarray,
        thickness: Callable[[np.ndarray, np.ndarray], np.ndarray] | float,
    ) -> None:
        """Adds material over the box; thickness is cm, or a function of (xs[None, :], ys[:, None])."""
        x0, y0, x1, y1, xs, ys = self._box(x, y, w, h)
        if x1 <= x0 or y1 <= y0:
            return
        t = thickness(xs[None, :], ys[:, None]) if callable(thickness) else np.float32(thickness)
        t = np.broadcast_to(np.clip(t, 0, None), (y1 - y0, x1 - x0))
        self.att[0, y0:y1, x0:x1] += material[0] * t
        self.att[1, y0:y1, x0:x1] += material[1] * t

    def stamp(self, x: float, y: float, other: Canvas) -> None:
        """Adds another canvas (same scale) with its top-left corner at (x, y) cm, to the nearest pixel."""
        _, height, width = self.att.shape
        _, oh, ow = other.att.shape
        x0, y0 = round(x * self.ppc), round(y * self.ppc)
        sx0, sy0 = max(0, -x0), max(0, -y0)
        x1, y1 = min(width, x0 + ow), min(height, y0 + oh)
        if x1 <= max(0, x0) or y1 <= max(0, y0):
            return
        self.att[:, max(0, y0) : y1, max(0, x0) : x1] += other.att[
            :, sy0 : sy0 + y1 - max(0, y0), sx0 : sx0 + x1 - max(0, x0)
        ]

    def slab(self, x: float, y: float, w: float, h: float, t: float, material: np.ndarray) -> None:
        self.add(x, y, w, h, material, t)

    def cylinder(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        material: np.ndarray,
        scale: float = 1.0,
        surface: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """A cylinder, axis along y (chord thickness across x); filled below `surface(xs)` if given."""
        radius = w / 2

        def t(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            chord = 2 * np.sqrt(np.clip(radius**2 - (xs - radius) ** 2, 0, None)) * scale
            return chord if surface is None else chord * (ys >= surface(xs))

        self.add(x, y, w, h, material, t)

    def shell(self, x: float, y: float, w: float, h: float, wall: float, material: np.ndarray) -> None:
        """The wall of a hollow cylinder (axis along y): dark rims where the beam runs along the wall."""
        outer, inner = w / 2, w / 2 - wall

        def t(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            dx2 = (xs - outer) ** 2
            return 2 * (np.sqrt(np.clip(outer**2 - dx2, 0, None)) - np.sqrt(np.clip(inner**2 - dx2, 0, None)))

        self.add(x, y, w, h, material, t)

    def ellipsoid(
        self, cx: float, cy: float, rx: float, ry: float, depth: float, material: np.ndarray
    ) -> None:
        def t(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            r2 = ((xs - rx) / rx) ** 2 + ((ys - ry) / ry) ** 2
            return depth * np.sqrt(np.clip(1 - r2, 0, None))

        self.add(cx - rx, cy - ry, 2 * rx, 2 * ry, material, t)

    def frame(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        wall: float,
        depth: float,
        material: np.ndarray,
        lid: float | None = None,
    ) -> None:
        """A box seen from above: lid and floor everywhere, and the side walls edge-on (dark rim)."""
        self.slab(x, y, w, h, 2 * (wall if lid is None else lid), material)
        for bx, by, bw, bh in (
            (x, y, w, wall),
            (x, y + h - wall, w, wall),
            (x, y, wall, h),
            (x + w - wall, y, wall, h),
        ):
            self.slab(bx, by, bw, bh, depth, material)


# ------------------------------------------------------------------------------------------ products


@dataclass(frozen=True)
class Packing:
    """How units sit in a carton: a rows x cols grid with a gap (cm), optionally staggered rows."""

    rows: int
    cols: int
    gap: float
    stagger: float = 0.0
    jitter: float = 0.0


@dataclass(frozen=True)
class Deviation:
    """One case's departures from the product spec (all neutral for genuine goods)."""

    strength: float = 0.0
    filler: str | None = None
    filler_fraction: float = 0.0
    level_drop: float = 0.0
    level_tilt: float = 0.0
    missing: str | None = None
    substituted: str | None = None

    def fill_material(self, base: str) -> np.ndarray:
        if self.filler is None:
            return mu(base)
        return (1 - self.filler_fraction) * mu(base) + self.filler_fraction * mu(self.filler)


def _granular(rng: np.random.Generator, amount: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Random lumpiness of a bulk fill (grains, tablets), as a thickness multiplier."""
    phase = rng.uniform(0, 2 * np.pi, 4)
    freq = rng.uniform(3.0, 5.0, 2)

    def factor(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return 1 + amount * np.sin(xs * freq[0] + phase[0]) * np.sin(ys * freq[1] + phase[1])

    return factor


def _surface(top: float, dev: Deviation, width: float) -> Callable[[np.ndarray], np.ndarray]:
    def surface(xs: np.ndarray) -> np.ndarray:
        return top + dev.level_tilt * (xs - width / 2)

    return surface


def pill_bottle(c: Canvas, x: float, y: float, dev: Deviation, rng: np.random.Generator) -> None:
    w, h, cap = 5.0, 10.0, 1.6
    c.cylinder(x + 0.6, y, w - 1.2, cap, mu("plastic"), scale=0.5)
    c.shell(x, y + cap, w, h - cap, 0.12, mu("plastic"))
    body = h - cap
    level = y + cap + body * (0.22 + dev.level_drop)
    fill = dev.fill_material("organic") * rng.uniform(0.97, 1.03)
    lumps = _granular(rng, 0.12)
    surface = _surface(level - y - cap, dev, w - 0.3)
    c.add(
        x + 0.15,
        y + cap,
        w - 0.3,
        body,
        fill * 0.62,
        lambda xs, ys: (
            2
            * np.sqrt(np.clip(((w - 0.3) / 2) ** 2 - (xs - (w - 0.3) / 2) ** 2, 0, None))
            * (ys >= surface(xs))
            * lumps(xs, ys)
        ),
    )
    if dev.missing != "desiccant":
        c.cylinder(x + w / 2 - 0.8, level - 2.2, 1.6, 2.2, mu("silica"), scale=0.9)
        c.cylinder(x + w / 2 - 0.8, level - 2.2, 1.6, 2.2, mu("plastic"), scale=0.15)


def blister_card(c: Canvas, x: float, y: float, dev: Deviation, rng: np.random.Generator) -> None:
    w, h, layers = 10.0, 5.0, 3
    c.slab(x, y, w, h, 0.05 * layers, mu("plastic"))
    c.slab(x, y, w, h, 0.01 * layers, mu("aluminium"))
    fill = dev.fill_material("organic") * rng.uniform(0.97, 1.03)
    missing = set()
    if dev.missing == "tablets":
        missing = set(rng.choice(10, size=1 + round(3 * dev.strength), replace=False).tolist())
    for k in range(10):
        row, col = divmod(k, 5)
        cx, cy = x + 1.0 + col * 2.0, y + 1.4 + row * 2.2
        c.ellipsoid(cx, cy, 0.75, 0.75, 0.05 * layers, mu("plastic"))  # the blister cavity
        if k in missing:
            continue
        size = 1.0 - (rng.uniform(0, 0.5 * dev.strength + 0.1) if dev.level_drop > 0 else 0.0)
        c.ellipsoid(cx, cy, 0.55 * size, 0.55 * size, 0.5 * layers * size, fill)


def powder_tin(c: Canvas, x: float, y: float, dev: Deviation, rng: np.random.Generator) -> None:
    w, h = 10.0, 14.0
    c.shell(x, y, w, h, 0.025, mu("steel"))
    c.slab(x, y, w, 0.5, 0.04, mu("steel"))  # rolled rims
    c.slab(x, y + h - 0.5, w, 0.5, 0.04, mu("steel"))
    level = 0.14 * h + dev.level_drop * h
    fill = dev.fill_material("organic") * 0.5 * rng.uniform(0.97, 1.03)
    c.cylinder(x + 0.05, y + 0.5, w - 0.1, h - 1.0, fill, surface=_surface(level, dev, w - 0.1))
    if dev.missing != "scoop":
        top = y + 0.5 + level + 0.6
        c.ellipsoid(x + 3.2, top + 1.2, 1.4, 1.0, 2.0, mu("plastic"))
        c.slab(x + 4.4, top + 0.9, 4.2, 0.5, 0.8, mu("plastic"))


def power_bank(c: Canvas, x: float, y: float, dev: Deviation, rng: np.random.Generator) -> None:
    w, h = 7.2, 14.0
    c.frame(x, y, w, h, 0.2, 2.2, mu("plastic"))
    cells = 3
    if dev.missing == "cells":
        cells = max(0, 3 - 1 - round(1.5 * dev.strength))
    length = 6.5
    for k in range(3):
        cx = x + 0.6 + k * 2.0
        if k >= cells:
            continue
        if dev.substituted == "cells":
            if dev.strength >= 0.5:  # a weight block of sand instead of a cell
                c.slab(cx, y + 0.6, 1.8, length, 1.6, mu("sand"))
                continue
            short = length * (1 - 0.6 * dev.strength)
            c.cylinder(cx, y + 0.6, 1.8, short, mu("battery"))
            c.shell(cx, y + 0.6, 1.8, short, 0.03, mu("steel"))
            continue
        c.cylinder(cx, y + 0.6, 1.8, length, mu("battery"))
        c.shell(cx, y + 0.6, 1.8, length, 0.03, mu("steel"))
    _circuit_board(c, x + 0.6, y + 8.2, 6.0, 3.0, dev, rng, chips=3)
    c.slab(x + w / 2 - 0.6, y + h - 0.6, 1.2, 0.5, 0.8, mu("steel"))  # USB-C port


def _circuit_board(
    c: Canvas, x: float, y: float, w: float, h: float, dev: Deviation, rng: np.random.Generator, chips: int
) -> None:
    if dev.missing == "board":
        return
    c.slab(x, y, w, h, 0.16, mu("fr4"))
    if dev.substituted == "board":
        return  # a dummy board: no components, no copper
    for k in range(5):
        c.slab(x + 0.2, y + 0.3 + k * h / 5.5, w - 0.4, 0.08, 0.007, mu("copper"))
    for k in range(chips):
        cx = x + 0.4 + k * (w - 0.8) / chips
        c.slab(cx, y + 0.8, 1.1, 1.1, 0.12, mu("silica"))
        c.slab(cx - 0.1, y + 0.8, 1.3, 0.1, 0.05, mu("copper"))
        c.slab(cx - 0.1, y + 1.8, 1.3, 0.1, 0.05, mu("copper"))


def phone_box(c: Canvas, x: float, y: float, dev: Deviation, rng: np.random.Generator) -> None:
    w, h = 9.0, 16.5
    c.frame(x, y, w, h, 0.15, 5.0, mu("cardboard"))
    px, py, pw, ph = x + 0.9, y + 0.8, 7.2, 14.8
    c.frame(px, py, pw, ph, 0.25, 0.8, mu("aluminium"), lid=0.05)
    c.slab(px, py, pw, ph, 0.14, mu("glass"))
    if dev.missing != "battery":
        if dev.substituted == "battery":
            shrink = 1 - 0.55 * dev.strength
            c.slab(px + 0.6, py + 5.0, 6.0 * shrink, 8.5 * shrink, 0.45, mu("battery"))
            c.slab(px + 0.6, py + 5.0, 6.0, 8.5, 0.3 * (1 - shrink), mu("plastic"))
        else:
            c.slab(px + 0.6, py + 5.0, 6.0, 8.5, 0.45, mu("battery"))
    _circuit_board(c, px + 0.6, py + 0.6, 6.0, 3.8, dev, rng, chips=4)
    c.ellipsoid(px + 1.5, py + 1.2, 0.5, 0.5, 0.6, mu("steel"))  # camera module
    # cable coil at the bottom of the box
    c.shell(x + 2.5, y + h - 1.3, 4.0, 1.0, 0.05, mu("copper"))


@dataclass(frozen=True)
class ProductSpec:
    unit: Callable[[Canvas, float, float, Deviation, np.random.Generator], None]
    unit_size: tuple[float, float]  # w, h in cm
    packing: Packing
    cues: tuple[str, ...]
    parts: tuple[str, ...] = ()  # what missing_part can remove
    substitutes: tuple[str, ...] = ()  # what substituted_part can swap
    fill_level: float = 0.0  # whether the fill can be lowered (bulk fills)


PRODUCT_SPECS: dict[str, ProductSpec] = {
    "pill-bottles": ProductSpec(
        pill_bottle,
        (5.0, 10.0),
        Packing(2, 3, 0.5),
        ("filler_density", "fill_level", "missing_part", "packing_pattern"),
        ("desiccant",),
    ),
    "blister-packs": ProductSpec(
        blister_card,
        (10.0, 5.0),
        Packing(4, 2, 0.4),
        ("filler_density", "fill_level", "missing_part", "packing_pattern"),
        ("tablets",),
    ),
    "powder-tins": ProductSpec(
        powder_tin,
        (10.0, 14.0),
        Packing(1, 3, 0.6),
        ("filler_density", "fill_level", "missing_part", "packing_pattern"),
        ("scoop",),
    ),
    "power-banks": ProductSpec(
        power_bank,
        (7.2, 14.0),
        Packing(2, 4, 0.6),
        ("missing_part", "substituted_part", "packing_pattern"),
        ("cells", "board"),
        ("cells", "board"),
    ),
    "phones": ProductSpec(
        phone_box,
        (9.0, 16.5),
        Packing(2, 3, 0.4),
        ("missing_part", "substituted_part", "packing_pattern"),
        ("battery", "board"),
        ("battery", "board"),
    ),
}
PRODUCTS = tuple(PRODUCT_SPECS)


def cues_for(product: str) -> tuple[str, ...]:
    """The cues a product can show (a tin has no battery to remove)."""
    return PRODUCT_SPECS[product].cues


def deviation(job: ImageJob) -> tuple[Deviation, Packing]:
    """The case's departures from the spec and its packing; per-image jitter only in strength."""
    spec = PRODUCT_SPECS[job.case.product]
    rng = case_rng(job)
    strength = job.difficulty.strength * float(image_rng(job).uniform(0.9, 1.1))
    cues = set(job.case.cues)
    dev = Deviation(strength=strength)
    if "filler_density" in cues:
        dev = _replace(
            dev,
            filler=FILLERS[int(rng.integers(len(FILLERS)))],
            filler_fraction=min(1.0, 0.15 + 0.85 * strength),
        )
    if "fill_level" in cues:
        dev = _replace(
            dev,
            level_drop=0.08 + 0.35 * strength,
            level_tilt=float(rng.choice([-1.0, 1.0])) * 0.25 * strength,
        )
    if "missing_part" in cues:
        dev = _replace(dev, missing=spec.parts[int(rng.integers(len(spec.parts)))])
    if "substituted_part" in cues:
        options = [s for s in spec.substitutes if s != dev.missing] or list(spec.substitutes)
        dev = _replace(dev, substituted=options[int(rng.integers(len(options)))])
    packing = spec.packing
    if "packing_pattern" in cues:
        packing = _other_packing(packing, strength, rng)
    return dev, packing


def _replace(dev: Deviation, **changes: Any) -> Deviation:
    from dataclasses import replace

    return replace(dev, **changes)


def _other_packing(genuine: Packing, strength: float, rng: np.random.Generator) -> Packing:
    """Another packing: a different grid when the cue is strong, looser or staggered rows when subtle."""
    if strength >= 0.5:
        rows, cols = genuine.rows, genuine.cols
        while (rows, cols) == (genuine.rows, genuine.cols):
            rows = max(1, genuine.rows + int(rng.integers(-1, 2)))
            cols = max(1, genuine.cols + int(rng.integers(-1, 2)))
        return Packing(rows, cols, genuine.gap * (1 + strength), 0.0, 0.2 * strength)
    return Packing(genuine.rows, genuine.cols, genuine.gap + 1.5 * strength, 0.5 * strength, 0.6 * strength)


# ------------------------------------------------------------------------------------------- scenes


def _carton(
    c: Canvas,
    x: float,
    y: float,
    spec: ProductSpec,
    packing: Packing,
    dev: Deviation,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Draws a carton of units at (x, y); returns its size in cm."""
    uw, uh = spec.unit_size
    width = packing.cols * uw + (packing.cols + 1) * packing.gap + packing.stagger * uw
    height = packing.rows * uh + (packing.rows + 1) * packing.gap
    c.frame(x, y, width, height, 0.4, 1.0 + uh * 0.5, mu("cardboard"))
    # Units of one line are alike: two variants are drawn once and stamped (5-10x faster than drawing each).
    variants = []
    for _ in range(2):
        unit = Canvas(int(np.ceil(uh * c.ppc)) + 2, int(np.ceil(uw * c.ppc)) + 2, c.ppc)
        spec.unit(unit, 0.0, 0.0, dev, rng)
        variants.append(unit)
    for row in range(packing.rows):
        shift = packing.stagger * uw if row % 2 else 0.0
        for col in range(packing.cols):
            jx, jy = rng.uniform(-1, 1, 2) * packing.jitter
            c.stamp(
                x + packing.gap + col * (uw + packing.gap) + shift + jx,
                y + packing.gap + row * (uh + packing.gap) + jy,
                variants[(row + col) % 2],
            )
    return width, height


def _clutter(c: Canvas, x: float, y: float, w: float, h: float, rng: np.random.Generator, count: int) -> None:
    """Unrelated things in the parcel: clothes, a book, keys, a cable."""
    for _ in range(count):
        kind = int(rng.integers(4))
        cx, cy = x + rng.uniform(0, 0.8) * w, y + rng.uniform(0, 0.8) * h
        if kind == 0:
            c.ellipsoid(
                cx + 5, cy + 4, rng.uniform(4, 9), rng.uniform(3, 7), rng.uniform(3, 8), mu("textile")
            )
        elif kind == 1:
            c.slab(cx, cy, rng.uniform(12, 20), rng.uniform(15, 24), rng.uniform(1.5, 3), mu("paper"))
        elif kind == 2:
            for k in range(int(rng.integers(2, 5))):
                c.slab(cx + 0.8 * k, cy + rng.uniform(0, 1), 0.3, rng.uniform(4, 6), 0.2, mu("steel"))
        else:
            c.slab(cx, cy, rng.uniform(10, 25), 0.4, 0.4, mu("plastic"))
            c.slab(cx, cy + 0.15, rng.uniform(10, 25), 0.1, 0.1, mu("copper"))


def _container(
    canvas: Canvas,
    scene_w: float,
    scene_h: float,
    spec: ProductSpec,
    packing: Packing,
    dev: Deviation,
    rng: np.random.Generator,
) -> None:
    """A section of a container: corrugated steel walls around two stacked cartons."""
    carton_h = packing.rows * spec.unit_size[1] + (packing.rows + 1) * packing.gap
    period = rng.uniform(8, 12)
    ribs = lambda xs, ys: 0.12 + 0.1 * (np.sin(xs * 2 * np.pi / period) > 0)  # noqa: E731
    canvas.add(0, 0, scene_w, scene_h, mu("steel") * 0.35, ribs)
    canvas.slab(0, scene_h - 6, scene_w, 6, 0.8, mu("steel"))  # floor cross-member
    x = first = rng.uniform(3, 8)
    right = x
    for _ in range(2):
        width, height = _carton(canvas, x, scene_h - 7 - carton_h, spec, packing, dev, rng)
        right = x + width
        x += width + rng.uniform(2, 8)
    canvas.goods = (first, scene_h - 7 - carton_h, right, scene_h - 7)
    _clutter(canvas, x, 5, max(5.0, scene_w - x - 5), scene_h - 15, rng, int(rng.integers(0, 3)))


def _parcel(
    canvas: Canvas,
    job: ImageJob,
    size: tuple[float, float, float, float],
    packing: Packing,
    dev: Deviation,
    rng: np.random.Generator,
) -> None:
    """A parcel: cardboard walls, clutter, and the carton of goods somewhere inside."""
    spec = PRODUCT_SPECS[job.case.product]
    scene_w, scene_h, carton_w, carton_h = size
    margin = 3.0
    canvas.frame(
        margin,
        margin,
        scene_w - 2 * margin,
        scene_h - 2 * margin,
        0.5,
        rng.uniform(4, 8),
        mu("cardboard"),
    )  # walls bulge and sag: not edge-on all along
    free_w, free_h = scene_w - 2 * margin - carton_w - 1, scene_h - 2 * margin - carton_h - 1
    cx = margin + 0.5 + rng.uniform(0, max(0.1, free_w))
    cy = margin + 0.5 + rng.uniform(0, max(0.1, free_h))
    count = int(rng.integers(0, 3 + round(job.difficulty.nuisance)))
    _clutter(canvas, margin, margin, scene_w - 2 * margin, scene_h - 2 * margin, rng, count)
    _carton(canvas, cx, cy, spec, packing, dev, rng)
    canvas.goods = (cx, cy, cx + carton_w, cy + carton_h)


def _scene(job: ImageJob, rng: np.random.Generator) -> Canvas:
    spec = PRODUCT_SPECS[job.case.product]
    dev, packing = deviation(job)
    uw, uh = spec.unit_size
    carton_w = packing.cols * uw + (packing.cols + 1) * packing.gap + packing.stagger * uw
    carton_h = packing.rows * uh + (packing.rows + 1) * packing.gap
    container = rng.random() < 0.2
    if container:
        scene_w = max(carton_w * 2 + 30, 120.0) * rng.uniform(1.0, 1.15)
        scene_h = max(carton_h + 30, scene_w * rng.uniform(0.55, 0.75))
    else:
        # parcel sizes are drawn independently of the carton (which a counterfeit packing changes), so
        # image aspect and scale say little about the label; only a carton that does not fit grows it
        scene_w = max(carton_w + 10, rng.uniform(40, 65))
        scene_h = max(carton_h + 10, rng.uniform(35, 60))
    long_cm = max(scene_w, scene_h)
    ppc = job.size / long_cm
    canvas = Canvas(max(16, round(scene_h * ppc)), max(16, round(scene_w * ppc)), ppc)
    if container:
        _container(canvas, scene_w, scene_h, spec, packing, dev, rng)
    else:
        _parcel(canvas, job, (scene_w, scene_h, carton_w, carton_h), packing, dev, rng)
    return canvas


# ----------------------------------------------------------------------------------------- detector


def _blur_small(plane: np.ndarray) -> np.ndarray:
    """The detector's point spread: a [1, 2, 1] / 4 kernel along both axes."""
    out = plane.copy()
    out[1:-1] = 0.5 * plane[1:-1] + 0.25 * (plane[:-2] + plane[2:])
    tmp = out.copy()
    out[:, 1:-1] = 0.5 * tmp[:, 1:-1] + 0.25 * (tmp[:, :-2] + tmp[:, 2:])
    return out


def _broad_blur(plane: np.ndarray) -> np.ndarray:
    height, width = plane.shape
    small = Image.fromarray(plane, "F").resize(
        (max(1, width // 16), max(1, height // 16)), Image.Resampling.BOX
    )
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def detect(att: np.ndarray, rng: np.random.Generator, nuisance: float, photons: float) -> np.ndarray:
    """Detector counts normalised to I0 (1 = air) for one energy's line integrals."""
    primary = np.exp(-att)
    scatter = rng.uniform(0.02, 0.06) * nuisance
    signal = _blur_small(primary * (1 - scatter) + scatter * _broad_blur(primary))
    # shot noise: Gaussian with the Poisson variance (counts are in the hundreds or more)
    counts = signal * photons
    noisy = counts + np.sqrt(counts) * rng.standard_normal(counts.shape, dtype=np.float32)
    height, width = att.shape
    element_gain = 1 + rng.normal(0, 0.006 * nuisance, (height, 1)).astype(np.float32)
    flicker = 1 + rng.normal(0, 0.004 * nuisance, (1, width)).astype(np.float32)
    noisy = noisy * element_gain * flicker / photons
    if rng.random() < 0.3 * nuisance:  # a dead or noisy detector line
        row = int(rng.integers(height))
        noisy[row] *= rng.uniform(0.5, 0.9)
    return noisy


def to_uint16(unit: np.ndarray) -> np.ndarray:
    """I/I0 to 16-bit counts: air near 62000, a dark offset of 300."""
    return np.clip(unit * 62000.0 + 300.0, 0, 65535).astype(np.uint16)


def rotated_box(
    box: tuple[float, float, float, float], angle: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) around `box` (pixel edges) after the scan was turned by `angle`
    degrees about its centre as PIL's rotate turns it (counter-clockwise as shown, the size kept), cut to
    the scan: where the goods lie in the scan as written, not where they lay before the turn."""
    turn = np.radians(angle)
    cos, sin = np.cos(turn), np.sin(turn)
    cx, cy = width / 2.0, height / 2.0
    corners = np.array([(box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])]) - (cx, cy)
    xs = cx + corners[:, 0] * cos + corners[:, 1] * sin
    ys = cy - corners[:, 0] * sin + corners[:, 1] * cos
    return (max(0, int(xs.min())), max(0, int(ys.min())),
            min(width, int(np.ceil(xs.max()))), min(height, int(np.ceil(ys.max()))))  # fmt: skip


def _scan(job: ImageJob, dual: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The scan as uint16 planes (see render_planes) and the goods' pixel box (x0, y0, x1, y1)."""
    rng = image_rng(job)
    rng.uniform()  # the first draw is the cue-strength jitter
    canvas = _scene(job, rng)
    att = canvas.att
    angle = rng.uniform(-8, 8) * job.difficulty.nuisance
    if abs(angle) > 0.5:
        att = np.stack(
            [
                np.asarray(Image.fromarray(a, "F").rotate(angle, Image.Resampling.BILINEAR), dtype=np.float32)
                for a in att
            ]
        )
    _, height, width = att.shape
    x0, y0, x1, y1 = canvas.goods or (0.0, 0.0, width / canvas.ppc, height / canvas.ppc)
    goods = rotated_box((x0 * canvas.ppc, y0 * canvas.ppc, x1 * canvas.ppc, y1 * canvas.ppc),
                        angle if abs(angle) > 0.5 else 0.0, width, height)  # fmt: skip
    photons = rng.uniform(3000, 8000) / job.difficulty.nuisance
    if dual:
        high = detect(att[1], rng, job.difficulty.nuisance, photons)
        low = detect(att[0], rng, job.difficulty.nuisance, photons * 0.6)
        return np.stack([to_uint16(high), to_uint16(low)]), goods
    return to_uint16(detect(0.5 * (att[0] + att[1]), rng, job.difficulty.nuisance, photons))[None], goods


def scan_and_goods(job: ImageJob) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The whole scan (as render_planes) and where the goods lie in it, (x0, y0, x1, y1) in pixels: what a
    detector's regions should cover (benchmarks/tdr_regions.py)."""
    return _scan(job, job.dual_energy)


def render_planes(job: ImageJob) -> np.ndarray:
    """The scan as uint16: 1 x H x W (single energy, mean of the two mu) or 2 x H x W (high, low)."""
    return _scan(job, job.dual_energy)[0]


# ------------------------------------------------------------------------------------ console export

SINGLE_STYLES = tuple(style for style in EXPORT_STYLES if style != "mixed")
# Consoles save their JPEGs at about this quality (and so do we, pseudo-colour included).
JPEG_QUALITY = 90
# The 8-bit display window, in detector counts: the dark offset (300, nothing gets through) to the open
# beam (62300, air), mapped linearly to 0..255, with no gamma. That is a console's default "full range"
# view: air is white, opaque black, and grey levels stay proportional to transmission, as in the 16-bit
# export, so the evidence a model learns from keeps its contrast in every form.
DISPLAY_WINDOW = (300.0, 62300.0)
# Pseudo-colour hue (degrees) at anchor values of the low/high attenuation ratio, interpolated between:
# orange for organics (ratio up to 1.6, so paper and cardboard at 1.5-1.55 stay orange despite noise),
# through yellow to green for mixed and minerals (2-2.5), to blue for metals (3 and above).
HUE_ANCHORS = ((0.0, 30.0), (1.6, 30.0), (2.0, 120.0), (2.5, 120.0), (3.0, 220.0), (1e9, 220.0))
# Attenuation (-ln T at the high energy) below which the material estimate is noise: drawn unsaturated.
MIN_COLOUR_ATT, FULL_COLOUR_ATT = 0.03, 0.18


def export_rng(job: ImageJob) -> np.random.Generator:
    """The image's own stream for its export style and crop: depends on (seed, index), never the label."""
    return rng_for(job.seed, job.index, STREAM_EXPORT)


def to_display8(counts: np.ndarray) -> np.ndarray:
    """16-bit detector counts to an 8-bit display image through DISPLAY_WINDOW."""
    low, high = DISPLAY_WINDOW
    unit = (counts.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def pseudo_colour(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """A dual-energy scan (uint16 counts, H x W each) as a baggage scanner's colour view, H x W x 3 uint8.

    Mapping, per pixel, from the transmissions T = (counts - 300) / 62000 at each energy:
    - material: the attenuation ratio r = ln(T_low) / ln(T_high) = mu_low / mu_high, after a small blur of
      both attenuations (consoles smooth their material estimate too). Hue follows HUE_ANCHORS: orange
      (30 deg) for organics (r ~1.4-1.55, up to 1.6: tablets, sugar, plastic, paper, cardboard), through
      yellow to green (120 deg) for mixed and minerals (r 2-2.5: talc, gypsum, sand, glass, aluminium),
      to blue (220 deg) for metals (r >= 3: battery stacks, steel, copper), linear in r between.
    - saturation: grows with the high-energy attenuation from 0 at -ln T_high = 0.03 to 0.9 at 0.18, so air
      and the noise around it stay white instead of speckled with colour.
    - brightness: sqrt(T_high), so thick goods darken but keep their hue visible.
    """
    unit_high = np.clip((high.astype(np.float32) - 300.0) / 62000.0, 1e-4, 1.0)
    unit_low = np.clip((low.astype(np.float32) - 300.0) / 62000.0, 1e-4, 1.0)
    # two passes of the point-spread kernel (a 5-tap binomial): shot noise on thin cardboard would
    # otherwise speckle the hue between orange and yellow
    att_high = _blur_small(_blur_small(-np.log(unit_high)))
    att_low = _blur_small(_blur_small(-np.log(unit_low)))
    ratio = att_low / np.maximum(att_high, MIN_COLOUR_ATT)
    anchors = np.array(HUE_ANCHORS, dtype=np.float32)
    hue = np.interp(ratio, anchors[:, 0], anchors[:, 1]) / 360.0
    saturation = 0.9 * np.clip((att_high - MIN_COLOUR_ATT) / (FULL_COLOUR_ATT - MIN_COLOUR_ATT), 0.0, 1.0)
    value = np.sqrt(unit_high)
    planes = (hue, saturation, value)
    hsv = [Image.fromarray(np.round(plane * 255.0).astype(np.uint8), "L") for plane in planes]
    return np.asarray(Image.merge("HSV", hsv).convert("RGB"))


# Crops never exceed this fraction of --size in either dimension: every scene's short side is at least
# 0.54 of its long side (parcels 35/65 cm, containers 0.55), so a crop always fits whole and its size is
# a function of the draws and --size alone. Clipping it to the image instead would pass on the image's
# own shape, which a counterfeit packing can change when its carton grows the parcel.
CROP_BOUND = 0.5
FULL_SCAN, SMALL_PATCH = 0.2, 0.3  # shares of crops that are the whole scan, and 32-64 px patches


def crop_box(
    rng: np.random.Generator, size: int, shape: tuple[int, int], goods: tuple[int, int, int, int]
) -> tuple[int, int, int, int] | None:
    """A crop (x0, y0, w, h) of an H x W scan as consoles export regions, or None for the whole scan.

    Aspect 1:3 to 3:1; 30% are patches with a 32-64 px short side, half are regions up to CROP_BOUND x
    size. The same draws happen whatever the outcome, and size and aspect depend on rng and `size` only
    (the same for both labels). The crop is centred within the goods box (x0, y0, x1, y1), so the
    evidence stays in view: the goods fill it, or it holds all of them along an axis where it is larger.
    """
    outcome, aspect = rng.random(), float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))  # aspect: w / h
    short, fraction = rng.uniform(32, 64), rng.uniform(0.3, 1.0)
    jitter_x, jitter_y = rng.uniform(-1, 1, 2)
    if outcome < FULL_SCAN:
        return None
    bound = max(1, int(CROP_BOUND * size))
    if outcome < FULL_SCAN + SMALL_PATCH:
        w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        long = fraction * bound
        w, h = (long, long / aspect) if aspect >= 1 else (long * aspect, long)
    height, width = shape
    # the image bound never binds for generated scenes (see CROP_BOUND); it guards odd callers
    cw = min(width, int(np.clip(round(w), min(32, bound), bound)))
    ch = min(height, int(np.clip(round(h), min(32, bound), bound)))
    gx0, gy0, gx1, gy1 = goods
    cx = (gx0 + gx1) / 2 + jitter_x * max(0.0, (gx1 - gx0 - cw) / 2)
    cy = (gy0 + gy1) / 2 + jitter_y * max(0.0, (gy1 - gy0 - ch) / 2)
    x0 = int(np.clip(round(cx - cw / 2), 0, width - cw))
    y0 = int(np.clip(round(cy - ch / 2), 0, height - ch))
    return x0, y0, cw, ch


def _encode(image: np.ndarray, kind: str) -> bytes:
    """An 8-bit L or RGB array as PNG or JPEG."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if kind == "png":
        pil.save(buffer, "PNG", compress_level=1)  # noisy scans barely compress: favour speed
    else:
        pil.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _encode_16bit(planes: np.ndarray) -> tuple[bytes, str, dict]:
    """A 16-bit PNG, or with two planes a 2-page 16-bit TIFF (page 0 high, page 1 low)."""
    if planes.shape[0] == 1:
        return encode_png16(planes[0]), ".png", {}
    import tifffile

    buffer = io.BytesIO()
    # large scans get deflate (tifffile reads it without extra codecs); small ones stay fast to write
    big = planes[0].size > 1 << 20
    tifffile.imwrite(
        buffer,
        planes,
        photometric="minisblack",
        compression="zlib" if big else None,
        compressionargs={"level": 1} if big else None,
    )
    return buffer.getvalue(), ".tiff", {"energies": ["high", "low"]}


def export(planes: np.ndarray, style: str) -> tuple[bytes, str, dict]:
    """Writes uint16 planes (1 or 2 x H x W) in a console style (one of SINGLE_STYLES).

    png16 keeps both planes of a dual-energy scan (a 2-page TIFF); the 8-bit grey styles show the first
    plane (the high energy of a dual scan: what a console's grey view shows); pseudo-colour needs both.
    """
    if style == "png16":
        return _encode_16bit(planes)
    if style == "pseudo-colour":
        if planes.shape[0] != 2:
            raise ValueError("pseudo-colour needs a dual-energy scan (high and low planes).")
        return _encode(pseudo_colour(planes[0], planes[1]), "jpeg"), ".jpg", {}
    grey = to_display8(planes[0])
    if style == "grey8-png":
        return _encode(grey, "png"), ".png", {}
    if style == "grey8-jpeg":
        return _encode(grey, "jpeg"), ".jpg", {}
    if style == "rgb-grey-jpeg":
        return _encode(np.repeat(grey[..., None], 3, axis=2), "jpeg"), ".jpg", {}
    raise ValueError(f"Unknown export style {style!r}. Valid styles: {', '.join(EXPORT_STYLES)}.")


def render(job: ImageJob) -> tuple[bytes, str, dict]:
    """One scan in the job's export style; meta names the style, and the crop (x0, y0, w, h) if cropped.

    Default (png16, no crop): a 16-bit PNG, or with dual energy a 2-page 16-bit TIFF (high, low).
    """
    rng = export_rng(job)
    drawn = SINGLE_STYLES[int(rng.integers(len(SINGLE_STYLES)))]  # always drawn, so crops draw alike
    style = drawn if job.export_style == "mixed" else job.export_style
    planes, goods = _scan(job, job.dual_energy or style == "pseudo-colour")
    meta: dict[str, Any] = {"export_style": style}
    cropped = job.crops or job.export_style == "mixed"
    box = crop_box(rng, job.size, (planes.shape[1], planes.shape[2]), goods) if cropped else None
    if box is not None:  # None: the whole scan, as consoles also send
        x0, y0, w, h = box
        planes = planes[:, y0 : y0 + h, x0 : x0 + w]
        meta["crop"] = [x0, y0, w, h]
    data, suffix, more = export(planes, style)
    return data, suffix, {**more, **meta}


def _unit(image: np.ndarray) -> np.ndarray:
    scale = 255.0 if image.dtype == np.uint8 else 65535.0
    return image.astype(np.float32) / scale


def preview_tile(data: bytes, tile: int) -> np.ndarray:
    """An 8-bit RGB view fitted to the tile: grey, colour as exported, or pseudo-colour for dual energy."""
    from verity.inference.decode import decode_image

    image = decode_image(data)
    if image.shape[2] == 2:
        view = pseudo_colour(image[..., 0], image[..., 1])
    else:
        view = (np.clip(_unit(image), 0, 1) * 255).astype(np.uint8)
        if view.shape[2] == 1:
            view = np.repeat(view, 3, axis=2)
    pil = Image.fromarray(view)
    # small crops are scaled up too, so a 32 px patch is not a speck on the grid
    scale = tile / max(pil.width, pil.height)
    pil = pil.resize(
        (max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.Resampling.BILINEAR
    )
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(pil, ((tile - pil.width) // 2, (tile - pil.height) // 2))
    return np.asarray(canvas)
