"""Bodies of /v1/references (api/routes/references.py): the right holder's genuine references per product."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


# A right holder's product guide (/v1/products, api/routes/products.py): plain data, never markup.
LANGUAGE_TAG = r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-[A-Z]{2})?$"  # en, ru, kk, uz-Latn, en-GB
PHOTO_BASE64_MAX = 400_000  # characters: a photo of one feature, about 300 KB
GUIDE_POINTS_MAX = 20
# The body a guide may take: a photo with each point, and its texts (10 languages of 1,000 characters).
GUIDE_BODY_MAX = GUIDE_POINTS_MAX * (PHOTO_BASE64_MAX + 60_000) + 100_000


def plain_text(value: str) -> str:
    """Text as officers read it: no control characters but line breaks, no leading or trailing space."""
    if any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) < 0xA0 for c in value):
        raise ValueError("control characters are not allowed (plain text only)")
    if not value.strip():
        raise ValueError("empty text")
    return value.strip()


PlainText = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(plain_text)]
ShortText = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(plain_text)]


class GuidePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: dict[Annotated[str, Field(pattern=LANGUAGE_TAG)], PlainText] = Field(
        min_length=1, max_length=10, description="The point in one or more languages, by tag (en, ru, kk...)."
    )
    photo: str | None = Field(None, max_length=PHOTO_BASE64_MAX,
                              description="Base64 JPEG, PNG or WebP of the genuine feature.")  # fmt: skip


class GuideContact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ShortText
    email: str | None = Field(None, max_length=200, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    phone: str | None = Field(None, max_length=40, pattern=r"^\+?[0-9 ()-]{5,40}$")


class GuideIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[GuidePoint] = Field(
        min_length=1, max_length=GUIDE_POINTS_MAX, description="What to check, in order."
    )
    contacts: list[GuideContact] = Field(default_factory=list, max_length=5)
    valid_until: date = Field(description="The guide is valid through this day.")


class GuideOut(GuideIn):
    product: str
    version: int
    created: str
    actor: str | None = Field(description="The key id that published it (never the secret).")
    role: str | None


class ProductOut(BaseModel):
    product: str
    guide: GuideOut | None = Field(description="The latest guide (or the version asked for); null if none.")
    guide_versions: list[int] = Field(description="Every version published, oldest first; each is kept.")
    expired: bool | None = Field(description="Whether the guide's valid_until has passed; null without one.")
