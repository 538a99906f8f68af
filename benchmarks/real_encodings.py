"""Real radiographs keep their signal in every encoding a console writes.

Each image of the real X-ray sets in ../shared/real/ (riawelc_welds: 8-bit grey PNG; gdxray_fishbones:
RGB JPEG of grey content) is re-encoded as RGB JPEG, grey JPEG, RGB PNG, 16-bit PNG, 16-bit TIFF and
16-bit DICOS, and each form goes through the serving path (`load_for_model`) with the shipped X-ray
model's spec. Printed per form: the mean and largest difference from the original's tensor, how many
tensors came out constant (the old fault: every 8-bit RGB JPEG became all 1.0), and the largest score
difference the shipped model gives the same image in two forms.

    .venv/bin/python benchmarks/real_encodings.py [--sets riawelc_welds gdxray_fishbones]
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import newest_shipped  # noqa: E402
from verity.datasets.encode import encode_dicom  # noqa: E402
from verity.inference.decode import decode_image  # noqa: E402
from verity.inference.engine import OnnxEngine  # noqa: E402
from verity.inference.preprocess import is_grey_content, load_for_model  # noqa: E402

REAL = ROOT.parent / "shared" / "real"


def _pil(grey: np.ndarray, fmt: str, mode: str = "L", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).convert(mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _tiff16(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, grey.astype(np.uint16) * 257)
    return buffer.getvalue()


FORMS: dict[str, Callable[[np.ndarray], bytes]] = {
    "RGB JPEG q90": lambda grey: _pil(grey, "JPEG", "RGB", quality=90),
    "grey JPEG q90": lambda grey: _pil(grey, "JPEG", quality=90),
    "RGB PNG": lambda grey: _pil(grey, "PNG", "RGB"),
    "16-bit PNG": lambda grey: _pil(grey.astype(np.uint16) * 257, "PNG", "I;16"),
    "16-bit TIFF": _tiff16,
    "16-bit DICOS": lambda grey: encode_dicom(grey.astype(np.uint16) * 257),
}


def grey_of(path: Path) -> np.ndarray:
    """The original's grey plane (its own file is the reference form)."""
    image = decode_image(path.read_bytes())
    if image.shape[2] == 3:
        assert is_grey_content(image), f"{path} is not grey content"
    return image[..., 0]


def measure(paths: list[Path], engine: OnnxEngine) -> None:
    spec = engine.spec
    rows = {name: {"mean": [], "max": [], "constant": 0, "score": []} for name in FORMS}
    for path in paths:
        original = path.read_bytes()
        reference = load_for_model(original, spec)
        reference_score = float(engine.predict(reference[None])[0].score)
        grey = grey_of(path)
        for name, encode in FORMS.items():
            tensor = load_for_model(encode(grey), spec)
            difference = np.abs(tensor - reference)
            rows[name]["mean"].append(float(difference.mean()))
            rows[name]["max"].append(float(difference.max()))
            rows[name]["constant"] += int(tensor.std() < 1e-3)
            rows[name]["score"].append(abs(float(engine.predict(tensor[None])[0].score) - reference_score))
    print(f"{len(paths)} images; model {engine.name} {engine.version} ({spec.in_chans} channel(s))")
    print("| form | mean abs diff | largest diff | constant tensors | score change: median, largest |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {np.mean(row['mean']):.4f} | {np.max(row['max']):.4f} | {row['constant']} "
              f"| {np.median(row['score']):.4f}, {np.max(row['score']):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", default=["riawelc_welds", "gdxray_fishbones"])
    args = parser.parse_args()
    model = newest_shipped("xray-default")
    if model is None or not REAL.is_dir():
        raise SystemExit("Needs the shipped X-ray model and the real sets in ../shared/real/.")
    engine = OnnxEngine(model)
    for name in args.sets:
        print(f"\n{name}")
        measure(sorted((REAL / name).glob("*/*.*g")), engine)


if __name__ == "__main__":
    main()
