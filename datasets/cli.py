"""`verity data`: synth, ingest and stats, each imported only when used.

Officers' confirmed cases come from the service as a table (`verity audit confirmed --out DIR`) that
`verity data ingest DIR/confirmed.jsonl` reads like any other: `datasets` never imports `api`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from verity.inference.terminal import terminal_lines
from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    MODALITIES,
)

# subcommand -> (module, function, one-line help). Functions take argv and return an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("verity.datasets.synth", "synth_main", "generate synthetic photos or X-rays with a manifest"),
    "ingest": (
        "verity.datasets.cli",
        "ingest_main",
        "validate, dedupe and split a folder, CSV or JSONL into a manifest",
    ),
    "stats": ("verity.datasets.cli", "stats_main", "print counts per label, modality, product and split"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: verity data <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _load(name: str) -> Callable[[list[str]], int]:
    module_name, function_name, _ = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: list[str] | None = None) -> int:
    """Dispatches `verity data <subcommand>`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"verity data: unknown subcommand {name!r}. Valid subcommands: {', '.join(SUBCOMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    return int(_load(name)(rest) or 0)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _ingest_parser() -> argparse.ArgumentParser:
    description = _load_doc("verity.datasets.ingest")
    parser = argparse.ArgumentParser(prog="verity data ingest", description=description)
    parser.add_argument(
        "src", type=Path, help="a folder tree (genuine/ counterfeit/ ...), a .csv or a .jsonl"
    )
    parser.add_argument("--out", type=Path, required=True, help="manifest JSONL; appended to when it exists")
    parser.add_argument("--modality", choices=MODALITIES, help="modality of rows that do not name one")
    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="split seed (%(default)s)")
    parser.add_argument(
        "--val",
        type=_fraction,
        default=DEFAULT_VAL_FRACTION,
        help="share of groups for validation (%(default)s)",
    )
    parser.add_argument(
        "--test", type=_fraction, default=DEFAULT_TEST_FRACTION, help="share of groups for test (%(default)s)"
    )
    parser.add_argument("--report", type=Path, help="report JSONL (default: <out stem>.report.jsonl)")
    parser.add_argument(
        "--source", help="source name stored in each row (default: the SRC folder or file name)"
    )
    parser.add_argument(
        "--near-threshold",
        type=int,
        default=4,
        help="max differing bits of 64 for a near-duplicate (default 4)",
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument(
        "--case-from-folder",
        action="store_true",
        help="folder tree: the folders other than label/modality names give the case_id",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing manifest instead of appending"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def ingest_main(argv: list[str]) -> int:
    """`verity data ingest SRC --out MANIFEST ...`; returns 1 when no image could be accepted."""
    parser = _ingest_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.near_threshold <= 32:
        parser.error("--near-threshold must lie between 0 and 32")
    from verity.datasets.ingest import IngestOptions, format_summary, ingest

    options = IngestOptions(
        modality=args.modality,
        seed=args.seed,
        val=args.val,
        test=args.test,
        report=args.report,
        near_threshold=args.near_threshold,
        workers=max(1, args.workers),
        overwrite=args.overwrite,
        source=args.source,
        case_from_folder=args.case_from_folder,
        progress=not args.no_progress,
    )
    result = ingest(args.src, args.out, options)
    print(terminal_lines(format_summary(result)))  # rejected examples name the seized files
    if result.accepted == 0 and result.seen > 0:
        print("verity data ingest: no image was accepted; see the report for why.", file=sys.stderr)
        return 1
    return 0


def stats_main(argv: list[str]) -> int:
    """`verity data stats MANIFEST`."""
    parser = argparse.ArgumentParser(
        prog="verity data stats", description="Counts per label, modality, product and split of a manifest."
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--products", type=int, default=30, help="products listed before the rest are summed")
    args = parser.parse_args(argv)
    from verity.datasets.stats import manifest_stats

    print(terminal_lines(manifest_stats(args.manifest, max_products=max(1, args.products))))
    return 0


def _load_doc(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    return doc.strip().split("\n\n")[0]


if __name__ == "__main__":
    sys.exit(main())
