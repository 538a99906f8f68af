"""Files that hold evidence (audit rows, seized goods' images, genuine references): owner only, whatever
the umask, and written so that no reader ever sees half a file. The audit log (api) and the reference
store (inference) both use these, so there is one definition of each."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700

# The file extension an image is stored under, by the container format `decode.sniff_format` names.
IMAGE_EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "gif": "gif",
    "tiff": "tif",
    "bmp": "bmp",
    "webp": "webp",
    "dicom": "dcm",
}


def image_extension(kind: str) -> str:
    """The extension for a sniffed format; "bin" for one without its own."""
    return IMAGE_EXTENSIONS.get(kind, "bin")


def make_private_dir(path: Path) -> None:
    """Creates `path` and each missing parent as 0700 (Path.mkdir(parents=True) gives parents 0755);
    folders that exist already keep their mode."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def write_atomic(target: Path, data: bytes) -> None:
    """Writes `data` to `target` through a private temporary and one rename: no reader sees half."""
    make_private_dir(target.parent)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
