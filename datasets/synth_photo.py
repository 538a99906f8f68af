"""Synthetic product photos: fictitious brands, each with a genuine design spec, and counterfeits.

The brands and products are datasets/catalogue.py; the barcode they print is datasets/ean13.py. This
module draws the label, the package and the photograph.

A photo shows one package (box, bottle, pouch or tube) on a background. Its label carries the brand band
and name (brand colour and font), a logo of a given geometry, the product line, a batch/expiry print, an
EAN-13 barcode and a hologram patch. Counterfeits deviate from the spec in one to three cues (CUES); the
cues a shipment carries and how they look are drawn per case, so every photo of a counterfeit shipment
shows the same defect. Pose, lighting, glare, noise, blur and JPEG quality are drawn per image from the
same distributions for both labels.

Cue sizes are relative to the image, so they survive the resize to the model's 224 px.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from verity.datasets.catalogue import PRODUCT_SPECS, FontStyle, Product
from verity.datasets.ean13 import ean13_barcode, ean13_check_digit
from verity.datasets.synth import STREAM_CASE, ImageJob, case_rng, image_rng, rng_for

CUES = (
    "colour_shift",
    "logo_geometry",
    "font_substitution",
    "misspelling",
    "blurred_reprint",
    "registration_offset",
    "hologram",
    "barcode_check",
    "misplaced_label",
)
PRODUCTS = tuple(PRODUCT_SPECS)


def cues_for(product: str) -> tuple[str, ...]:
    """Every photo cue applies to every product."""
    return CUES


def printed_ean(job: ImageJob, product: Product) -> str:
    """The code printed on the package: correct, or with a wrong check digit under that cue."""
    check = ean13_check_digit(product.ean12)
    if "barcode_check" in job.case.cues:
        check = (check + 1 + job.case.number % 9) % 10  # never the right one
    return product.ean12 + str(check)


# ------------------------------------------------------------------------------------------- drawing


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


@lru_cache(maxsize=1024)
def _text_mask(text: str, height: int, style: FontStyle) -> Image.Image:
    """The text as an "L" mask about `height` px tall, in the given style (cached: never modified)."""
    if style.bitmap:
        bitmap = ImageFont.load_default_imagefont()
        left, top, right, bottom = bitmap.getbbox(text)
        small = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(small).text((1 - left, 1 - top), text, fill=255, font=bitmap)
        mask = small.resize(
            (max(1, round(small.width * height / small.height)), height), Image.Resampling.NEAREST
        )
    else:
        font = _font(round(height * 1.25))
        left, top, right, bottom = (int(v) for v in font.getbbox(text, stroke_width=style.stroke))
        mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(mask).text(
            (1 - left, 1 - top), text, fill=255, font=font, stroke_width=style.stroke, stroke_fill=255
        )
    width = max(1, round(mask.width * style.width))
    if width != mask.width:
        mask = mask.resize((width, mask.height), Image.Resampling.BILINEAR)
    if style.shear:
        extra = round(abs(style.shear) * mask.height)
        mask = mask.transform(
            (mask.width + extra, mask.height),
            Image.Transform.AFFINE,
            (1, style.shear, -extra if style.shear > 0 else 0, 0, 1, 0),
            Image.Resampling.BILINEAR,
        )
    return mask


def _put_text(
    canvas: Image.Image,
    text: str,
    box: tuple[int, int, int, int],
    colour: tuple,
    style: FontStyle,
    align: str = "centre",
) -> None:
    """Draws text fitted into box (x0, y0, x1, y1), keeping its aspect ratio."""
    x0, y0, x1, y1 = box
    mask = _text_mask(text, max(4, y1 - y0), style)
    if mask.width > x1 - x0:
        mask = mask.resize(
            (x1 - x0, max(1, round(mask.height * (x1 - x0) / mask.width))), Image.Resampling.BILINEAR
        )
    x = x0 + ((x1 - x0) - mask.width) // 2 if align == "centre" else x0
    y = y0 + ((y1 - y0) - mask.height) // 2
    canvas.paste(Image.new("RGB", mask.size, colour), (x, y), mask)


def _logo_polygons(kind: str, params: tuple[float, ...], size: int) -> list[tuple[str, list]]:
    """The logo as (fill|hole, polygon) shapes in a size x size box."""
    c, r = size / 2, size / 2 * 0.95

    def circle(radius: float, cx: float = c, cy: float = c, n: int = 40) -> list:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return list(zip(cx + radius * np.cos(t), cy + radius * np.sin(t), strict=True))

    if kind == "ring":
        thickness, dot, offset = params
        return [
            ("fill", circle(r)),
            ("hole", circle(r * (1 - thickness))),
            ("fill", circle(r * dot, c + offset * r, c)),
        ]
    if kind == "star":
        points, inner, rotation = params
        k = max(3, round(points))
        t = np.arange(2 * k) * np.pi / k - np.pi / 2 + rotation
        radii = np.where(np.arange(2 * k) % 2 == 0, r, r * inner)
        return [("fill", list(zip(c + radii * np.cos(t), c + radii * np.sin(t), strict=True)))]
    if kind == "triangle":
        hole, skew, _ = params
        triangle = [(c + skew * r, c - r), (c + r, c + 0.8 * r), (c - r, c + 0.8 * r)]
        return [("fill", triangle), ("hole", circle(r * hole, c, c + 0.25 * r))]
    if kind == "chevron":
        thickness, depth, gap = params
        shapes = []
        for k in range(2):
            row_top = c - 0.8 * r + k * (0.8 + gap) * r
            outer = [(c - r, row_top), (c, row_top + depth * r), (c + r, row_top)]
            lower = [
                (c + r, row_top + thickness * 2 * r),
                (c, row_top + (depth + 2 * thickness) * r),
                (c - r, row_top + thickness * 2 * r),
            ]
            shapes.append(("fill", outer + lower))
        return shapes
    raise ValueError(f"Unknown logo kind {kind!r}.")


def _draw_logo(
    canvas: Image.Image, kind: str, params: tuple, box: tuple[int, int, int], colour: tuple, background: tuple
) -> None:
    x, y, size = box
    draw = ImageDraw.Draw(canvas)
    for what, polygon in _logo_polygons(kind, params, size):
        draw.polygon([(x + px, y + py) for px, py in polygon], fill=colour if what == "fill" else background)


def _perturbed_logo(kind: str, params: tuple[float, ...], strength: float, rng: np.random.Generator) -> tuple:
    """Logo geometry off the spec by an amount that grows with strength."""
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    a, b, c = params
    if kind == "ring":
        return (
            a * (1 + sign() * 0.7 * strength),
            b * (1 + sign() * 0.7 * strength),
            sign() * 0.35 * strength,
        )
    if kind == "star":
        points = a + (sign() if strength >= 0.5 else 0.0)
        return (points, float(np.clip(b + sign() * 0.3 * strength, 0.15, 0.85)), 0.6 * strength * sign())
    if kind == "triangle":
        return (a * (1 + sign() * 0.8 * strength), sign() * 0.6 * strength, c)
    if kind == "chevron":
        return (a * (1 + sign() * 0.7 * strength), b + sign() * 0.5 * strength, 0.25 * strength)
    raise ValueError(f"Unknown logo kind {kind!r}.")


def _hologram(size: int, phase: float, saturation: float, pattern: float) -> Image.Image:
    """An iridescent patch: hue sweeping diagonally (phase = viewing angle) with fine diffraction rings."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    hue = (1.5 * (xx + yy) + phase) % 1.0
    rings = 0.5 + 0.5 * np.sin(np.hypot(xx - 0.3, yy - 0.6) * 60.0)
    value = 0.78 + 0.22 * pattern * rings
    rgb = _hsv_to_rgb(hue, np.full_like(hue, saturation), value)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6.0).astype(np.int32) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,), dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        out[m, 0], out[m, 1], out[m, 2] = r[m], g[m], b[m]
    return out


_SIMILAR = {
    "O": "Q",
    "E": "F",
    "I": "L",
    "N": "M",
    "A": "R",
    "S": "5",
    "L": "I",
    "V": "W",
    "X": "K",
    "K": "X",
    "R": "P",
    "M": "N",
    "T": "I",
    "U": "V",
    "C": "G",
    "e": "c",
    "a": "o",
    "o": "a",
    "i": "l",
}


def misspell(text: str, edits: int, rng: np.random.Generator) -> str:
    """Text with `edits` plausible misprints (similar letter, swapped pair, dropped or doubled letter)."""
    chars = list(text)
    for _ in range(edits):
        letters = [i for i, ch in enumerate(chars) if ch.isalpha()]
        if len(letters) < 3:
            break
        i = letters[int(rng.integers(1, len(letters)))]
        op = int(rng.integers(4))
        if op == 0 and chars[i] in _SIMILAR:
            chars[i] = _SIMILAR[chars[i]]
        elif op == 1 and i + 1 < len(chars) and chars[i + 1] != chars[i]:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == 2:
            del chars[i]
        else:
            chars.insert(i, chars[i])
    result = "".join(chars)
    return result if result != text else text[:1] + text[2:]


# ------------------------------------------------------------------------------------------- label


@dataclass(frozen=True)
class LabelLook:
    """The label as this case prints it: the spec, or the spec with the counterfeit's deviations."""

    brand_colour: tuple[int, int, int]
    brand_text: str
    line_text: str
    font: FontStyle
    logo_params: tuple[float, ...]
    hologram_saturation: float  # 1 = genuine foil
    hologram_present: bool
    reprint: float  # 0 = crisp print; otherwise blur strength
    registration: tuple[int, int]  # offset of one ink in label-relative 1/1000
    misplace: tuple[float, float, float]  # dx, dy (fraction of the label), rotation degrees


def label_look(job: ImageJob, product: Product) -> LabelLook:
    """The case's label design, with per-image jitter only in the cue strength."""
    brand, cues = product.brand, set(job.case.cues)
    rng = case_rng(job)
    strength = job.difficulty.photo_strength * float(image_rng(job).uniform(0.85, 1.15))
    look = LabelLook(
        brand.colour,
        brand.name,
        product.line,
        brand.font,
        brand.logo_params,
        1.0,
        True,
        0.0,
        (0, 0),
        (0.0, 0.0, 0.0),
    )
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    if "colour_shift" in cues:
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in brand.colour))
        h = (h + sign() * 40.0 * strength / 360.0) % 1.0
        v = float(np.clip(v * (1 + sign() * 0.2 * strength), 0.1, 1.0))
        red, green, blue = (round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))
        look = replace(look, brand_colour=(red, green, blue))
    if "logo_geometry" in cues:
        look = replace(look, logo_params=_perturbed_logo(brand.logo, brand.logo_params, strength, rng))
    if "font_substitution" in cues:
        look = replace(look, font=_substitute_font(brand.font, strength, rng))
    if "misspelling" in cues:
        edits = max(1, round(3 * strength))
        look = replace(
            look,
            brand_text=misspell(brand.name, edits, rng),
            line_text=misspell(product.line, max(1, edits - 1), rng),
        )
    if "hologram" in cues:
        present = strength < 0.8 or rng.random() < 0.5
        look = replace(look, hologram_present=present, hologram_saturation=max(0.0, 1 - 1.6 * strength))
    if "blurred_reprint" in cues:
        look = replace(look, reprint=strength)
    if "registration_offset" in cues:
        offset = 6 + 22 * strength  # thousandths of the label width
        angle = rng.uniform(0, 2 * np.pi)
        look = replace(look, registration=(round(offset * np.cos(angle)), round(offset * np.sin(angle))))
    if "misplaced_label" in cues:
        look = replace(
            look,
            misplace=(
                sign() * (0.03 + 0.12 * strength),
                sign() * (0.02 + 0.08 * strength),
                sign() * (1.5 + 6.0 * strength),
            ),
        )
    return look


def _substitute_font(genuine: FontStyle, strength: float, rng: np.random.Generator) -> FontStyle:
    if strength >= 0.75 and rng.random() < 0.5:
        return FontStyle(bitmap=True, width=genuine.width)
    return FontStyle(
        stroke=0 if genuine.stroke else 1 + (strength >= 0.75),
        width=genuine.width * (1 + (0.15 + 0.35 * strength) * (1 if rng.random() < 0.5 else -1)),
        shear=genuine.shear - (0.1 + 0.25 * strength) * (1 if genuine.shear > 0.05 else -1),
    )


def render_label(
    product: Product, look: LabelLook, width: int, lot: str, ean: str, holo_phase: float
) -> Image.Image:
    """The flat label print, width x (0.62 width) px."""
    height = round(width * 0.62)
    label = Image.new("RGB", (width, height), product.label_colour)
    draw = ImageDraw.Draw(label)
    band = round(height * 0.3)
    draw.rectangle((0, 0, width, band), fill=look.brand_colour)
    _put_text(
        label,
        look.brand_text,
        (round(0.08 * width), round(0.16 * band), round(0.92 * width), round(0.84 * band)),
        product.brand.text_colour,
        look.font,
    )
    logo = round(0.34 * height)
    _draw_logo(
        label,
        product.brand.logo,
        look.logo_params,
        (round(0.05 * width), band + round(0.06 * height), logo),
        look.brand_colour,
        product.label_colour,
    )
    text_x = round(0.05 * width) + logo + round(0.05 * width)
    _put_text(
        label,
        look.line_text,
        (text_x, band + round(0.08 * height), width - round(0.04 * width), band + round(0.2 * height)),
        (40, 40, 40),
        FontStyle(),
        align="left",
    )
    _put_text(
        label,
        lot,
        (text_x, band + round(0.25 * height), width - round(0.04 * width), band + round(0.32 * height)),
        (70, 70, 70),
        FontStyle(),
        align="left",
    )
    bar_w, bar_h = round(0.5 * width), round(0.2 * height)
    label.paste(
        ean13_barcode(ean, bar_w, bar_h).convert("RGB"),
        (round(0.04 * width), height - bar_h - round(0.04 * height)),
    )
    holo = round(0.3 * height)
    holo_xy = (width - holo - round(0.06 * width), height - holo - round(0.05 * height))
    if look.hologram_present:
        patch = _hologram(holo, holo_phase, 0.85 * look.hologram_saturation, look.hologram_saturation)
        label.paste(patch, holo_xy)
    return _print_defects(label, look)


def _print_defects(label: Image.Image, look: LabelLook) -> Image.Image:
    """The label as the counterfeiter's press prints it: a blurred reprint, one ink off register."""
    width, height = label.size
    if look.reprint > 0:
        factor = 1 + 2.5 * look.reprint
        small = label.resize(
            (max(8, round(width / factor)), max(8, round(height / factor))), Image.Resampling.BILINEAR
        )
        label = small.resize((width, height), Image.Resampling.BILINEAR).filter(
            ImageFilter.GaussianBlur(0.6 * look.reprint)
        )
    if look.registration != (0, 0):
        dx, dy = (round(v * width / 1000) for v in look.registration)
        array = np.asarray(label).copy()
        array[..., 0] = np.roll(array[..., 0], (dy, dx), axis=(0, 1))  # one ink printed off register
        label = Image.fromarray(array)
    return label


# ------------------------------------------------------------------------------------------ package


def _package(product: Product, label: Image.Image, look: LabelLook) -> Image.Image:
    """The package front (RGBA, transparent around its shape) with the label applied."""
    lw, lh = label.size
    shape = product.shape
    pw = round(lw * (1.18 if shape != "bottle" else 1.12))
    ph = round(lh * {"box": 1.9, "bottle": 2.3, "pouch": 2.0, "tube": 2.2}[shape])
    package = Image.new("RGBA", (pw, ph), (0, 0, 0, 0))
    centre = _draw_body(ImageDraw.Draw(package), shape, (pw, ph), product.package_colour)
    dx, dy, angle = look.misplace
    rgba = label.convert("RGBA")
    if angle:
        rgba = rgba.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    x = round(centre[0] + dx * lw - rgba.width / 2)
    y = round(centre[1] + dy * lh - rgba.height / 2)
    package.alpha_composite(rgba, (max(0, x), max(0, y)))
    # keep the label inside the package outline
    alpha = np.asarray(package.getchannel("A"))
    outline = np.asarray(_outline_alpha(draw_shape=shape, size=package.size))
    package.putalpha(Image.fromarray(np.minimum(alpha, outline)))
    if shape in ("bottle", "tube"):
        package = _cylinder_shading(package)
    return package


def _draw_body(
    draw: ImageDraw.ImageDraw, shape: str, size: tuple[int, int], package_colour: tuple[int, int, int]
) -> tuple[float, float]:
    """Draws the package's body (box, bottle, pouch or tube); returns where the label's centre goes."""
    pw, ph = size
    colour = package_colour + (255,)
    darker = tuple(round(c * 0.7) for c in package_colour) + (255,)
    if shape == "box":
        side = round(0.08 * pw)
        draw.rectangle((0, side, pw - side, ph), fill=colour)
        draw.polygon([(pw - side, side), (pw, 0), (pw, ph - side), (pw - side, ph)], fill=darker)
        draw.polygon(
            [(0, side), (side, 0), (pw, 0), (pw - side, side)],
            fill=tuple(min(255, round(c * 1.1)) for c in colour),
        )
        return ((pw - side) / 2, side + (ph - side) * 0.52)
    elif shape == "bottle":
        neck = round(0.34 * pw)
        draw.rectangle(((pw - neck) // 2, 0, (pw + neck) // 2, round(0.14 * ph)), fill=(30, 30, 30, 255))
        draw.rectangle(
            ((pw - neck) // 2 + 2, round(0.12 * ph), (pw + neck) // 2 - 2, round(0.22 * ph)), fill=colour
        )
        draw.rounded_rectangle((0, round(0.2 * ph), pw - 1, ph - 1), radius=round(0.15 * pw), fill=colour)
        return (pw / 2, ph * 0.6)
    elif shape == "pouch":
        draw.rounded_rectangle((0, round(0.06 * ph), pw - 1, ph - 1), radius=round(0.05 * pw), fill=colour)
        teeth = np.linspace(0, pw, 25)
        zigzag = [(x, round(0.06 * ph) - (3 if k % 2 else 0)) for k, x in enumerate(teeth)]
        draw.polygon([(0, round(0.1 * ph))] + zigzag + [(pw, round(0.1 * ph))], fill=darker)
        return (pw / 2, ph * 0.55)
    else:  # tube: crimped end on top, cap below
        draw.polygon(
            [
                (0, round(0.08 * ph)),
                (pw, round(0.08 * ph)),
                (pw * 0.92, round(0.88 * ph)),
                (pw * 0.08, round(0.88 * ph)),
            ],
            fill=colour,
        )
        for k in range(6):
            y = round(k * 0.013 * ph)
            draw.line((0, y, pw, y), fill=darker, width=max(1, round(0.006 * ph)))
        draw.rectangle(
            (round(0.3 * pw), round(0.88 * ph), round(0.7 * pw), ph - 1), fill=(240, 240, 240, 255)
        )
        return (pw / 2, ph * 0.45)


def _outline_alpha(draw_shape: str, size: tuple[int, int]) -> Image.Image:
    pw, ph = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if draw_shape == "bottle":
        neck = round(0.34 * pw)
        draw.rectangle(((pw - neck) // 2, 0, (pw + neck) // 2, round(0.22 * ph)), fill=255)
        draw.rounded_rectangle((0, round(0.2 * ph), pw - 1, ph - 1), radius=round(0.15 * pw), fill=255)
    elif draw_shape == "tube":
        draw.rectangle((0, 0, pw, round(0.08 * ph)), fill=255)
        draw.polygon(
            [
                (0, round(0.08 * ph)),
                (pw, round(0.08 * ph)),
                (pw * 0.92, round(0.88 * ph)),
                (pw * 0.08, round(0.88 * ph)),
            ],
            fill=255,
        )
        draw.rectangle((round(0.3 * pw), round(0.88 * ph), round(0.7 * pw), ph - 1), fill=255)
    else:
        draw.rectangle((0, 0, pw, ph), fill=255)
    return mask


def _cylinder_shading(package: Image.Image) -> Image.Image:
    array = np.asarray(package).astype(np.float32)
    x = np.linspace(-1, 1, array.shape[1], dtype=np.float32)
    profile = 0.72 + 0.28 * np.sqrt(np.clip(1 - x**2, 0, 1))
    array[..., :3] *= profile[None, :, None]
    return Image.fromarray(array.clip(0, 255).astype(np.uint8), "RGBA")


# ------------------------------------------------------------------------------------------- scene


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A table top, cloth or wall: colour field plus grain, built at quarter size and upsampled once."""
    kind = int(rng.integers(4))
    base = rng.uniform(40, 220, size=3).astype(np.float32)
    other = np.clip(base + rng.normal(0, 40, size=3), 0, 255).astype(np.float32)
    small = max(8, size // 4)
    ramp = np.linspace(0, 1, small, dtype=np.float32)
    yy, xx = ramp[:, None], ramp[None, :]
    if kind == 0:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    elif kind == 1:  # wood-like stripes
        t = 0.5 + 0.5 * np.sin(xx * rng.uniform(10, 30) + 2 * np.sin(yy * 3 + rng.uniform(0, 6)))
    elif kind == 2:  # cloth: blotches
        blotches = rng.random((4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray(blotches, "F").resize((small, small), Image.Resampling.BILINEAR))
    else:  # plain table
        t = np.full((small, small), 0.5, dtype=np.float32)
    t = np.broadcast_to(t, (small, small))[..., None]
    field = base * (1 - t) + other * t + _noise(rng, (small, small, 1)) * 6
    return Image.fromarray(field.clip(0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR
    )


def _perspective_coefficients(
    dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]
) -> list[float]:
    """PIL PERSPECTIVE data mapping output points dst onto input points src."""
    matrix, vector = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        matrix.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        matrix.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        vector += [u, v]
    return np.linalg.solve(np.array(matrix, dtype=np.float64), np.array(vector, dtype=np.float64)).tolist()


def _place(scene: Image.Image, package: Image.Image, rng: np.random.Generator, nuisance: float) -> None:
    """Pastes the package into the scene under a random perspective, with a soft shadow."""
    size = scene.width
    pw, ph = package.size
    scale = rng.uniform(0.78, 0.95) * size / max(pw, ph)
    w, h = pw * scale, ph * scale
    cx = size / 2 + rng.uniform(-1, 1) * (size - w) / 2 * 0.8
    cy = size / 2 + rng.uniform(-1, 1) * (size - h) / 2 * 0.8
    angle = np.deg2rad(rng.uniform(-12, 12) * nuisance)
    corners = np.array([(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = corners @ rotation.T + (cx, cy) + rng.normal(0, 0.035 * nuisance * size, (4, 2))
    src = [(0, 0), (pw, 0), (pw, ph), (0, ph)]
    # warp into the package's bounding box only: most of the frame is background
    x0, y0 = (max(0, int(np.floor(v))) for v in dst.min(axis=0))
    x1, y1 = (min(size, int(np.ceil(v)) + 1) for v in dst.max(axis=0))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    warped = package.transform(
        (x1 - x0, y1 - y0),
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients([(px - x0, py - y0) for px, py in dst], src),
        Image.Resampling.BILINEAR,
    )
    alpha = Image.new("L", (size, size), 0)
    alpha.paste(warped.getchannel("A"), (x0, y0))
    small = max(4, size // 12)  # a soft shadow: down- and up-sampling blurs as well as a Gaussian, faster
    shadow = alpha.resize((small, small), Image.Resampling.BILINEAR).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    offset = (round(rng.uniform(0.01, 0.04) * size), round(rng.uniform(0.01, 0.04) * size))
    scene.paste((0, 0, 0), offset, shadow.point(lambda a: int(a * 0.45)))
    scene.paste(warped, (x0, y0), warped.getchannel("A"))


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed block of unit Gaussian noise; images take seeded slices of it (far cheaper than drawing)."""
    return np.random.default_rng(12345).standard_normal(1 << 22, dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    bank = _noise_bank()
    if count > bank.size // 2:
        return rng.standard_normal(shape, dtype=np.float32)
    start = int(rng.integers(0, bank.size - count))
    return bank[start : start + count].reshape(shape)


def _defocus(radius: float) -> ImageFilter.Filter:
    """Slight defocus: a fractional box blur for small radii, else a Gaussian."""
    if radius > 1.0:
        return ImageFilter.GaussianBlur(radius)
    return ImageFilter.BoxBlur(radius)  # one box pass: a third of GaussianBlur's cost, alike at this size


def _photograph(scene: Image.Image, rng: np.random.Generator, nuisance: float) -> np.ndarray:
    """Lighting, glare, defocus and sensor noise over the composed scene."""
    size = scene.width
    if rng.random() < 0.7:
        scene = scene.filter(_defocus(rng.uniform(0, 0.7) * nuisance * size / 256))
    array = np.asarray(scene, dtype=np.float32)
    light = rng.uniform(1 - 0.3 * nuisance, 1 + 0.3 * nuisance, (3, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray(light, "F").resize((size, size), Image.Resampling.BILINEAR))
    gains = (1 + rng.uniform(-0.07, 0.07, 3) * nuisance).astype(np.float32)
    array *= field[..., None]
    array *= gains
    if rng.random() < 0.6 * nuisance:
        gy, gx = rng.uniform(0.2, 0.8, 2) * size
        radius = rng.uniform(0.05, 0.15) * size
        ys = np.arange(size, dtype=np.float32)
        # a separable Gaussian spot: the outer product of two 1-D profiles
        glare = np.outer(
            np.exp(-(((ys - gy) * 1.6) ** 2) / (2 * radius**2)), np.exp(-((ys - gx) ** 2) / (2 * radius**2))
        )
        array += (glare * np.float32(rng.uniform(60, 160)))[..., None]
    sigma = np.float32(rng.uniform(1.0, 5.0) * nuisance)
    array += _noise(rng, array.shape) * sigma
    np.clip(array, 0, 255, out=array)
    return array.astype(np.uint8)


def render(job: ImageJob) -> tuple[bytes, str, dict]:
    """One photo as JPEG bytes, its suffix and the facts for the manifest's meta."""
    product = PRODUCT_SPECS[job.case.product]
    rng = image_rng(job)
    rng.uniform()  # the first draw is label_look's strength jitter
    crng = rng_for(job.seed, job.case.number, STREAM_CASE + 20)  # the shipment's lot and expiry
    size = job.size
    look = label_look(job, product)
    letter, number = chr(65 + int(crng.integers(26))), int(crng.integers(1000, 9999))
    lot = f"LOT {letter}{number}  EXP {int(crng.integers(1, 13)):02d}/{int(crng.integers(27, 31))}"
    ean = printed_ean(job, product)
    label = render_label(product, look, round(0.5 * size), lot, ean, float(rng.uniform(0, 1)))
    package = _package(product, label, look)
    scene = _background(rng, size)
    _place(scene, package, rng, job.difficulty.nuisance)
    pixels = _photograph(scene, rng, job.difficulty.nuisance)
    quality = int(rng.integers(round(95 - 35 * job.difficulty.nuisance), 96))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), ".jpg", {"ean": ean, "jpeg_quality": quality}


def preview_tile(data: bytes, tile: int) -> np.ndarray:
    """The photo scaled to tile x tile for the preview grid."""
    return np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
    )
