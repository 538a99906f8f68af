"""The names the reference store accepts: a product's (it appears in every audit row and listing) and a
model's (it names a folder under the store's root)."""

from __future__ import annotations

import re

from verity.inference.references.errors import InvalidName
from verity.inference.vocabulary import NAME_MAX

PRODUCT_PATTERN = re.compile(rf"^[a-z0-9][a-z0-9._-]{{0,{NAME_MAX - 1}}}$")
# A model name becomes a folder name: no separators, no "..", no hidden folders.
MODEL_NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$")


def validate_product(product: str) -> str:
    """The product name, or InvalidName: it becomes part of every audit row and file listing."""
    if not isinstance(product, str) or not PRODUCT_PATTERN.fullmatch(product):
        shown = product if len(str(product)) <= NAME_MAX else str(product)[:NAME_MAX] + "..."
        raise InvalidName(
            f"Invalid product name {shown!r}: use 1-{NAME_MAX} characters, lower-case letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (e.g. acme-watch-x2)."
        )
    return product


def validate_model_name(name: str) -> str:
    """The model name, or InvalidName: it names a folder under the store's root."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidName(f"Invalid model name {str(name)[:NAME_MAX]!r} for the reference store.")
    return name
