"""The input profile: a few cheap statistics of the model input, and how far an image's lie from the
training images'. The second half of the "not recognised" gate, beside the embedding's kNN novelty.

Why a second measure: the embedding describes texture, and a grey face, a grey library photo and an X-ray
of fish bones are close in texture. They are far apart in what the spec already sees: how bright the
image is and how its brightness spreads (the quantiles of the grey plane), how sharp it is (quantiles
of its gradient, the mean Laplacian), how far its channels differ (colour), and how fine its detail is
(`detail`). On a model trained on the GDXray fish bones at 32 px, the embedding alone let 52 of 200 grey
faces through; with the profile, 4 (benchmarks/foreign_bench.py).

Why `detail`: an image enlarged from a thumbnail is large in pixels but has the detail of the thumbnail,
and the size rule cannot see that. The mean absolute Laplacian over the mean gradient magnitude goes as
the image's highest spatial frequency (a second derivative over a first), so it falls by the factor an
image was enlarged by, whatever its contrast; its logarithm moves by the same step for each doubling.
It is measured on the model input and taken back to the image's own pixels: the resize to the input
enlarged an image smaller than the input by S / side, which adds log(S / side). So a sharp image has
about the same detail at any size, and a 128 px face enlarged from a 25 px thumbnail has the detail of
a 25 px image, far below any sharp 128 px image and below a model's sharp 32 px patches too.

The profile is computed on the model input (CxSxS in [0, 1], after the colour rule and the resize) at
every second pixel: the statistics barely move, and it costs under a millisecond. Each statistic is
standardised by the training images' mean and spread, and an image's distance is the mean Euclidean
distance to its k nearest training profiles. The threshold is chosen on validation images for a stated
rate, as the embedding's is (`gate_record.choose_novelty_threshold`).

The profiles sit in profile.npz beside model.onnx, written and read by numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from verity.inference.private_files import staged_file

PROFILE_FILE = "profile.npz"
# The grey plane's quantiles (percent): the shape of its histogram, robust to a few odd pixels.
LEVEL_QUANTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
GRADIENT_QUANTILES = (50.0, 90.0, 99.0)
# The profile's statistics, in order (`input_profile`).
STATISTICS = (
    *(f"level_p{q:g}" for q in LEVEL_QUANTILES),
    "level_std",
    *(f"gradient_p{q:g}" for q in GRADIENT_QUANTILES),
    "laplacian",
    "colour_spread",
    "detail",
)
PROFILE_WIDTH = len(STATISTICS)
# Profiles written before `detail` was added (its last statistic) are read and compared on the columns
# they hold, so a model exported then keeps the gate it was validated with.
WIDTH_BEFORE_DETAIL = PROFILE_WIDTH - 1
DETAIL = STATISTICS.index("detail")
MEDIAN_LEVEL = STATISTICS.index("level_p50")  # the profile's median grey level: the image's brightness
# The gradient and Laplacian added to both sides of `detail`'s ratio (grey levels in [0, 1]): a flat
# image has a ratio of 1 rather than 0/0, far below any textured image's.
DETAIL_FLOOR = 1e-3
# A statistic that never varies over the training images (a grey model's colour spread) still gets a
# spread, so an image that differs on it only slightly is not infinitely far away.
MIN_SPREAD = 1e-6


class ProfileError(ValueError):
    """A profile file that is missing, malformed or of another width."""


def input_profile(model_input: np.ndarray, source_side: int | None = None) -> np.ndarray:
    """The PROFILE_WIDTH statistics of one CxSxS model input (float32): the grey plane's quantiles and
    standard deviation, its gradient's quantiles, its mean absolute Laplacian, the mean spread of its
    channels (0 for one channel or a grey plane repeated), and its detail at the decoded image's own
    pixels (`source_side`, its shorter side; None for an input that was not resized)."""
    # One contiguous copy of the sampled pixels: every statistic below then reads memory in order.
    sampled = np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)[:, ::2, ::2])
    grey = _repeated_plane(sampled)
    plane = sampled.mean(axis=0) if grey is None else grey
    levels = percentiles(plane, LEVEL_QUANTILES)
    rows, columns = gradient_of(plane) if min(plane.shape) > 1 else (np.zeros_like(plane),) * 2
    rows *= rows
    columns *= columns
    rows += columns
    magnitude = np.sqrt(rows, out=rows)  # no overflow to guard against in [0, 1]
    gradient = percentiles(magnitude, GRADIENT_QUANTILES)
    laplacian = _mean_abs_laplacian(plane)
    spread = 0.0 if grey is not None else _channel_spread(sampled, plane)
    detail = math.log((laplacian + DETAIL_FLOOR) / (float(magnitude.mean()) + DETAIL_FLOOR))
    detail += _log_enlargement(source_side, model_input.shape[-1])  # the resize's enlargement, taken back
    statistics = [plane.std(), *gradient, laplacian, spread, detail]
    return np.concatenate([levels, statistics]).astype(np.float32)


def detail_on_input(profile: np.ndarray, source_side: int | None, input_side: int) -> float:
    """The profile's `detail` as the model input has it, before it was taken back to the image's own
    pixels: how fine the detail the model is shown. An image enlarged from one smaller than any training
    image shows less than every training image did, whatever its size in pixels."""
    return float(profile[DETAIL]) - _log_enlargement(source_side, input_side)


def _log_enlargement(source_side: int | None, input_side: int) -> float:
    """log(input_side / source_side) for an image the resize to the input enlarged; 0 for one it kept or
    shrank, or of unknown size."""
    if source_side is not None and 0 < source_side < input_side:
        return math.log(input_side / source_side)
    return 0.0


def percentiles(values: np.ndarray, percents: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, percents) with its default (linear) method, to the bit: numpy's own
    interpolation (`_lerp`) between the order statistics it reads, found by one partition at just those
    ranks rather than a sort (they are the same values whatever puts them there), without np.percentile's
    checks. np.percentile took 0.5 of the profile's 1.3 ms on every request; this takes a tenth of it."""
    plan = _percentile_plan(values.size, percents)
    ordered = np.partition(values.reshape(-1), plan.ranks)
    low, high = ordered[plan.previous], ordered[plan.following]
    difference = high - low
    return np.where(plan.upper, high - difference * plan.rest, low + difference * plan.gamma)


@dataclass(frozen=True)
class _PercentilePlan:
    """Where `percentiles` reads for one count of values: the same for every image of a model's size."""

    ranks: np.ndarray  # every rank read, once
    previous: np.ndarray  # each percent's rank below it, and above it
    following: np.ndarray
    gamma: np.ndarray  # how far between them, and 1 - gamma
    rest: np.ndarray
    upper: np.ndarray  # numpy's _lerp measures from the upper value where gamma >= 0.5


@lru_cache(maxsize=64)
def _percentile_plan(size: int, percents: tuple[float, ...]) -> _PercentilePlan:
    virtual = (size - 1) * (np.asarray(percents, dtype=np.float64) / 100.0)
    previous = np.floor(virtual).astype(np.intp)
    following = np.minimum(previous + 1, size - 1)
    gamma = virtual - previous
    ranks = np.unique(np.concatenate([previous, following]))
    return _PercentilePlan(ranks, previous, following, gamma, 1.0 - gamma, gamma >= 0.5)


def gradient_of(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.gradient(plane) of a plane at least 2 x 2, to the bit (central differences inside, one-sided at
    the edges), without its general-case bookkeeping: a tenth of the profile's time."""
    rows, columns = np.empty_like(plane), np.empty_like(plane)
    np.subtract(plane[2:], plane[:-2], out=rows[1:-1])
    rows[1:-1] /= 2.0
    np.subtract(plane[1], plane[0], out=rows[0])
    np.subtract(plane[-1], plane[-2], out=rows[-1])
    np.subtract(plane[:, 2:], plane[:, :-2], out=columns[:, 1:-1])
    columns[:, 1:-1] /= 2.0
    np.subtract(plane[:, 1], plane[:, 0], out=columns[:, 0])
    np.subtract(plane[:, -1], plane[:, -2], out=columns[:, -1])
    return rows, columns


def _mean_abs_laplacian(plane: np.ndarray) -> float:
    """The mean absolute 4-neighbour Laplacian of the plane's inner pixels (0 for a plane without any),
    summed in one buffer in the order a + b + c + d."""
    inner = plane[1:-1, 1:-1]
    if not inner.size:
        return 0.0
    laplacian = plane[:-2, 1:-1] + plane[2:, 1:-1]
    laplacian += plane[1:-1, :-2]
    laplacian += plane[1:-1, 2:]
    np.subtract(4 * inner, laplacian, out=laplacian)
    return float(np.abs(laplacian, out=laplacian).mean())


def _repeated_plane(sampled: np.ndarray) -> np.ndarray | None:
    """The one plane of an input whose channels are all the same (one channel, or a grey image repeated
    into three, as every X-ray model's input is): its mean, without computing one; None for colour."""
    first = sampled[0]
    return first if bool((sampled[1:] == first).all()) else None


def _channel_spread(sampled: np.ndarray, plane: np.ndarray) -> float:
    """The channels' standard deviation about their mean (`plane`, already computed), averaged over the
    pixels: sampled.std(axis=0).mean(), without computing the mean a second time."""
    deviation = sampled - plane
    deviation *= deviation
    return float(np.sqrt(deviation.mean(axis=0)).mean())


@dataclass(frozen=True)
class ProfileBank:
    """The training images' profiles, standardised, with the mean and spread that standardise a query."""

    rows: np.ndarray  # N x width (PROFILE_WIDTH, or WIDTH_BEFORE_DETAIL for an older file), standardised
    mean: np.ndarray
    spread: np.ndarray
    # Each row's image as a row of the reference bank (bank.npz), for the gate's joint measure; None in
    # a file written before it, or for profiles of images the bank does not hold.
    bank_rows: np.ndarray | None = None

    @classmethod
    def from_profiles(cls, profiles: np.ndarray, bank_rows: np.ndarray | None = None) -> ProfileBank:
        profiles = np.asarray(profiles, dtype=np.float64)
        if profiles.ndim != 2 or profiles.shape[1] != PROFILE_WIDTH or len(profiles) == 0:
            raise ProfileError(f"Expected N x {PROFILE_WIDTH} training profiles, got {profiles.shape}.")
        if bank_rows is not None and np.shape(bank_rows) != (len(profiles),):
            raise ProfileError(f"{len(profiles)} profiles need as many bank rows, got {np.shape(bank_rows)}.")
        mean = profiles.mean(axis=0)
        spread = np.maximum(profiles.std(axis=0), MIN_SPREAD)
        rows = None if bank_rows is None else np.asarray(bank_rows, dtype=np.int64)
        return cls(((profiles - mean) / spread).astype(np.float32), mean, spread, rows)

    def with_rows(self, profiles: np.ndarray, bank_rows: np.ndarray | None = None) -> ProfileBank:
        """This bank with more images' profiles appended, standardised by this bank's mean and spread
        (so that a distance, and a threshold chosen on it, keeps its unit), each with its bank row where
        this bank names them."""
        profiles = np.asarray(profiles, dtype=np.float64)
        if profiles.ndim != 2 or profiles.shape[1] != self.rows.shape[1]:
            raise ProfileError(f"Expected N x {self.rows.shape[1]} profiles to append, got {profiles.shape}.")
        if (self.bank_rows is None) != (bank_rows is None):
            raise ProfileError("Appended profiles name bank rows where this bank's do, and only there.")
        linked = None
        if self.bank_rows is not None and bank_rows is not None:
            if bank_rows.shape != (len(profiles),):
                raise ProfileError(f"{len(profiles)} profiles need as many bank rows, got {bank_rows.shape}.")
            linked = np.concatenate([self.bank_rows, bank_rows.astype(np.int64)])
        rows = np.concatenate([self.rows, ((profiles - self.mean) / self.spread).astype(np.float32)])
        return ProfileBank(rows, self.mean, self.spread, linked)

    @cached_property
    def _row_norms(self) -> np.ndarray:
        return (self.rows.astype(np.float32) ** 2).sum(axis=1)

    def distance(self, profiles: np.ndarray, k: int) -> np.ndarray:
        """Mean Euclidean distance from each profile row to its k nearest training profiles."""
        return mean_nearest(self.squared_distances(profiles), min(k, len(self.rows)))

    def squared_distances(self, profiles: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Squared Euclidean distance from each profile row to every training profile, or to the training
        profiles `rows` names (N x rows). Summed squared differences, row by row: exact to float32
        however far a profile lies from the training mean (|q|^2 + |r|^2 - 2 q.r cancels to noise there),
        and each training row's value the same whichever rows are asked for (`NoveltyGate.verdict_likeness`
        bounds with a few of them what the full measure computes with all)."""
        width = self.rows.shape[1]  # an older bank compares the statistics it holds
        queries = (np.atleast_2d(np.asarray(profiles, dtype=np.float64))[:, :width] - self.mean) / self.spread
        training = self.rows if rows is None else self.rows[rows]
        squared = np.empty((len(queries), len(training)), dtype=np.float32)
        for query, out in zip(queries.astype(np.float32), squared, strict=True):
            difference = training - query
            np.einsum("ij,ij->i", difference, difference, out=out)
        return squared

    def left_out_distance(self, k: int, chunk: int = 1024) -> np.ndarray:
        """Each training profile's `distance` to the others (its own row left out)."""
        k = min(k, len(self.rows) - 1)
        if k < 1:
            return np.zeros(0)
        return np.concatenate([mean_nearest(squared, k) for _, squared in self.left_out_blocks(chunk)])

    def left_out_blocks(self, chunk: int = 1024) -> Iterator[tuple[slice, np.ndarray]]:
        """The training profiles' squared distances to each other, a block of `chunk` rows at a time (so
        that a bank of 10,000 never holds a 10,000 x 10,000 matrix), each row's own distance infinite:
        (the block's rows, its squared distances to every row)."""
        for start in range(0, len(self.rows), chunk):
            rows = slice(start, min(start + chunk, len(self.rows)))
            block = self.rows[rows]
            squared = self._row_norms[rows, None] + self._row_norms[None] - 2 * block @ self.rows.T
            squared[np.arange(len(block)), np.arange(rows.start, rows.stop)] = np.inf  # not itself
            yield rows, squared


def mean_nearest(squared: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean Euclidean distance to its k nearest, from squared distances (rows x bank)."""
    nearest = np.partition(squared, k - 1, axis=1)[:, :k]
    return np.sqrt(np.maximum(nearest, 0.0)).astype(np.float64).mean(axis=1)


def save_profiles(bank: ProfileBank, path: str | Path) -> Path:
    """Writes the bank to `path` atomically (`private_files.staged_file`), readable by all as bank.npz."""
    path = Path(path)
    with staged_file(path, mode=0o644) as staged:
        with open(staged.path, "wb") as stream:  # a file object: numpy then adds no .npz of its own
            arrays = {"rows": bank.rows, "mean": bank.mean, "spread": bank.spread}
            if bank.bank_rows is not None:
                arrays["bank_rows"] = bank.bank_rows
            np.savez(stream, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        staged.publish()
    return path


def load_profiles(path: str | Path) -> ProfileBank:
    """Reads a bank written by `save_profiles` (no pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            rows, mean, spread = data["rows"], data["mean"], data["spread"]
            bank_rows = data["bank_rows"] if "bank_rows" in data.files else None
    except FileNotFoundError as error:
        raise ProfileError(f"No input profiles at {path}.") from error
    except (OSError, ValueError, KeyError) as error:
        raise ProfileError(f"{path} is not a readable profile file: {error}") from error
    widths = {rows.shape[1] if rows.ndim == 2 else -1, *mean.shape, *spread.shape}
    readable = len(widths) == 1 and widths <= {PROFILE_WIDTH, WIDTH_BEFORE_DETAIL}
    if not readable or mean.ndim != 1 or spread.ndim != 1:
        raise ProfileError(f"{path} holds profiles of another width than {PROFILE_WIDTH}.")
    if len(rows) == 0 or not (np.isfinite(rows).all() and np.isfinite(mean).all() and (spread > 0).all()):
        raise ProfileError(f"{path} holds no usable profiles.")
    if bank_rows is not None and (bank_rows.shape != (len(rows),) or bank_rows.dtype.kind not in "iu"):
        raise ProfileError(f"{path} holds bank rows that do not match its {len(rows)} profiles.")
    linked = None if bank_rows is None else bank_rows.astype(np.int64)
    return ProfileBank(rows.astype(np.float32), mean.astype(np.float64), spread.astype(np.float64), linked)
