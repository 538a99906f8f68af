"""The input profile and the colour rule of the open-set gate (inference.input_profile, .open_set)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from benchmarks.models import tiny_spec
from verity.inference.bank import build_bank
from verity.inference.input_profile import (
    PROFILE_WIDTH,
    STATISTICS,
    WIDTH_BEFORE_DETAIL,
    ProfileBank,
    ProfileError,
    detail_on_input,
    input_profile,
    load_profiles,
    save_profiles,
)
from verity.inference.open_set import Likeness, NoveltyGate, Observed, not_recognised_cause
from verity.inference.preprocess import is_colour_content
from verity.inference.tiling import TilingOptions, load_for_scoring


def _noise(seed: int, channels: int = 1, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((channels, size, size), dtype=np.float32)


LAPLACIAN, COLOUR_SPREAD, DETAIL = (
    STATISTICS.index(name) for name in ("laplacian", "colour_spread", "detail")
)


def test_the_profile_describes_brightness_sharpness_and_colour() -> None:
    flat = input_profile(np.full((3, 32, 32), 0.5, np.float32))
    assert flat.shape == (PROFILE_WIDTH,) and flat.dtype == np.float32
    np.testing.assert_allclose(flat[:9], 0.5)  # every quantile of a flat plane is its level
    assert flat[COLOUR_SPREAD] == 0.0 and flat[LAPLACIAN] == 0.0  # no colour spread, no Laplacian
    assert flat[DETAIL] == 0.0  # the floors' ratio: 1
    grey_noise = np.repeat(_noise(0), 3, axis=0)
    assert input_profile(grey_noise)[COLOUR_SPREAD] < 1e-6  # a grey plane repeated is not colour
    assert input_profile(_noise(0, channels=3))[COLOUR_SPREAD] > 0.1
    assert input_profile(_noise(0))[LAPLACIAN] > 0.1  # noise is sharp
    assert np.isfinite(input_profile(np.zeros((1, 1, 1), np.float32))).all()  # a 1-pixel input


def _scene(seed: int, side: int = 128) -> Image.Image:
    """A grey picture with detail at every scale down to a pixel or two."""
    pixels = (np.random.default_rng(seed).random((side, side)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))


def _enlarged(image: Image.Image, factor: int, size: int = 128) -> np.ndarray:
    """`image` shrunk by `factor` and enlarged back: the same picture with a factor's less detail, as
    a model input (1 x size x size in [0, 1])."""
    small = image.resize((size // factor, size // factor), Image.Resampling.LANCZOS)
    back = small.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(back, dtype=np.float32)[None] / 255.0


def test_detail_falls_by_the_factor_an_image_was_enlarged_by_whatever_its_contrast() -> None:
    """An enlarged thumbnail keeps the thumbnail's detail: `detail` (log of Laplacian over gradient)
    drops by about log(2) for each doubling, and not when only the contrast changes."""
    scene = _scene(5)
    details = [float(input_profile(_enlarged(scene, factor))[DETAIL]) for factor in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(details, details[1:], strict=False)), details
    assert 0.3 < details[2] - details[3] < 1.0, details  # one doubling: about log(2) = 0.69
    dim = _enlarged(scene, 1) * 0.3 + 0.2
    assert abs(float(input_profile(dim)[DETAIL]) - details[0]) < 0.05


def test_a_profile_file_written_before_detail_is_compared_on_its_own_statistics(tmp_path: Path) -> None:
    """A model exported before `detail` keeps its gate: its file is read, and an image's distance is
    the one its statistics give, whatever the new one says."""
    current = ProfileBank.from_profiles(np.stack([input_profile(_noise(s)) for s in range(30)]))
    path = tmp_path / "profile.npz"
    older = {name: getattr(current, name)[..., :WIDTH_BEFORE_DETAIL] for name in ("rows", "mean", "spread")}
    np.savez(path, **older)  # as save_profiles wrote it then
    query = input_profile(_noise(99))
    read = load_profiles(path)
    changed = query.copy()
    changed[DETAIL] += 10.0
    assert read.distance(query, 5)[0] == pytest.approx(read.distance(changed, 5)[0])
    assert read.distance(query, 5)[0] < 5.0


def test_an_image_like_the_training_profiles_is_near_and_a_flat_one_far(tmp_path: Path) -> None:
    bank = ProfileBank.from_profiles(np.stack([input_profile(_noise(s)) for s in range(30)]))
    near = bank.distance(input_profile(_noise(99)), k=5)[0]
    far = bank.distance(input_profile(np.full((1, 32, 32), 0.9, np.float32)), k=5)[0]
    assert near < 5.0 < far
    path = save_profiles(bank, tmp_path / "profile.npz")
    again = load_profiles(path)
    np.testing.assert_allclose(again.distance(input_profile(_noise(99)), 5), [near], rtol=1e-6)


def test_a_bad_profile_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="No input profiles"):
        load_profiles(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ProfileError, match="not a readable"):
        load_profiles(tmp_path / "junk.npz")
    np.savez(tmp_path / "narrow.npz", rows=np.zeros((3, 4)), mean=np.zeros(4), spread=np.ones(4))
    with pytest.raises(ProfileError, match="another width"):
        load_profiles(tmp_path / "narrow.npz")
    with pytest.raises(ProfileError):
        ProfileBank.from_profiles(np.zeros((0, PROFILE_WIDTH)))


def _png(pixels: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def test_colour_is_seen_before_the_colour_rule_in_the_forms_files_take() -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    pseudo = np.stack([grey, 255 - grey, grey // 2], axis=2)  # channels tens of levels apart
    options, xray, photo = TilingOptions(), tiny_spec("xray"), tiny_spec("photo")
    cases = {
        "8-bit grey PNG": (_png(grey), False),
        "RGB-encoded grey JPEG": (_png(np.repeat(grey[..., None], 3, axis=2), "JPEG"), False),
        "16-bit grey PNG": (_png(grey.astype(np.uint16) * 257), False),
        "pseudo-colour PNG": (_png(pseudo), True),
        "pseudo-colour JPEG": (_png(pseudo, "JPEG"), True),
    }
    for name, (data, colour) in cases.items():
        for spec in (xray, photo):
            assert load_for_scoring(data, spec, options).colour is colour, (name, spec.modality)
    assert is_colour_content(np.zeros((4000, 3000, 3), np.uint8)) is False  # looked at in a small view
    assert is_colour_content(np.zeros((5, 5, 2), np.uint16)) is False  # a dual-energy pair is not colour


@pytest.mark.parametrize(
    ("colour_share", "colour", "like", "cause"),
    [
        (0.0, True, True, "other_colour_scheme"),  # X-ray: a pseudo-colour scan whose grey is familiar
        (0.0, True, False, "other_modality"),  # X-ray: a colour photo sent as X-ray
        (0.0, False, True, None),
        (0.0, False, False, "unlike_training"),
        (1.0, False, True, "other_colour_scheme"),  # X-ray: grey to a model of pseudo-colour scans
        (0.3, True, True, None),  # a model that saw both
        (1.0, False, False, "other_modality"),  # photo: an X-ray sent as photo
        (1.0, False, True, "other_colour_scheme"),  # photo: a grey photo of a product it knows
        (0.0, True, True, "other_colour_scheme"),  # photo: colour to a model of grey camera crops
        (1.0, None, True, None),  # a tensor sent preprocessed: its colour is unknown
    ],
)
def test_the_colour_rule_names_a_cause_an_officer_can_act_on(colour_share, colour, like, cause) -> None:
    gate = NoveltyGate(build_bank(np.eye(3), ["genuine"] * 3), 0.5, k=1, colour_share=colour_share)
    distance = 0.0 if like else 1.0
    assert not_recognised_cause(gate, Likeness(distance), Observed(64, colour)) == cause


def test_the_size_rule_comes_before_the_colour_and_the_profile() -> None:
    profiles = ProfileBank.from_profiles(np.stack([input_profile(_noise(s)) for s in range(10)]))
    gate = NoveltyGate(build_bank(np.eye(3), ["genuine"] * 3), 0.5, k=1, min_side=32,
                       profiles=profiles, profile_threshold=3.0, colour_share=0.0)  # fmt: skip
    far = input_profile(np.full((1, 32, 32), 0.9, np.float32))
    assert _cause(gate, Observed(20, True, far)) == "smaller_than_training"
    assert _cause(gate, Observed(64, False, far)) == "unlike_training"
    assert _cause(gate, Observed(64, False, input_profile(_noise(3)))) is None
    assert _cause(gate, Observed(64, True, far)) == "other_modality"


def test_the_fast_percentiles_and_channel_spread_are_numpys_to_the_bit() -> None:
    """The profile's own quantiles equal np.percentile's (linear) exactly, ties of 8-bit levels and odd
    sizes included, its channel spread equals std(axis=0).mean() and its gradient np.gradient's: the
    shipped gates' profiles were computed with numpy's, so a faster profile must not move a single
    value."""
    from verity.inference.input_profile import (
        GRADIENT_QUANTILES,
        LEVEL_QUANTILES,
        _channel_spread,
        gradient_of,
        percentiles,
    )

    rng = np.random.default_rng(0)
    for trial in range(200):
        channels, side = int(rng.choice([1, 3])), int(rng.choice([2, 3, 33, 64, 160]))
        image = rng.random((channels, side, side)).astype(np.float32) ** rng.uniform(0.3, 3.0)
        if trial % 3 == 0:
            image = np.round(image * 255) / 255
        plane = image.mean(axis=0)
        for percents in (LEVEL_QUANTILES, GRADIENT_QUANTILES):
            np.testing.assert_array_equal(percentiles(plane, percents), np.percentile(plane, percents))
        assert _channel_spread(image, plane) == float(image.std(axis=0).mean())
        if min(plane.shape) > 1:
            for ours, numpys in zip(gradient_of(plane), np.gradient(plane), strict=True):
                np.testing.assert_array_equal(ours, numpys)


def test_a_server_computes_the_profile_while_decoding_and_the_same_numbers() -> None:
    """`prepare(with_profile=True)` computes the profile in the decode (the server asks for it when the
    model's gate or drift reads it, `pipeline.wants_profile`); the numbers are the lazy ones."""
    from benchmarks.common import photo_jpeg
    from verity.inference.pipeline import prepare

    spec, data = tiny_spec("photo", 64), photo_jpeg(320, 240, seed=5)
    eager = prepare(data, spec, TilingOptions(), with_profile=True).decoded
    lazy = prepare(data, spec, TilingOptions()).decoded
    assert "profile" in vars(eager) and "profile" not in vars(lazy)  # computed, and not computed, yet
    assert eager.profile is not None and np.array_equal(eager.profile, lazy.profile)


def test_the_profile_is_wanted_by_a_gate_with_profiles_or_a_drift_reference() -> None:
    from types import SimpleNamespace

    from verity.inference.pipeline import wants_profile

    bank = build_bank(np.eye(3), ["genuine"] * 3)
    profiles = ProfileBank.from_profiles(np.stack([input_profile(_noise(s)) for s in range(10)]))
    with_profiles = NoveltyGate(bank, 0.5, k=1, profiles=profiles, profile_threshold=3.0)

    def engine(gate: NoveltyGate | None, novelty: dict | None) -> Any:
        return SimpleNamespace(novelty_gate=gate, card=SimpleNamespace(novelty=novelty))

    assert wants_profile(engine(with_profiles, {}))
    assert wants_profile(engine(NoveltyGate(bank, 0.5, k=1), {"drift": {}}))
    assert not wants_profile(engine(NoveltyGate(bank, 0.5, k=1), {}))
    assert not wants_profile(engine(None, None))


def test_the_left_out_distance_is_each_training_profiles_distance_to_the_others() -> None:
    """What the profile's threshold is chosen on besides validation: a training profile's distance to
    its k nearest others, as `distance` gives it against a bank without that profile."""
    profiles = np.stack([input_profile(_noise(s)) for s in range(12)])
    bank = ProfileBank.from_profiles(profiles)
    left_out = bank.left_out_distance(k=3, chunk=5)  # chunks that do not divide the rows
    for i in (0, 6, 11):
        others = ProfileBank(np.delete(bank.rows, i, axis=0), bank.mean, bank.spread)
        assert left_out[i] == pytest.approx(others.distance(profiles[i], 3)[0], rel=1e-4)
    assert bank.left_out_distance(k=3).min() > 0.0  # never the zero distance to itself


def test_an_image_enlarged_from_one_smaller_than_any_training_image_is_smaller_than_training() -> None:
    """The envelope's detail: a 128 px image with the detail of a 32 px one is not recognised as
    smaller than training, though its pixels pass the size rule and the texture is the training one."""
    scenes = [_scene(seed) for seed in range(12)]
    training = np.stack([input_profile(_enlarged(scene, 1), 128) for scene in scenes])
    min_detail = min(detail_on_input(profile, 128, 128) for profile in training)
    gate = NoveltyGate(build_bank(np.eye(3), ["genuine"] * 3), 0.5, k=1, min_side=64,
                       profiles=ProfileBank.from_profiles(training), profile_threshold=1e9,
                       min_detail=min_detail, input_side=128)  # fmt: skip
    sharp = input_profile(_enlarged(scenes[0].transpose(Image.Transpose.ROTATE_90), 1), 128)
    enlarged = input_profile(_enlarged(scenes[0], 4), 128)
    assert _cause(gate, Observed(128, False, sharp)) is None
    assert _cause(gate, Observed(128, False, enlarged)) == "smaller_than_training"
    strict = replace(gate, profile_threshold=5.0)  # a flat image is far from the training profiles
    flat = input_profile(np.full((1, 128, 128), 0.5, np.float32), 128)
    assert detail_on_input(flat, 128, 128) < min_detail  # no detail at all, and yet not "enlarged":
    assert _cause(strict, Observed(128, False, flat)) == "unlike_training"
    no_record = NoveltyGate(build_bank(np.eye(3), ["genuine"] * 3), 0.5, k=1, min_side=64)
    assert _cause(no_record, Observed(128, False, enlarged)) is None  # an older card


def test_detail_is_taken_back_to_the_images_own_pixels() -> None:
    """A sharp 64 px image resized to a 128 px input has the detail of a sharp 128 px one once the
    resize's enlargement is taken back, and the input's own detail before (what the envelope reads)."""
    scene = _scene(9, side=64)
    on_input = np.asarray(scene.resize((128, 128), Image.Resampling.BICUBIC), np.float32)[None] / 255.0
    profile = input_profile(on_input, 64)
    assert profile[DETAIL] - float(input_profile(on_input)[DETAIL]) == pytest.approx(np.log(2.0), rel=1e-5)
    assert detail_on_input(profile, 64, 128) == pytest.approx(
        float(input_profile(on_input)[DETAIL]), abs=1e-5
    )
    assert detail_on_input(profile, 300, 128) == pytest.approx(float(profile[DETAIL]))  # shrunk: as it is


def test_a_grey_image_has_one_profile_whether_sent_in_one_channel_or_repeated_in_three() -> None:
    """Every X-ray model's input repeats a grey plane into three channels: its profile is the plane's,
    to the bit, with no colour spread; a colour input keeps its channels' mean and spread."""
    grey = _noise(4)
    np.testing.assert_array_equal(input_profile(np.repeat(grey, 3, axis=0), 90), input_profile(grey, 90))
    assert input_profile(np.repeat(grey, 3, axis=0))[COLOUR_SPREAD] == 0.0
    colour = _noise(4, channels=3)
    spread = float(colour[:, ::2, ::2].std(axis=0).mean())
    assert input_profile(colour)[COLOUR_SPREAD] == pytest.approx(spread)


def _cause(gate: NoveltyGate, observed: Observed) -> str | None:
    """The gate's cause for an image whose embedding is the bank's first row (novelty 0), with the
    observed profile measured by the gate as `pipeline.judge` measures it."""
    profile = None if observed.profile is None else observed.profile[None]
    return not_recognised_cause(gate, gate.likeness(np.eye(3)[0], profile)[0], observed)
