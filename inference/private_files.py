"""Files written whole, and the files that hold evidence.

Every file the project replaces or publishes goes through `staged_file` (or `write_atomic` for bytes in
hand): a temporary beside the target, fsync'd, then one rename, so no reader ever sees half a file and
a crash leaves the old one. Evidence (audit images, genuine references, the key file) is owner only,
whatever the umask; what other users must read (a manifest, a model) is written readable by all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644  # a manifest or a model: a server running as another user must read it

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


class StagedFile:
    """A temporary file beside `target`, for a writer that needs a path (a library that saves to a file
    name); `publish` moves it onto the target. Made by `staged_file`."""

    def __init__(self, path: Path, target: Path, mode: int) -> None:
        self.path = path
        self.target = target
        self.mode = mode

    def publish(self) -> None:
        """Flushes the finished file to disk, gives it its mode and renames it onto the target."""
        with open(self.path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(self.path, self.mode)
        os.replace(self.path, self.target)


@contextlib.contextmanager
def staged_file(target: Path, mode: int = PRIVATE_FILE_MODE) -> Iterator[StagedFile]:
    """A StagedFile in `target`'s folder (which must exist), removed at the end of the block unless it
    was published: a file that fails a check, or a writer that raises, never replaces the target."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)  # mkstemp: 0600 and a name of its own, so two writers never share a temporary
    staged = StagedFile(Path(temporary), target, mode)
    try:
        yield staged
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_atomic(target: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Writes `data` to `target` through a staged temporary and one rename, creating missing folders
    owner only: no reader sees half."""
    make_private_dir(target.parent)
    with staged_file(target, mode) as staged:
        staged.path.write_bytes(data)
        staged.publish()
