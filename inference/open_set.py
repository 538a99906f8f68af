"""Open-set verdicts: "not recognised" for images far from anything the model was trained on, and the
one rule that turns the classifier, the novelty gate and a product's reference check into a verdict.

Novelty is the kNN cosine distance from an image's embedding (the model's `embedding` output, the same
pass as its logits) to the reference bank (`inference.bank`). Its threshold is chosen on validation
images against the training images' bank, for a stated rate of in-distribution images flagged, and
stored in the card's `novelty` record (`inference.gate_record`) with the bank's name; the bank file sits
beside model.onnx and holds the validation images too, joined once the thresholds were chosen.

A scan scored in tiles has one embedding: the normalised mean of its tiles' embeddings, so the bank, the
threshold and the served answer all see a scan the same way (`scan_embedding`).

The gate also keeps the training envelope's size: `min_side`, the shorter side of the smallest training
image (at most the model's input size). An image smaller than that is not recognised whatever its
novelty (`outside_envelope`): the model was never shown, nor validated on, anything that small. Why a
size rule beside the embedding: the shipped X-ray model trains mostly on 32-64 px patches, and blurred,
low-resolution grey images (a 25 px face, a photograph shrunk to 25 px) lie among them in texture
statistics; only 37% of 200 such faces were beyond the novelty threshold. The envelope has a detail too
(`min_detail`): an image enlarged from a thumbnail passes the size rule in pixels, but its model input
shows less detail than any training image's did (`input_profile.detail_on_input`), so it is smaller than
training all the same (`enlarged`; named only for an image otherwise like the training images: a flat or
featureless image has no detail to measure and is unlike them). On the fish-bone models (100 px scans)
this caught the last grey faces enlarged from 25 px thumbnails that the profile's kNN let through
(benchmarks/foreign_bench.py).

Two more rules hold an image against the training images (`not_recognised_cause` names which one fired):
- its input profile (`inference.input_profile`: brightness, sharpness and colour statistics of the model
  input), with a threshold chosen on validation as the embedding's is. Texture alone cannot tell a grey
  face from an X-ray; the profile can. And the joint measure (`joint_distance`): an image must lie near
  the same training images by both. Each training image's embedding distance and profile distance, each
  over its own threshold, are added, and the image's joint distance is the mean of its k smallest sums.
  An image in the tail of both measures at once, though within each threshold, is far from every
  training image by the sum: on magnetic tiles trained on 150 images, a grey cat photo lay within both
  thresholds (its nearest tiles by texture were not its nearest by profile) and only the joint measure
  caught it, at no cost to the model's own test images (benchmarks/foreign_bench.py).
  A verdict measures only as far as it must (`NoveltyGate.verdict_likeness`): an image beyond the
  novelty threshold needs no other measure, and most images like the training images are settled by
  bounds over their nearest training images by texture, without reading every training profile.
- its colour: a model that saw only grey images (at most COLOUR_RULE_SHARE of them in colour) does not
  recognise a colour image, and one that saw only colour does not recognise a grey one. It names the cause
  an officer can act on: an image that the model would otherwise recognise (a pseudo-colour scan whose
  grey rendering is like the training scans) is in another colour scheme; one it would not is another
  kind of image (a colour photo sent as X-ray, an X-ray sent as photo).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from verity.inference.bank import (
    DEFAULT_K,
    ReferenceBank,
    novelty,
    novelty_from_similarities,
    unit_rows,
)
from verity.inference.decode import CLINICAL_DICOM_MODALITIES
from verity.inference.input_profile import (
    ProfileBank,
    detail_on_input,
    mean_nearest,
)

# Training images this share or fewer of which were colour (or grey) make a model that saw none: it
# does not recognise a colour (or grey) image.
COLOUR_RULE_SHARE = 0.01
# The least scale the joint measure divides a distance by (`joint_distance`).
JOINT_MIN_SCALE = 1e-6
# The verdict's shortcut (`NoveltyGate.verdict_likeness`): how many of an image's nearest training images
# by embedding bound its profile and joint distances, and the share of a threshold a bound must stay
# under to settle the verdict. The margin is there because the shortcut sums its k terms in another
# order than the full computation may: they round apart by a few units in the last place at most.
SHORTLIST = 64
BOUND_MARGIN = 1e-4


class OpenSetError(ValueError):
    """A model whose card names a novelty gate it cannot serve (bank missing, wrong width, bad record)."""


@dataclass(frozen=True)
class Likeness:
    """How far one image lies from the training images, by each of the gate's measures (None where it
    was not measured: no profiles, or an image scored in tiles)."""

    novelty: float  # the embedding's kNN cosine distance (`inference.bank.novelty`)
    profile_distance: float | None = None  # the input profile's kNN distance
    joint: float | None = None  # both at once (`joint_distance`)
    # True: measured only as far as the verdict needed (`NoveltyGate.verdict_likeness`): the two above
    # are upper bounds already within their thresholds, or None where the novelty alone was beyond its.
    settled: bool = False


@dataclass(frozen=True)
class NoveltyGate:
    """The bank beside a model and the distance beyond which an image is not recognised."""

    bank: ReferenceBank
    threshold: float
    k: int = DEFAULT_K
    min_side: int | None = None  # the training envelope: a shorter side under it is not recognised
    profiles: ProfileBank | None = None  # the training images' input profiles, with their threshold
    profile_threshold: float | None = None
    colour_share: float | None = None  # the share of training images in colour
    # The training envelope's detail: the least `detail_on_input` of any training image, and the model's
    # input side it is measured at. An image showing less is not recognised as smaller than training.
    min_detail: float | None = None
    input_side: int | None = None
    joint_threshold: float | None = None  # the joint measure's (`joint_distance`); None: no joint rule

    def novelty(self, embeddings: np.ndarray) -> np.ndarray:
        """kNN cosine distance of each embedding row to the bank (`inference.bank.novelty`)."""
        return novelty(embeddings, self.bank, min(self.k, len(self.bank)))

    def likeness(self, embeddings: np.ndarray, profiles: np.ndarray | None = None) -> list[Likeness]:
        """Each image's distances to the training images by every measure the gate has: one similarity
        product over the bank and one distance product over the profiles serve all three. `profiles`
        (one row per embedding) None: the embedding's novelty alone (a scan in tiles, a tensor)."""
        return self._likeness_from(self._similarities(embeddings), profiles)

    def verdict_likeness(self, embedding: np.ndarray, profile: np.ndarray | None) -> Likeness:
        """One image's likeness as far as its verdict needs it (`like_training`): the same verdict as
        `likeness` gives, for less. The novelty is exact, and an image beyond its threshold needs no more.
        Otherwise the profile and joint distances are first bounded over the image's SHORTLIST nearest
        training images by embedding, since the mean of the k smallest distances to some of the training
        images is at least the mean to all of them. When both bounds lie within their thresholds (by
        BOUND_MARGIN), the image is like the training images by every measure and the other training
        images' profiles are never read. Either way the answer is `settled`; otherwise every measure is
        computed over every training image."""
        similarity = self._similarities(embedding)
        row, k = similarity[0], min(self.k, len(self.bank))
        # One partition of the values (an argpartition takes twice as long): the k largest, whose novelty
        # is the bank's to the bit, and the SHORTLIST-th largest, the least similarity of the shortlist.
        listed = min(max(SHORTLIST, k), len(row))
        ranked = np.partition(row, sorted({len(row) - k, len(row) - listed}))
        novelty_value = float(novelty_from_similarities(ranked[None, len(row) - k :], k)[0])
        if profile is None or self.profiles is None:
            return Likeness(novelty_value)  # the novelty is the gate's one measure here
        if not self.recognised(novelty_value):
            return Likeness(novelty_value, settled=True)
        profiles = np.atleast_2d(profile)
        shortlist = np.flatnonzero(row >= ranked[len(row) - listed])  # ties make it longer, never shorter
        bounded = self._bounded_likeness(novelty_value, row, shortlist, profiles)
        return bounded if bounded is not None else self._likeness_from(similarity, profiles)[0]

    def _similarities(self, embeddings: np.ndarray) -> np.ndarray:
        return self.bank.index.similarities(unit_rows(np.atleast_2d(embeddings)))

    def _likeness_from(self, similarity: np.ndarray, profiles: np.ndarray | None) -> list[Likeness]:
        """`likeness` from the images' similarities to every bank row."""
        k = min(self.k, len(self.bank))
        novelties = novelty_from_similarities(similarity, k)
        if self.profiles is None or profiles is None:
            return [Likeness(float(value)) for value in novelties]
        squared = self.profiles.squared_distances(profiles)
        distances = mean_nearest(squared, min(self.k, len(self.profiles.rows)))
        joint: list[float | None] = [None] * len(novelties)
        rows, scales = self.profiles.bank_rows, self.joint_scales
        if self.joint_threshold is not None and scales is not None and rows is not None:
            aligned = similarity if self._bank_in_order else similarity[:, rows]
            profile_distances = np.sqrt(np.maximum(squared, 0.0, out=squared), out=squared)  # in place
            joint = list(joint_distance(1.0 - aligned, profile_distances, scales, self.k))
        return [Likeness(float(n), float(d), j) for n, d, j in zip(novelties, distances, joint, strict=True)]

    def _bounded_likeness(
        self, novelty_value: float, similarity: np.ndarray, shortlist: np.ndarray, profiles: np.ndarray
    ) -> Likeness | None:
        """`verdict_likeness`'s bounds for one image (its similarities to every bank row, and the rows of
        its shortlist), None when they do not settle the verdict or the gate cannot bound (no profile
        threshold, or profiles tied to no bank rows)."""
        linked, scales = self._profile_of_bank_row, self.joint_scales
        if self.profiles is None or self.profile_threshold is None or linked is None or scales is None:
            return None
        profile_rows = linked[shortlist]
        tied = profile_rows >= 0
        k = min(self.k, len(self.profiles.rows))
        if np.count_nonzero(tied) < k:
            return None
        # Each row's distance is the one the full measure computes for it (`squared_distances`), so a
        # bound is never under the full value; the margin is there for the order of the k terms' sum.
        squared = self.profiles.squared_distances(profiles, profile_rows[tied])
        profile_bound = float(mean_nearest(squared, k)[0])
        if not profile_bound <= self.profile_threshold * (1.0 - BOUND_MARGIN):
            return None
        joint_bound = None
        if self.joint_threshold is not None:
            distances = np.sqrt(np.maximum(squared, 0.0, out=squared), out=squared)
            nearest = similarity[shortlist[tied]][None]
            joint_bound = float(joint_distance(1.0 - nearest, distances, scales, self.k)[0])
            if not joint_bound <= self.joint_threshold * (1.0 - BOUND_MARGIN):
                return None
        return Likeness(novelty_value, profile_bound, joint_bound, settled=True)

    @cached_property
    def _profile_of_bank_row(self) -> np.ndarray | None:
        """Each bank row's profile row (-1: the row's image has no profile); None where the profiles
        name no bank rows (a file written before they did)."""
        rows = None if self.profiles is None else self.profiles.bank_rows
        if rows is None:
            return None
        linked = np.full(len(self.bank), -1, dtype=np.int64)
        linked[rows] = np.arange(len(rows))
        return linked

    @cached_property
    def _bank_in_order(self) -> bool:
        """Whether the profiles are the bank's rows in order (every image scored whole): no gather."""
        rows = None if self.profiles is None else self.profiles.bank_rows
        return rows is not None and np.array_equal(rows, np.arange(len(self.bank)))

    @property
    def joint_scales(self) -> tuple[float, float] | None:
        """What puts the two measures in one unit: each one's threshold (None without a profile gate)."""
        if self.profile_threshold is None:
            return None
        return self.threshold, self.profile_threshold

    def recognised(self, distance: float) -> bool:
        """Whether an embedding's novelty lies within the threshold (the first of `like_training`)."""
        return bool(distance <= self.threshold)

    def like_training(self, measured: Likeness) -> bool:
        """Whether every measure the gate has puts the image within its threshold."""
        if not self.recognised(measured.novelty):
            return False
        profile, joint = measured.profile_distance, measured.joint
        if profile is not None and self.profile_threshold is not None and profile > self.profile_threshold:
            return False
        return joint is None or self.joint_threshold is None or joint <= self.joint_threshold

    def colour_unseen(self, colour: bool | None) -> bool:
        """Whether this image's colour (True) or greyness (False) is one training all but never had."""
        if colour is None or self.colour_share is None:
            return False
        seen = self.colour_share if colour else 1.0 - self.colour_share
        return seen <= COLOUR_RULE_SHARE


def joint_distance(
    embedding_distances: np.ndarray, profile_distances: np.ndarray, scales: tuple[float, float], k: int
) -> np.ndarray:
    """Each query's joint distance to the training images (N x M distances to the same M images by
    each measure): the mean of its k smallest sums of the two distances, each over its scale (at least
    JOINT_MIN_SCALE: a threshold of 0, from validation images the bank holds exactly, divides nothing)."""
    embedding_scale, profile_scale = (max(float(scale), JOINT_MIN_SCALE) for scale in scales)
    combined = np.multiply(profile_distances, np.float32(1.0 / profile_scale), dtype=np.float32)
    combined += np.multiply(embedding_distances, np.float32(1.0 / embedding_scale), dtype=np.float32)
    k = min(k, combined.shape[1])
    return np.partition(combined, k - 1, axis=1)[:, :k].astype(np.float64).mean(axis=1)


def outside_envelope(gate: NoveltyGate | None, shorter_side: int | None) -> bool:
    """Whether an image with this shorter side (pixels) is smaller than any the gate's model was
    trained on. False without a gate, without a recorded size, or without a known side."""
    if gate is None or gate.min_side is None or shorter_side is None:
        return False
    return shorter_side < gate.min_side


def enlarged(gate: NoveltyGate | None, shorter_side: int | None, profile: np.ndarray | None) -> bool:
    """Whether an image shows less detail on the model input than any training image did
    (`input_profile.detail_on_input` under the envelope's `min_detail`): enlarged from an image smaller
    than any the model was trained on. False without a record, a side or a profile."""
    if gate is None or gate.min_detail is None or gate.input_side is None:
        return False
    if shorter_side is None or profile is None:
        return False
    return detail_on_input(profile, shorter_side, gate.input_side) < gate.min_detail


def scan_embedding(tile_embeddings: np.ndarray) -> np.ndarray:
    """One embedding for a scan scored in tiles: the unit-length mean of its tiles' embeddings."""
    return unit_rows(np.asarray(tile_embeddings, dtype=np.float32).mean(axis=0, keepdims=True))[0]


@dataclass(frozen=True)
class Observed:
    """What the gate holds against the training images, besides the embedding's novelty."""

    shorter_side: int | None = None
    colour: bool | None = None  # before the colour rule; None when unknown (a tensor sent preprocessed)
    profile: np.ndarray | None = None  # `input_profile` of the model input; None for a scan in tiles
    dicom_modality: str | None = None  # the Modality a DICOM file states; None for other formats


def not_recognised_cause(gate: NoveltyGate, measured: Likeness, observed: Observed) -> str | None:
    """Why the gate does not recognise an image (`vocabulary.NOT_RECOGNISED_CAUSES`), None when it does.
    The size comes first (it says what to send instead, whatever the novelty), then a clinical DICOM's
    stated modality, then the colour, then the likeness measures (`NoveltyGate.like_training`), and last
    the detail: an image like the training images in all else but enlarged from a smaller one is smaller
    than training (send the original), while a flat or featureless one, which has no detail to measure,
    is unlike them."""
    if outside_envelope(gate, observed.shorter_side):
        return "smaller_than_training"
    if observed.dicom_modality in CLINICAL_DICOM_MODALITIES:
        return "other_modality"  # an MR slice or an ultrasound, whatever its texture and profile
    like = gate.like_training(measured)
    if gate.colour_unseen(observed.colour):
        return _colour_cause(like)
    if not like:
        return "unlike_training"
    return "smaller_than_training" if enlarged(gate, observed.shorter_side, observed.profile) else None


def _colour_cause(like_otherwise: bool) -> str:
    """The cause for a colour (or grey) image sent to a model that never saw one: like the training
    images in every other respect, it is the same kind of image in another colour scheme (a pseudo-colour
    export of a scan, a grey photo of a product); unlike them too, it is another kind of image (a colour
    photo sent as X-ray, an X-ray sent as photo)."""
    return "other_colour_scheme" if like_otherwise else "other_modality"


def open_set_verdict(
    classifier_verdict: str,
    recognised: bool | None,
    reference_status: str | None = None,
    cause: str | None = None,
) -> tuple[str, tuple[str, ...]]:
    """(verdict, reasons) by the one open-set rule (reason names: `vocabulary.REASONS`).

    Not recognised wins: the classifier's score means nothing for an image unlike its training data, so
    the answer is uncertain, never genuine or counterfeit; the reasons name `cause` after it. Otherwise
    the verdict is counterfeit when the classifier or the product's reference check alarms (both named
    when both do); an uncertain classifier score stays uncertain; else genuine. `recognised` None is a
    model without a gate."""
    if recognised is False:
        return "uncertain", ("not_recognised", *((cause,) if cause else ()))
    alarms = []
    if classifier_verdict == "counterfeit":
        alarms.append("classifier")
    if reference_status == "mismatch":
        alarms.append("reference_mismatch")
    if alarms:
        return "counterfeit", tuple(alarms)
    if classifier_verdict == "uncertain":
        return "uncertain", ("classifier_uncertain",)
    return "genuine", ()
