"""Product guides: what a right holder tells officers about its genuine product, beside its references.

A guide is plain data, never markup: the points to check (each a text in one or more languages, with an
optional photo of the genuine feature), contacts, and the date it is valid until. Every publication is a
new version, kept for good (nothing overwrites one), so the guide an officer saw on a day can be shown
again:

    <references root>/guides/<product>/<version>.json     version 1, 2, ...; each written once

Two writers (a CLI and a server worker, or two workers) never take the same version: a version file is
linked into place whole, only if its name is free, and the next number is taken on a clash.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from verity.inference.private_files import PRIVATE_FILE_MODE
from verity.inference.references.names import validate_product
from verity.inference.stamps import utc_now

GUIDES = "guides"


class GuideStore:
    def __init__(self, references_root: Path) -> None:
        self.root = Path(references_root) / GUIDES

    def _folder(self, product: str) -> Path:
        return self.root / validate_product(product)

    def versions(self, product: str) -> list[int]:
        folder = self._folder(product)
        if not folder.is_dir():
            return []
        return sorted(int(path.stem) for path in folder.glob("*.json") if path.stem.isdigit())

    def latest(self, product: str) -> dict[str, Any] | None:
        versions = self.versions(product)
        return self.version(product, versions[-1]) if versions else None

    def version(self, product: str, version: int) -> dict[str, Any] | None:
        path = self._folder(product) / f"{version}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def publish(
        self, product: str, guide: dict[str, Any], actor: str | None, role: str | None
    ) -> dict[str, Any]:
        """Writes the guide as the product's next version and returns it as stored. The file is written
        whole and fsync'd under a temporary name, then linked to its version's name, which fails if
        another writer took that number: a reader never sees half a guide, and no version is replaced."""
        folder = self._folder(product)
        folder.mkdir(parents=True, exist_ok=True)
        version = (self.versions(product) or [0])[-1] + 1
        staged = folder / f".{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            while True:
                record = {**guide, "product": product, "version": version, "created": utc_now(),
                          "actor": actor, "role": role}  # fmt: skip
                data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                handle = os.open(staged, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, PRIVATE_FILE_MODE)
                try:
                    os.write(handle, data)
                    os.fsync(handle)
                finally:
                    os.close(handle)
                try:
                    os.link(staged, folder / f"{version}.json")
                    return record
                except FileExistsError:  # another writer published this version first
                    version += 1
        finally:
            staged.unlink(missing_ok=True)
