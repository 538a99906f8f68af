"""The product reference check on local features: is every part the genuine product always shows there?

A counterfeit often differs from the genuine article in one small part: a hologram left out or printed
flat, a word misspelt. A whole-image embedding hardly moves for that (a missing hologram moved the
pooled features of the shipped photo model less than a change of background), so the check compares
patches: the model's stride-8 feature map (`patches` output), one unit vector per location.

From a product's genuine references it learns the product's *signature*: the reference patches that
(nearly) every other reference also shows, such as the logo, the brand text and the hologram, while
backgrounds, which change from photo to photo, drop out. A query is scored by how far its best match
to each signature patch is, in units of how far that patch's matches are among genuine references,
taking the worst (`TOP`) of them: one missing part is enough.

Calibration is leave-one-out: each reference is scored against a signature learnt from the others,
and the alarm threshold is set on those scores for the stated false-alarm rate (`alarm_threshold`).

The same references also say *where* a query differs (`difference_map`, PatchCore's idea): each query
location's distance to its nearest patch among all the product's genuine patches (`GenuinePool`). A part
some genuine reference shows, background included, stays low; anything no reference shows lights up.
The distance is read against how far that nearest genuine patch itself lies from the other references
(a steady part, like the brand name, is held to a tight standard; a background, different in every
photo, to a loose one), and given in genuine limits: 1 is what all but the false-alarm rate of genuine
locations stay within, learnt by leave-one-out like the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from verity.inference.bank import unit_rows

SIGNATURE_SHARE = 0.3  # the most consistent share of reference patches that makes the signature
CONSISTENCY_QUANTILE = 0.8  # a patch is consistent when 80% of the other references hold a close match
MAX_SIGNATURE = 512  # signature patches kept (a farthest-point coreset): bounds the cost of a query
MIN_SPREAD = 0.01  # floor on a signature patch's spread, so one steady patch cannot dominate
TOP = 1  # the worst signature patches averaged into the score
# Genuine patches a query's locations are compared with for its difference map (a farthest-point coreset
# beyond this): 400 locations x 2048 x 40 channels is about 1 ms, where 20 references' 8,000 were 5 ms.
MAX_POOL = 2048


def unit_patches(feature_map: np.ndarray) -> np.ndarray:
    """C x h x w (or L x C already) -> L x C unit rows, one per location."""
    array = np.asarray(feature_map, dtype=np.float32)
    if array.ndim == 3:
        array = array.reshape(array.shape[0], -1).T
    return unit_rows(array)


def nearest_distances(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each row of `queries`, 1 - its largest cosine with a row of `keys` (both unit rows)."""
    return 1.0 - (queries @ keys.T).max(axis=1)


def pairwise_nearest(references: list[np.ndarray]) -> list[np.ndarray]:
    """near[i][l, j]: distance from patch l of reference i to its best match in reference j (0 on
    i == j, never read). The one expensive step of calibration: n^2 matrix products of L x L.
    References may have different numbers of patches (a scan scored in tiles has each tile's)."""
    count = len(references)
    near = []
    for i, patches in enumerate(references):
        row = np.zeros((len(patches), count), dtype=np.float32)
        for j, others in enumerate(references):
            if i != j:
                row[:, j] = nearest_distances(patches, others)
        near.append(row)
    return near


def farthest_points(rows: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` rows chosen greedily, each the farthest from those already chosen (a coreset:
    near-duplicates, such as the many patches of a plain label, give way to the distinct ones, such as
    each letter of the brand name). Deterministic: it starts from row 0."""
    chosen = [0]
    distance = 1.0 - rows @ rows[0]
    for _ in range(1, min(count, len(rows))):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, 1.0 - rows @ rows[nxt])
    return np.sort(np.array(chosen))


@dataclass(frozen=True)
class Signature:
    """The patches a product's genuine references all show, with their genuine match statistics."""

    patches: np.ndarray  # S x C unit rows
    centre: np.ndarray  # S: mean distance of each patch's best match in the other references
    spread: np.ndarray  # S: its standard deviation (floored at MIN_SPREAD)

    def score(self, query: np.ndarray) -> float:
        """How far the query's best matches to the signature lie beyond the genuine ones (the mean of
        the TOP largest standardised distances)."""
        distances = nearest_distances(self.patches, query)
        standardised = (distances - self.centre) / self.spread
        if TOP == 1:
            return float(standardised.max())
        return float(np.sort(standardised)[-TOP:].mean())


def signature_from(references: list[np.ndarray], near: list[np.ndarray], members: list[int]) -> Signature:
    """The signature of the references `members`, from their rows and columns of `near` only (a
    reference left out is not seen at all, so leave-one-out scores are honest)."""
    # Each member's patches against every other member: all their patches x (m - 1).
    sub = np.concatenate([near[i][:, [j for j in members if j != i]] for i in members])
    rank = min(sub.shape[1] - 1, int(np.ceil(CONSISTENCY_QUANTILE * sub.shape[1])) - 1)
    consistency = np.partition(sub, rank, axis=1)[:, rank]  # that order statistic, without sorting
    keep = np.flatnonzero(consistency <= np.quantile(consistency, SIGNATURE_SHARE))
    stacked = np.concatenate([references[i] for i in members])
    if len(keep) > MAX_SIGNATURE:
        keep = keep[farthest_points(stacked[keep], MAX_SIGNATURE)]
    centre = sub[keep].mean(axis=1)
    spread = np.maximum(sub[keep].std(axis=1), MIN_SPREAD)
    return Signature(stacked[keep], centre.astype(np.float32), spread.astype(np.float32))


@dataclass(frozen=True)
class GenuinePool:
    """What a query's difference map is measured against: the product's genuine patches (a coreset
    beyond MAX_POOL), how far each lies from the other references, and the genuine limit."""

    patches: np.ndarray  # P x C unit rows
    spread: np.ndarray  # P: each patch's distance to its nearest match in the other references (floored)
    limit: float  # the (1 - false-alarm rate) quantile of genuine locations' relative distances

    def relative(self, query: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Each query row's distance to its nearest pool patch, divided by that patch's spread (pool
        patches where `exclude` is True are not matched: leave-one-out)."""
        similarity = query @ self.patches.T
        if exclude is not None:
            similarity[:, exclude] = -np.inf
        best = similarity.argmax(axis=1)
        distance = np.maximum(1.0 - similarity[np.arange(len(query)), best], 0.0)
        return distance / self.spread[best]


@dataclass(frozen=True)
class PatchCalibration:
    signature: Signature  # from every reference: what queries are scored against
    loo_scores: np.ndarray  # each reference scored against the signature of the others
    threshold: float
    spread: float
    pool: GenuinePool  # what difference maps are drawn against


def calibrate_patches(references: list[np.ndarray], false_alarm_rate: float) -> PatchCalibration:
    """The product's signature and its leave-one-out alarm threshold (needs at least 3 references),
    and the genuine pool its difference maps are drawn against."""
    if len(references) < 3:
        raise ValueError(f"A patch signature needs at least 3 references, got {len(references)}.")
    widths = {r.shape[1] for r in references}
    if len(widths) != 1:
        raise ValueError(f"References have patches of different widths: {sorted(widths)}.")
    near = pairwise_nearest(references)
    everyone = list(range(len(references)))
    loo = np.array([
        signature_from(references, near, [j for j in everyone if j != i]).score(references[i])
        for i in everyone
    ])  # fmt: skip
    spread = max(float(loo.std(ddof=1)), 1e-6)
    signature = signature_from(references, near, everyone)
    pool = genuine_pool(references, near, false_alarm_rate)
    return PatchCalibration(signature, loo, alarm_threshold(loo, false_alarm_rate), spread, pool)


def genuine_pool(
    references: list[np.ndarray], near: list[np.ndarray], false_alarm_rate: float
) -> GenuinePool:
    """Every reference's patches (thinned to MAX_POOL by farthest points: the coreset keeps each distinct
    part and drops near-duplicates such as a plain label's, so nearest distances barely move while a
    query's cost stays bounded), each patch's leave-one-out distance from `near` (already computed for
    the signature), and the genuine limit: each reference's locations matched against the pool without
    its own patches, at the (1 - rate) quantile. Why a quantile of locations, not of each image's worst
    one: one odd reference (a sticker, a glare) would set a limit so high every map stayed blank; so a
    genuine image shows about that share of its locations (a few of hundreds) just above 1."""
    stacked = np.ascontiguousarray(np.concatenate(references), dtype=np.float32)
    owners = np.concatenate([np.full(len(r), i) for i, r in enumerate(references)])
    own_distance = np.concatenate([np.delete(rows, i, axis=1).min(axis=1) for i, rows in enumerate(near)])
    # Floored at the median: a part matched almost exactly in every reference would otherwise turn the
    # smallest change into a huge ratio.
    spread = np.maximum(own_distance, max(float(np.median(own_distance)), 1e-3)).astype(np.float32)
    keep = np.arange(len(stacked)) if len(stacked) <= MAX_POOL else farthest_points(stacked, MAX_POOL)
    unlimited = GenuinePool(np.ascontiguousarray(stacked[keep]), spread[keep], 1.0)
    ratios = [unlimited.relative(rows, owners[keep] == i) for i, rows in enumerate(references)
              if np.any(owners[keep] != i)]  # fmt: skip
    limit = float(np.quantile(np.concatenate(ratios), 1.0 - false_alarm_rate)) if ratios else 1.0
    return GenuinePool(unlimited.patches, unlimited.spread, max(limit, 1e-6))


@dataclass(frozen=True, eq=False)
class PatchComparison:
    """One query's local features held against a product's genuine pool. The map is computed when asked
    (`difference`): a matrix product of about a millisecond that only an answer drawing it should pay,
    so a scanner that asks for no images costs the check nothing more."""

    pool: GenuinePool
    patches: np.ndarray  # L x C unit rows, one map of `grid` row by row
    grid: tuple[int, int]

    def difference(self) -> np.ndarray:
        return difference_map(self.pool, self.patches, self.grid)


def difference_map(pool: GenuinePool, query: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """rows x columns: how far each query location lies from the genuine references, in genuine limits
    (above 1: further than genuine images go). `query` holds the rows x columns locations row by row."""
    rows, columns = grid
    if len(query) != rows * columns:
        raise ValueError(f"{len(query)} patches are not one {rows} x {columns} map.")
    return (pool.relative(query) / pool.limit).reshape(rows, columns).astype(np.float32)


def alarm_threshold(loo: np.ndarray, false_alarm_rate: float) -> float:
    """The larger of the normal fit's (1 - rate) point and the largest leave-one-out score plus the gap
    between the two largest. Why both: a score is the worst of hundreds of patch distances, so its
    tail is heavier than a normal one (mean + z * std alone let 2.7-4% of genuine photos alarm at a
    stated 1%); and a new genuine image lies beyond the largest of n references' scores one time in
    n + 1, so a rate below that needs a step past it, which the last gap estimates."""
    ordered = np.sort(np.asarray(loo, dtype=np.float64))
    z = NormalDist().inv_cdf(1.0 - false_alarm_rate)
    normal = float(ordered.mean() + z * max(float(ordered.std(ddof=1)), 1e-6))
    return max(normal, float(2 * ordered[-1] - ordered[-2]))
