"""Bodies of /v1/references (api/routes/references.py): the right holder's genuine references per product."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from verity.api.schemas import ModelRef


# Genuine references per product (/v1/references, api/routes/references.py).
class ReferenceCalibration(BaseModel):
    """A product's leave-one-out calibration of its reference distance (threshold None: it abstains)."""

    product: str
    status: Literal["calibrated", "abstains"]
    threshold: float | None = Field(description="Distance to the nearest reference beyond which: mismatch.")
    spread: float | None = Field(description="Standard deviation of the leave-one-out distances.")
    references: int
    min_references: int = Field(description="Fewer references than this: the check abstains.")
    false_alarm_rate: float = Field(description="Share of genuine images the threshold is set to flag.")
    loo_distances: dict[str, float | None] | None = Field(
        description="mean, std, min, median, max of each reference's distance to its nearest other one."
    )


class ReferenceProvenance(BaseModel):
    reference_id: str
    product: str
    sha256: str
    ext: str
    actor: str | None = Field(description="The API key id, or cli:<user> for `verity refs`.")
    role: str | None
    created: str
    source: str | None = Field(description="The uploaded file's name, or the CLI path.")


class EnrolmentError(BaseModel):
    code: str
    message: str


class EnrolmentResult(BaseModel):
    index: int
    filename: str | None
    status: Literal["added", "duplicate", "refused"]
    reference_id: str | None = None
    sha256: str | None = None
    error: EnrolmentError | None = None


class ReferencesEnrolled(BaseModel):
    model: ModelRef
    product: str
    results: list[EnrolmentResult]
    calibration: ReferenceCalibration | None


class ProductReferences(BaseModel):
    product: str
    references: int
    calibration: ReferenceCalibration | None


class ReferencesListing(BaseModel):
    model: ModelRef
    products: list[ProductReferences] | None = Field(None, description="Without product=: every product.")
    product: str | None = None
    calibration: ReferenceCalibration | None = None
    references: list[ReferenceProvenance] | None = Field(None, description="With product=: its references.")


class ReferenceRemoved(BaseModel):
    model: ModelRef
    removed: ReferenceProvenance
    calibration: ReferenceCalibration | None = Field(description="The product's calibration without it.")
