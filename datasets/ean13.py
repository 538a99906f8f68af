"""EAN-13 barcodes: check digit, the 95 bar modules of a code and back, and the bars as an image.

Synthetic packages print their code with these (datasets/synth_photo.py); the `barcode_check` cue prints
one with a wrong check digit, which a reader of the bars can tell from the code alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

_L_CODES = (
    "0001101",
    "0011001",
    "0010011",
    "0111101",
    "0100011",
    "0110001",
    "0101111",
    "0111011",
    "0110111",
    "0001011",
)
_G_CODES = tuple(code.translate(str.maketrans("01", "10"))[::-1] for code in _L_CODES)
_R_CODES = tuple(code.translate(str.maketrans("01", "10")) for code in _L_CODES)
_PARITY = ("LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG", "LGGLLG", "LGGGLG", "LGLGGL", "LGLGLG", "LGGLGL")


def ean13_check_digit(first12: str) -> int:
    """The EAN-13 check digit of 12 digits (weights 1, 3, 1, 3, ... from the left)."""
    if len(first12) != 12 or not first12.isdigit():
        raise ValueError(f"An EAN-13 body is 12 digits, not {first12!r}.")
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(first12))
    return (10 - total % 10) % 10


def ean13_is_valid(code: str) -> bool:
    return len(code) == 13 and code.isdigit() and ean13_check_digit(code[:12]) == int(code[12])


def ean13_modules(code: str) -> np.ndarray:
    """The 95 bar modules (1 = dark) of a 13-digit code, whatever its check digit."""
    if len(code) != 13 or not code.isdigit():
        raise ValueError(f"An EAN-13 code is 13 digits, not {code!r}.")
    parity = _PARITY[int(code[0])]
    bits = "101"
    for digit, side in zip(code[1:7], parity, strict=True):
        bits += (_L_CODES if side == "L" else _G_CODES)[int(digit)]
    bits += "01010"
    bits += "".join(_R_CODES[int(d)] for d in code[7:])
    bits += "101"
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")


def ean13_decode(modules: np.ndarray) -> str:
    """Reads 95 modules back to 13 digits (inverse of ean13_modules); raises ValueError if unreadable."""
    bits = "".join(str(int(b)) for b in modules)
    if len(bits) != 95 or bits[:3] != "101" or bits[45:50] != "01010" or bits[-3:] != "101":
        raise ValueError("Not an EAN-13 module pattern.")
    left, parity = "", ""
    for k in range(6):
        chunk = bits[3 + 7 * k : 10 + 7 * k]
        if chunk in _L_CODES:
            left, parity = left + str(_L_CODES.index(chunk)), parity + "L"
        elif chunk in _G_CODES:
            left, parity = left + str(_G_CODES.index(chunk)), parity + "G"
        else:
            raise ValueError("Unreadable left digit.")
    right = "".join(str(_R_CODES.index(bits[50 + 7 * k : 57 + 7 * k])) for k in range(6))
    return str(_PARITY.index(parity)) + left + right


@lru_cache(maxsize=256)
def ean13_barcode(code: str, width: int, height: int) -> Image.Image:
    """The bars of a 13-digit code as a width x height "L" image, quiet zones included (cached)."""
    modules = ean13_modules(code)
    row = np.repeat(np.pad(modules, 7), 4)  # quiet zone, 4 px per module, then resized (anti-aliased)
    bars = np.tile((1 - row) * 255, (8, 1)).astype(np.uint8)
    return Image.fromarray(bars).resize((width, height), Image.Resampling.BOX)
