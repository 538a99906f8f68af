"""Synthetic generators: determinism, manifest, balance, grouped split, cues, EAN-13, X-ray physics."""

from __future__ import annotations

import colorsys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from verity.datasets import synth_photo, synth_xray
from verity.datasets.catalogue import PRODUCT_SPECS
from verity.datasets.ean13 import (
    ean13_barcode,
    ean13_check_digit,
    ean13_decode,
    ean13_is_valid,
    ean13_modules,
)
from verity.datasets.manifest import read_manifest, resolve_image_path
from verity.datasets.synth import (
    DIFFICULTIES,
    CaseInfo,
    ImageJob,
    cue_policy,
    generate,
    plan_cases,
    synth_main,
)
from verity.inference.decode import decode_image


def _rows(out: Path) -> list:
    return list(read_manifest(out / "manifest.jsonl"))


def _hashes(out: Path) -> dict[str, str]:
    return {row.path: row.sha256 for row in _rows(out)}


@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_same_seed_same_images_and_other_seed_differs(modality: str, tmp_path: Path) -> None:
    generate(modality, 8, tmp_path / "a", seed=5, size=64)
    generate(modality, 8, tmp_path / "b", seed=5, size=64)
    generate(modality, 8, tmp_path / "c", seed=6, size=64)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert set(_hashes(tmp_path / "a").values()).isdisjoint(_hashes(tmp_path / "c").values())


def test_an_image_depends_on_seed_and_index_only(tmp_path: Path) -> None:
    """Image i is the same whether 5 or 12 are generated, and whether one or two workers render it."""
    generate("photo", 5, tmp_path / "few", seed=2, size=64)
    generate("photo", 12, tmp_path / "more", seed=2, size=64, workers=2)
    few, more = _hashes(tmp_path / "few"), _hashes(tmp_path / "more")
    assert all(more[path] == digest for path, digest in few.items())


def test_manifest_rows_are_complete_and_true(tmp_path: Path) -> None:
    generate("photo", 12, tmp_path, seed=1, size=64, difficulty="hard")
    rows = _rows(tmp_path)
    assert len(rows) == 12
    for row in rows:
        image = resolve_image_path(tmp_path / "manifest.jsonl", row)
        assert not Path(row.path).is_absolute() and image.is_file()
        import hashlib

        assert hashlib.sha256(image.read_bytes()).hexdigest() == row.sha256
        assert row.source == "synthetic" and row.modality == "photo"
        assert row.product in synth_photo.PRODUCTS and row.case_id and row.split in ("train", "val", "test")
        assert row.meta["difficulty"] == "hard"
        assert (row.meta["cues"] == []) == (row.label == "genuine")
        assert decode_image(image.read_bytes()).shape == (64, 64, 3)


def test_labels_balanced_and_cases_grouped() -> None:
    policy = cue_policy(synth_photo)
    cases = plan_cases(0, 600, policy)
    labels = Counter(case.label for case in cases)
    assert abs(labels["genuine"] - labels["counterfeit"]) <= 12
    sizes = Counter(case.number for case in cases)
    assert all(2 <= size <= 6 for number, size in sizes.items() if number < max(sizes) - 1)
    per_case = defaultdict(set)
    for case in cases:
        per_case[case.number].add((case.label, case.product, case.cues))
    assert all(len(v) == 1 for v in per_case.values())  # a shipment is one product, one label, one defect


def test_split_is_grouped_by_case_and_roughly_70_15_15(tmp_path: Path) -> None:
    rows = generate("xray", 120, tmp_path, seed=3, size=48)
    splits_of_case = defaultdict(set)
    for row in rows:
        splits_of_case[row.case_id].add(row.split)
    assert all(len(s) == 1 for s in splits_of_case.values())
    counts = Counter(row.split for row in rows)
    assert 0.6 <= counts["train"] / 120 <= 0.8 and counts["val"] >= 8 and counts["test"] >= 8
    for split in ("train", "val", "test"):
        labels = Counter(row.label for row in rows if row.split == split)
        assert labels["genuine"] and labels["counterfeit"]


@pytest.mark.parametrize(
    "modality,held", [("photo", ["hologram", "misspelling"]), ("xray", ["filler_density"])]
)
def test_holdout_cues_never_appear(modality: str, held: list[str]) -> None:
    generator = synth_photo if modality == "photo" else synth_xray
    cases = plan_cases(4, 400, cue_policy(generator, holdout=held))
    seen = {cue for case in cases for cue in case.cues}
    assert seen and seen.isdisjoint(held)
    only = plan_cases(4, 200, cue_policy(generator, only=held[:1]))
    assert {cue for case in only for cue in case.cues} == set(held[:1])
    assert Counter(case.label for case in only)["counterfeit"] > 50


def test_only_cues_keeps_product_pools_equal_for_both_labels() -> None:
    # substituted_part exists only for electronics: genuine cases must come from the same products
    cases = plan_cases(0, 400, cue_policy(synth_xray, only=["substituted_part"]))
    products = {label: {c.product for c in cases if c.label == label} for label in ("genuine", "counterfeit")}
    assert products["genuine"] == products["counterfeit"] == {"power-banks", "phones"}


def test_ean13_check_digit_and_modules() -> None:
    assert ean13_check_digit("400638133393") == 1  # a published EAN-13: 4006381333931
    assert ean13_is_valid("4006381333931") and not ean13_is_valid("4006381333932")
    code = "5901234123457"
    modules = ean13_modules(code)
    assert modules.size == 95 and ean13_decode(modules) == code


@pytest.mark.parametrize("pixels_per_module", [4, 2])
def test_printed_bars_read_back_to_the_code(pixels_per_module: int) -> None:
    code = "4006381333931"
    width = (95 + 2 * 7) * pixels_per_module  # the bars and a 7-module quiet zone each side
    bars = np.asarray(ean13_barcode(code, width, 20))
    row = bars[10, pixels_per_module // 2 :: pixels_per_module][7:-7]  # the centre of each bar module
    assert ean13_decode((row < 128).astype(np.uint8)) == code


def test_printed_barcode_right_for_genuine_wrong_under_the_cue(tmp_path: Path) -> None:
    generate("photo", 60, tmp_path, seed=9, size=64)
    rows = _rows(tmp_path)
    for row in rows:
        valid = ean13_is_valid(row.meta["ean"])
        assert valid == ("barcode_check" not in row.meta["cues"]), row
    assert any("barcode_check" in row.meta["cues"] for row in rows)


def test_xray_png_is_16_bit_and_dual_energy_tiff_has_two_channels(tmp_path: Path) -> None:
    generate("xray", 4, tmp_path / "single", seed=1, size=96)
    generate("xray", 4, tmp_path / "dual", seed=1, size=96, dual_energy=True)
    for name, channels in (("single", 1), ("dual", 2)):
        for row in _rows(tmp_path / name):
            image = decode_image(resolve_image_path(tmp_path / name / "manifest.jsonl", row).read_bytes())
            assert image.dtype == np.uint16 and image.shape[2] == channels and max(image.shape[:2]) == 96
            assert image.max() > 50000 and image.min() < 40000  # air is bright, goods attenuate
    dual = decode_image((tmp_path / "dual" / _rows(tmp_path / "dual")[0].path).read_bytes()).astype(float)
    assert dual[..., 1].mean() < dual[..., 0].mean()  # the low-energy image is the darker one


def test_beer_lambert_denser_or_thicker_is_darker() -> None:
    organic, talc, steel = synth_xray.mu("organic"), synth_xray.mu("talc"), synth_xray.mu("steel")
    thickness = np.array([0.5, 1.0, 2.0, 4.0])
    for material in (organic, talc, steel):
        transmitted = synth_xray.transmission(material, thickness)
        assert np.all(np.diff(transmitted, axis=0) < 0)  # thicker: darker, at both energies
    assert np.all(synth_xray.transmission(talc, 2.0) < synth_xray.transmission(organic, 2.0))
    # the low/high attenuation ratio separates organics < minerals < metals
    ratio = {name: synth_xray.mu(name)[0] / synth_xray.mu(name)[1] for name in ("organic", "talc", "steel")}
    assert ratio["organic"] < ratio["talc"] < ratio["steel"]
    # and the rendered detector signal follows: a slab of filler reads darker than the same slab of tablets
    canvas = synth_xray.Canvas(20, 40, 1.0)
    canvas.slab(0, 0, 20, 20, 3.0, organic)
    canvas.slab(20, 0, 20, 20, 3.0, talc)
    signal = synth_xray.detect(canvas.att[0], np.random.default_rng(0), 0.5, 1e6)
    assert signal[5:15, 25:35].mean() < signal[5:15, 5:15].mean() < 1.0


def _job(modality_module, difficulty: str, cues: tuple[str, ...], product: str) -> ImageJob:  # noqa: ANN001
    case = CaseInfo(3, "counterfeit", product, cues)
    return ImageJob(0, 0, case, DIFFICULTIES[difficulty], 64)


def test_difficulty_scales_cue_strength() -> None:
    genuine = PRODUCT_SPECS["solvex-tablets"].brand.colour
    hue = colorsys.rgb_to_hsv(*(c / 255 for c in genuine))[0]

    def hue_shift(difficulty: str) -> float:
        look = synth_photo.label_look(
            _job(synth_photo, difficulty, ("colour_shift",), "solvex-tablets"),
            PRODUCT_SPECS["solvex-tablets"],
        )
        shifted = colorsys.rgb_to_hsv(*(c / 255 for c in look.brand_colour))[0]
        return min(abs(shifted - hue), 1 - abs(shifted - hue))

    assert hue_shift("easy") > hue_shift("medium") > hue_shift("hard") > 0
    fractions = [
        synth_xray.deviation(_job(synth_xray, d, ("filler_density",), "pill-bottles"))[0].filler_fraction
        for d in ("easy", "medium", "hard")
    ]
    assert fractions[0] > fractions[1] > fractions[2] > 0


def test_counterfeit_cue_changes_the_pixels() -> None:
    """The same image index rendered genuine and with a cue differs where the cue acts, not everywhere."""
    for generator, product, cue in (
        (synth_photo, "velmor-tea", "hologram"),
        (synth_xray, "power-banks", "missing_part"),
    ):
        base = ImageJob(0, 0, CaseInfo(0, "genuine", product, ()), DIFFICULTIES["easy"], 128)
        fake = ImageJob(0, 0, CaseInfo(0, "counterfeit", product, (cue,)), DIFFICULTIES["easy"], 128)
        a = decode_image(generator.render(base)[0]).astype(float)
        b = decode_image(generator.render(fake)[0]).astype(float)
        changed = np.abs(a - b).max(axis=2) > (20 if generator is synth_photo else 2000)
        assert 0.002 < changed.mean() < 0.5, (cue, changed.mean())


def test_cli_writes_set_and_preview_and_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "set"
    code = synth_main(
        [
            "--modality",
            "xray",
            "--n",
            "12",
            "--size",
            "64",
            "--out",
            str(out),
            "--preview",
            str(tmp_path / "g.png"),
        ]
    )
    assert code == 0 and (out / "manifest.jsonl").is_file() and (tmp_path / "g.png").stat().st_size > 1000
    assert synth_main(["--modality", "photo", "--n", "4", "--out", str(out), "--holdout-cues", "nope"]) == 2
    assert "Valid cues: colour_shift" in capsys.readouterr().err
    assert synth_main(["--modality", "photo", "--n", "4", "--out", str(out), "--dual-energy"]) == 2
    assert synth_main(["--modality", "xray", "--n", "4", "--out", str(out), "--size", "9000"]) == 2


def test_an_invisible_cue_never_stands_alone_unless_asked_for() -> None:
    cases = plan_cases(1, 1500, cue_policy(synth_photo))
    assert any("barcode_check" in case.cues for case in cases)
    assert all(case.cues != ("barcode_check",) for case in cases)
    only = plan_cases(1, 40, cue_policy(synth_photo, only=["barcode_check"]))
    assert {case.cues for case in only if case.label == "counterfeit"} == {("barcode_check",)}


# ------------------------------------------------------------------------------- console export styles

SINGLE_STYLES = ("png16", "grey8-png", "grey8-jpeg", "rgb-grey-jpeg", "pseudo-colour")
MAGIC = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff"}


def _images(out: Path) -> list[tuple[object, np.ndarray]]:
    return [(row, decode_image((out / row.path).read_bytes())) for row in _rows(out)]


@pytest.mark.parametrize(
    "style,suffix,dtype,channels",
    [
        ("png16", ".png", np.uint16, 1),
        ("grey8-png", ".png", np.uint8, 1),
        ("grey8-jpeg", ".jpg", np.uint8, 1),
        ("rgb-grey-jpeg", ".jpg", np.uint8, 3),
        ("pseudo-colour", ".jpg", np.uint8, 3),
    ],
)
def test_each_export_style_decodes_to_the_form_a_console_sends(
    style: str, suffix: str, dtype: type, channels: int, tmp_path: Path
) -> None:
    generate("xray", 4, tmp_path, seed=2, size=64, export_style=style)
    for row, image in _images(tmp_path):
        assert row.path.endswith(suffix) and (tmp_path / row.path).read_bytes().startswith(MAGIC[suffix])
        assert row.meta["export_style"] == style and "crop" not in row.meta
        assert image.dtype == dtype and image.shape[2] == channels and max(image.shape[:2]) == 64
        full = 65535 if dtype == np.uint16 else 255
        assert image.max() > 0.8 * full and image.min() < 0.65 * full  # air bright, goods darker
        if style == "rgb-grey-jpeg":  # grey saved as RGB: R = G = B up to JPEG rounding
            assert np.abs(image.astype(int) - image[..., :1].astype(int)).max() <= 2
        if style == "pseudo-colour":  # real colour, not grey in three channels
            spread = image.astype(float).max(axis=2) - image.astype(float).min(axis=2)
            assert spread.mean() > 25 and spread.max() > 120


def test_pseudo_colour_hue_follows_the_material() -> None:
    """Organics orange, minerals green, metals blue, from the real low/high attenuation ratio."""
    canvas = synth_xray.Canvas(20, 80, 1.0)
    for k, (material, thickness) in enumerate((("organic", 4.0), ("talc", 2.0), ("steel", 0.3), ("air", 1))):
        canvas.slab(20 * k, 0, 20, 20, thickness, synth_xray.mu(material))
    rng = np.random.default_rng(0)
    high = synth_xray.to_uint16(synth_xray.detect(canvas.att[1], rng, 0.6, 5000))
    low = synth_xray.to_uint16(synth_xray.detect(canvas.att[0], rng, 0.6, 3000))
    rgb = synth_xray.pseudo_colour(high, low).astype(float) / 255

    def hsv(k: int) -> tuple[float, float, float]:
        h, s, v = colorsys.rgb_to_hsv(*rgb[5:15, 20 * k + 5 : 20 * k + 15].reshape(-1, 3).mean(axis=0))
        return h * 360, s, v

    organic, mineral, metal, air = (hsv(k) for k in range(4))
    assert 15 < organic[0] < 45 and 90 < mineral[0] < 150 and 190 < metal[0] < 250
    assert min(organic[1], mineral[1], metal[1]) > 0.6 and air[1] < 0.2 and air[2] > 0.9  # air stays white


@pytest.mark.parametrize("style", [*SINGLE_STYLES, "mixed"])
def test_export_styles_are_deterministic_and_preview(style: str, tmp_path: Path) -> None:
    from verity.datasets.synth import write_preview

    rows = generate("xray", 4, tmp_path / "a", seed=4, size=64, export_style=style)
    generate("xray", 4, tmp_path / "b", seed=4, size=64, export_style=style)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    write_preview("xray", tmp_path / "a", rows, tmp_path / "grid.png")
    grid = decode_image((tmp_path / "grid.png").read_bytes())
    assert grid.shape[2] == 3 and grid.std() > 20


def test_png16_style_is_the_unchanged_default(tmp_path: Path) -> None:
    for dual in (False, True):
        generate("xray", 4, tmp_path / f"default{dual}", seed=1, size=64, dual_energy=dual)
        generate(
            "xray", 4, tmp_path / f"png16{dual}", seed=1, size=64, dual_energy=dual, export_style="png16"
        )
        assert list(_hashes(tmp_path / f"default{dual}").values()) == list(
            _hashes(tmp_path / f"png16{dual}").values()
        )


def test_mixed_covers_styles_sizes_and_aspects(tmp_path: Path) -> None:
    generate("xray", 8, tmp_path, seed=0, size=256, export_style="mixed")
    images = _images(tmp_path)
    assert len({row.meta["export_style"] for row, _ in images}) >= 3
    shapes = set()
    for row, image in images:
        if "crop" not in row.meta:  # a whole scan, also one of the forms
            assert max(image.shape[:2]) == 256
            continue
        x0, y0, w, h = row.meta["crop"]
        assert (
            image.shape[:2] == (h, w) and min(w, h) >= 32 and max(w, h) <= 128 and 1 / 3.05 <= w / h <= 3.05
        )
        shapes.add((w, h))
    assert len(shapes) >= 5
    assert any(w > h for w, h in shapes) and any(h > w for w, h in shapes)  # landscape and portrait
    assert min(min(s) for s in shapes) <= 64 and max(max(s) for s in shapes) >= 96  # patches and regions


def _xray_job(index: int, label: str, cues: tuple[str, ...], style: str, crops: bool = False) -> ImageJob:
    case = CaseInfo(
        0, label, "pill-bottles" if label == "genuine" or "fill_level" in cues else "power-banks", cues
    )
    return ImageJob(index, 5, case, DIFFICULTIES["easy"], 160, False, style, crops)


def test_crops_alone_keep_the_style_and_the_goods_in_view(tmp_path: Path) -> None:
    rows = generate("xray", 8, tmp_path, seed=5, size=160, export_style="grey8-png", crops=True)
    assert {row.meta["export_style"] for row in rows} == {"grey8-png"}
    assert len({tuple(row.meta["crop"][2:]) for row in rows if "crop" in row.meta}) >= 4
    for index in range(12):
        job = _xray_job(index, "counterfeit", ("missing_part",), "grey8-png", crops=True)
        meta = synth_xray.render(job)[2]
        if "crop" not in meta:
            continue
        x0, y0, w, h = meta["crop"]
        gx0, gy0, gx1, gy1 = synth_xray._scan(job, False)[1]
        overlap = max(0, min(x0 + w, gx1) - max(x0, gx0)) * max(0, min(y0 + h, gy1) - max(y0, gy0))
        # the crop shows goods, not background: all it can of them along each axis
        assert overlap >= 0.95 * min(w, gx1 - gx0) * min(h, gy1 - gy0), (
            index,
            meta["crop"],
            (gx0, gy0, gx1, gy1),
        )


def test_export_style_and_crop_size_do_not_depend_on_the_label() -> None:
    """A counterfeit packing can grow the parcel and so the scan's shape; the crop's size must not follow."""
    for index in range(16):
        genuine, fake = (
            synth_xray.render(_xray_job(index, label, cues, "mixed"))[2]
            for label, cues in (("genuine", ()), ("counterfeit", ("packing_pattern", "fill_level")))
        )
        assert genuine["export_style"] == fake["export_style"]
        assert ("crop" in genuine) == ("crop" in fake)
        if "crop" in genuine:
            assert genuine["crop"][2:] == fake["crop"][2:]


def test_cli_unknown_export_style_names_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--modality", "xray", "--n", "2", "--size", "64", "--out", str(tmp_path)]
    assert synth_main([*base, "--export-style", "sepia"]) == 2
    err = capsys.readouterr().err
    assert "Unknown export style 'sepia'" in err and "Traceback" not in err
    assert "Valid styles: png16, grey8-png, grey8-jpeg, rgb-grey-jpeg, pseudo-colour, mixed" in err
    assert (
        synth_main(["--modality", "photo", "--n", "2", "--out", str(tmp_path), "--export-style", "mixed"])
        == 2
    )
    assert "--export-style applies to --modality xray only" in capsys.readouterr().err
    assert synth_main([*base, "--export-style", "rgb-grey-jpeg", "--crops"]) == 0


def test_the_goods_box_turns_with_the_scan() -> None:
    """A box drawn on a plane and turned as the scan is (PIL's rotate) lands inside the turned box,
    which is no larger than it must be: the goods' place in the scan as written (what the threat
    report's regions are measured against)."""
    from PIL import Image

    from verity.datasets.synth_xray import rotated_box

    plane = np.zeros((120, 200), np.float32)
    plane[30:60, 40:100] = 1.0
    for angle in (8.0, -6.5, 0.0):
        turned = np.asarray(Image.fromarray(plane, "F").rotate(angle, Image.Resampling.BILINEAR))
        ys, xs = np.nonzero(turned > 0.5)
        x0, y0, x1, y1 = rotated_box((40, 30, 100, 60), angle, 200, 120)
        assert x0 <= xs.min() and y0 <= ys.min() and xs.max() < x1 and ys.max() < y1, angle
        assert max(xs.min() - x0, ys.min() - y0, x1 - 1 - xs.max(), y1 - 1 - ys.max()) <= 3, angle
