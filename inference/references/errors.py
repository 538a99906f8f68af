"""The reference store's errors, each a ValueError with a message fit for the user.

They live apart from the store so that the names, the check, the events log and the store can all
raise them without importing one another in a circle.
"""

from __future__ import annotations


class ReferenceStoreError(ValueError):
    """A reference operation that cannot be done, with a message fit for the user."""


class InvalidName(ReferenceStoreError):
    """A product or model name the store does not accept."""


class ReferenceConflict(ReferenceStoreError):
    """The image is already a genuine reference of another product."""

    def __init__(self, product: str, reference_id: str) -> None:
        super().__init__(
            f"This image is already enrolled as genuine reference {reference_id} of product {product!r}; "
            "one image can be a reference of one product only (remove it there first)."
        )
        self.product = product
        self.reference_id = reference_id


class UnknownReference(ReferenceStoreError):
    """No active reference has this id."""


class UnknownProduct(ReferenceStoreError):
    """The product has no (active) genuine references for this model; `known` are those that do."""

    def __init__(self, product: str, known: list[str], model_name: str = "") -> None:
        names = ", ".join(known[:50]) + (f" and {len(known) - 50} more" if len(known) > 50 else "")
        where = f" for model {model_name}" if model_name else ""
        super().__init__(
            f"No genuine references of product {product!r}{where}. "
            + (f"Known products: {names}." if known else "No product has references yet.")
        )
        self.product = product
        self.known = known


class NoEmbedding(ReferenceStoreError):
    """The model has no embedding output, so it cannot compare images with references."""
