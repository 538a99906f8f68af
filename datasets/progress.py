"""Progress bars for ingest, training and evaluation: on a terminal only.

A bar redraws in place on a terminal; written to a CI log or a file, every redraw becomes a line of its
own, thousands per run. Off a terminal the bars are off, and each command prints its own summary lines
instead (one per epoch in training). tqdm is optional: the serving install has none.
"""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """The bar's interface, doing nothing; iterating it iterates what it wraps."""

    def __init__(self, iterable: Any = ()) -> None:
        self.iterable = iterable

    def __iter__(self):  # noqa: ANN204 - the wrapped iterable's iterator
        return iter(self.iterable)

    def update(self, _: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, iterable: Any = None, **options: Any) -> Any:
    """A tqdm bar over `iterable` (or of `total=`) when enabled and stderr is a terminal, else `NoBar`."""
    if not (enabled and sys.stderr.isatty()):
        return NoBar(iterable if iterable is not None else ())
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar(iterable if iterable is not None else ())
    return tqdm(iterable, file=sys.stderr, mininterval=0.5, dynamic_ncols=True, **options)
