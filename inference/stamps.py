"""The two stamps the project compares: when something happened, and whether a file changed.

`utc_now` writes every recorded time (audit rows, reference events, keys, model cards) in one form, ISO
8601 in UTC. `file_stamp` is what a reader re-reads a file on: a size, modification time or inode that
differs means the file was rewritten or replaced (an atomic rename gives a new inode even within one
clock tick).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

FileStamp = tuple[int, int, int]  # size, mtime in nanoseconds, inode


def utc_now(timespec: Literal["seconds", "microseconds"] = "microseconds") -> str:
    """The time now in UTC as ISO 8601: to the microsecond for events that are ordered by it, to the
    second where a person reads it (a key's creation, a model card)."""
    return datetime.now(UTC).isoformat(timespec=timespec)


def file_stamp(path: Path | str) -> FileStamp | None:
    """The file's size, mtime and inode; None when there is no file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
