"""Foreign images for a model: images of things it never learned, sent as its modality.

The groups an X-ray model trained on real scans must not give a confident verdict to (and a photo
model, sent the same as photos):
- library photos: scikit-image's bundled photographs as JPEG, in colour where they are colour;
- library photos in grey: the same turned grey and resized to a 256 px shorter side (above any
  model's training envelope), the "grey renderings" a grey X-ray model finds hardest;
- faces in grey at 128 px: the 200 Labeled Faces in the Wild thumbnails of scikit-image, enlarged;
- product photos: the synthetic photo generator's labels and packages (colour JPEG);
- parts photographed in grey: magnetic tiles from ../shared/real (real camera crops of parts), when
  the real sets are beside the repository;
- medical DICOM: pydicom's bundled test files with pixel data (MR, CT, US, NM, secondary captures)
  that Verity's decoder reads;
- pseudo-colour scans: the synthetic X-ray generator in the pseudo-colour console style (another
  scanner's colour scheme for a grey model).
Industrial radiographs (RIAWELC welds) are foreign to a fish-bone or parcel model but are X-ray: they
form a probe group apart from the totals.

Nothing here is stored in the repository: each image is read from an installed package, generated, or
read in place from ../shared/real, at run time.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ood_images import PROBE, OodImage, found_images  # noqa: E402
from benchmarks.real_sets import REAL  # noqa: E402
from verity.datasets.manifest import read_manifest, resolve_image_path  # noqa: E402
from verity.inference.decode import DecodeError, decode_image  # noqa: E402

GREY_SIDE = 256
FACE_SIDE = 128
SYNTH_SEED = 99  # not a seed any training set here uses
PRODUCT_PHOTOS = "product photos"
PSEUDO_COLOUR_SCANS = "pseudo-colour scans"
# Groups read from a real set beside the repository: own kind, not foreign, to a model trained on it.
REAL_SET_GROUPS = {
    "magnetic_tiles": "parts photographed in grey",
    "riawelc_welds": PROBE + "industrial radiographs",
}


def _encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def library_images() -> Iterator[OodImage]:
    """The scikit-image photographs as they are, grey at 256 px, and the faces grey at 128 px."""
    for found in found_images():
        with Image.open(io.BytesIO(found.data)) as opened:
            grey = opened.convert("L")
        if found.group == "found: faces":
            enlarged = grey.resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BICUBIC)
            yield OodImage("faces in grey at 128 px", found.name, _encode(enlarged, "PNG"))
            continue
        yield OodImage("library photos", found.name, found.data)
        scale = GREY_SIDE / min(grey.size)
        size = (round(grey.width * scale), round(grey.height * scale))
        resized = grey.resize(size, Image.Resampling.LANCZOS)
        yield OodImage("library photos in grey", found.name, _encode(resized, "PNG"))


def _synth(modality: str, n: int, extra: list[str]) -> list[Path]:
    out = ROOT / "data" / "foreign" / f"synth-{modality}{'-'.join([''] + extra[1:2])}"
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        command = [str(ROOT / ".venv/bin/verity"), "data", "synth", "--modality", modality, "--n", str(n),
                   "--seed", str(SYNTH_SEED), "--out", str(out), *extra]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    return [resolve_image_path(manifest, row) for row in read_manifest(manifest)]


def generated_images(n: int = 40) -> Iterator[OodImage]:
    for path in _synth("photo", n, []):
        yield OodImage(PRODUCT_PHOTOS, path.name, path.read_bytes())
    for path in _synth("xray", n, ["--export-style", "pseudo-colour"]):
        yield OodImage(PSEUDO_COLOUR_SCANS, path.name, path.read_bytes())


def medical_dicom() -> Iterator[OodImage]:
    """pydicom's test files with pixel data that our decoder reads, at least 32 px a side."""
    from pydicom.data import get_testdata_files

    for path in sorted(get_testdata_files("*.dcm")):
        data = Path(path).read_bytes()
        try:
            pixels = decode_image(data)
        except (DecodeError, ValueError, OSError):
            continue
        if min(pixels.shape[:2]) >= 32:
            yield OodImage("medical DICOM", Path(path).name, data)


def real_set_images(name: str, group: str, limit: int) -> Iterator[OodImage]:
    """Up to `limit` images of a real set in ../shared/real, read in place (never copied)."""
    folder = REAL / name
    if not folder.is_dir():
        return
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for path in paths[:: max(1, len(paths) // limit)][:limit]:
        yield OodImage(group, path.name, path.read_bytes())


def foreign_images(probes: bool = True) -> list[OodImage]:
    """Every foreign image, by group; the probe group (industrial radiographs) last, when asked for."""
    images = [
        *library_images(),
        *generated_images(),
        *medical_dicom(),
        *real_set_images("magnetic_tiles", REAL_SET_GROUPS["magnetic_tiles"], 40),
    ]
    if probes:
        images += list(real_set_images("riawelc_welds", REAL_SET_GROUPS["riawelc_welds"], 52))
    return images


if __name__ == "__main__":
    from collections import Counter

    print(Counter(image.group for image in foreign_images()))
