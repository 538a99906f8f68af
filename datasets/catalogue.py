"""The brand catalogue of the synthetic photos: fictitious brands and products, each a genuine design.

A brand fixes its colour, text colour, logo geometry and how it sets its name (FontStyle); a product adds
its line, package shape and colours and the 12 digits of its EAN-13 code. datasets/synth_photo.py prints
these designs, and a counterfeit deviates from them in its cues.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FontStyle:
    """How a brand sets its name: FreeType outline (or the blocky bitmap font), weight, width, slant."""

    bitmap: bool = False
    stroke: int = 0
    width: float = 1.0
    shear: float = 0.0


@dataclass(frozen=True)
class Brand:
    name: str
    colour: tuple[int, int, int]
    text_colour: tuple[int, int, int]
    logo: str
    logo_params: tuple[float, ...]
    font: FontStyle


@dataclass(frozen=True)
class Product:
    brand: Brand
    line: str
    shape: str
    package_colour: tuple[int, int, int]
    label_colour: tuple[int, int, int]
    ean12: str


BRANDS = {
    "solvex": Brand("SOLVEX", (200, 30, 45), (255, 255, 255), "ring", (0.28, 0.35, 0.0), FontStyle(stroke=1)),
    "aurelo": Brand(
        "AURELO", (30, 90, 170), (255, 255, 255), "star", (5.0, 0.45, 0.0), FontStyle(width=1.1, shear=0.2)
    ),
    "kestra": Brand(
        "KESTRA", (240, 170, 20), (30, 30, 30), "triangle", (0.32, 0.0, 0.0), FontStyle(stroke=1, width=0.85)
    ),
    "velmor": Brand("VELMOR", (30, 130, 70), (255, 255, 255), "chevron", (0.22, 0.5, 0.0), FontStyle()),
}

PRODUCT_SPECS: dict[str, Product] = {
    "solvex-tablets": Product(
        BRANDS["solvex"], "Ibuprofen 200 mg", "box", (235, 235, 238), (250, 250, 250), "590123412345"
    ),
    "solvex-syrup": Product(
        BRANDS["solvex"], "Cough Syrup", "bottle", (120, 60, 30), (252, 250, 245), "590123498761"
    ),
    "aurelo-cream": Product(
        BRANDS["aurelo"], "Day Cream SPF15", "tube", (225, 230, 240), (250, 250, 252), "400638133393"
    ),
    "aurelo-serum": Product(
        BRANDS["aurelo"], "Night Serum", "bottle", (40, 40, 60), (245, 245, 250), "400638154321"
    ),
    "kestra-cells": Product(
        BRANDS["kestra"], "AA Alkaline x4", "box", (40, 40, 45), (250, 248, 240), "871234567890"
    ),
    "kestra-charger": Product(
        BRANDS["kestra"], "USB-C Charger", "pouch", (210, 210, 215), (250, 250, 250), "871234511116"
    ),
    "velmor-coffee": Product(
        BRANDS["velmor"], "Espresso Beans", "pouch", (60, 45, 35), (245, 240, 225), "761234500017"
    ),
    "velmor-tea": Product(
        BRANDS["velmor"], "Green Tea 20", "box", (240, 245, 235), (250, 252, 248), "761234500024"
    ),
}
