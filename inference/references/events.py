"""The reference store's append-only events log: what it records and how it is read and written.

    <root>/<model name>/events.jsonl   one JSON event per line ("add" or "remove"), fsync'd, written
                                       under an exclusive flock; a reader takes a shared one

A store's current set is the replay of the file (ModelState.apply per event), read again whenever its
stamp (size, mtime, inode) changes. A last line without its newline was never finished (a crash
mid-append) and did not take effect; the next append cuts it off. Files the store writes (images, the
embeddings cache) go through write_atomic: a private temporary and one rename, in 0700 folders. The
store itself is `store.ReferenceStore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from verity.inference.private_files import PRIVATE_FILE_MODE, make_private_dir
from verity.inference.references.errors import ReferenceStoreError

EVENTS_FILE = "events.jsonl"
ACTIONS = ("add", "remove")


@dataclass(frozen=True)
class Reference:
    """One enrolled genuine reference, with its provenance: who enrolled it, when, from where."""

    reference_id: str
    product: str
    sha256: str
    ext: str
    actor: str | None
    role: str | None
    created: str
    source: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Reference:
        """The reference an "add" event enrols (KeyError when a required field is missing)."""
        return cls(
            reference_id=str(event["reference_id"]),
            product=str(event["product"]),
            sha256=str(event["sha256"]),
            ext=str(event["ext"]),
            actor=event.get("actor"),
            role=event.get("role"),
            created=str(event["created"]),
            source=event.get("source"),
        )


@dataclass(frozen=True)
class Enrolment:
    """What `add` did with one image: `added`, or `duplicate` of an existing reference (nothing written)."""

    reference_id: str
    sha256: str
    product: str
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelState:
    """The replay of one model's events.jsonl, and the file stamp it was read at."""

    stamp: tuple[int, int, int] | None = None
    active: dict[str, Reference] = field(default_factory=dict)  # id -> reference, in enrolment order
    removed: dict[str, str] = field(default_factory=dict)  # id -> when it was removed
    by_image: dict[tuple[str, str], str] = field(default_factory=dict)  # (sha, product) -> id
    by_sha: dict[str, str] = field(default_factory=dict)  # sha -> id of its active reference
    generation: int = 0  # bumped on every change, so indexes know to rebuild

    def apply(self, event: dict[str, Any]) -> None:
        if event["action"] == "add":
            reference = Reference.from_event(event)
            self.active[reference.reference_id] = reference
            self.by_image[(reference.sha256, reference.product)] = reference.reference_id
            self.by_sha[reference.sha256] = reference.reference_id
        else:
            reference = self.active.pop(event["reference_id"])
            self.removed[reference.reference_id] = event.get("created", "")
            self.by_image.pop((reference.sha256, reference.product), None)
            self.by_sha.pop(reference.sha256, None)

    def products(self) -> dict[str, list[Reference]]:
        grouped: dict[str, list[Reference]] = {}
        for reference in self.active.values():
            grouped.setdefault(reference.product, []).append(reference)
        return grouped


def parse_events(text: str, path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of an events file; a last line without its newline was never finished (a
    crash mid-append) and did not take effect. Any other unreadable line is a damaged store."""
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReferenceStoreError(f"{path} line {number} is not a JSON event: {error.msg}.") from None
        if not isinstance(event, dict) or event.get("action") not in ACTIONS or "reference_id" not in event:
            raise ReferenceStoreError(f"{path} line {number} is not a reference event.")
        yield event


@contextlib.contextmanager
def locked(path: Path, exclusive: bool) -> Iterator[IO[bytes]]:
    """The events file opened (created 0600 for a writer) under flock: one writer across processes."""
    if exclusive:
        make_private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    else:
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "r+b" if exclusive else "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_event(handle: IO[bytes], event: dict[str, Any]) -> None:
    """Appends one event line and fsyncs it. An unfinished last line (a crash mid-append, never in
    effect) is cut off first, so it cannot merge with this one."""
    handle.seek(0)
    content = handle.read()
    if content and not content.endswith(b"\n"):
        handle.truncate(content.rfind(b"\n") + 1)
    handle.seek(0, os.SEEK_END)
    handle.write((json.dumps(event, sort_keys=True) + "\n").encode())
    handle.flush()
    os.fsync(handle.fileno())
