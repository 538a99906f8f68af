"""The uploaded images a server keeps (VERITY_STORE_IMAGES), content-addressed by SHA-256, so that
confirmed cases can become training data (`verity audit confirmed`)."""

from __future__ import annotations

from pathlib import Path

from verity.inference.private_files import image_extension, write_atomic


class ImageStore:
    """Content-addressed image files: <root>/<sha[:2]>/<sha>.<ext>, each written once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes, sha256: str, kind: str) -> str:
        target = self.root / sha256[:2] / f"{sha256}.{image_extension(kind)}"
        if not target.exists():
            write_atomic(target, data)  # a reader never sees half an image; two uploads never collide
        return str(target)
