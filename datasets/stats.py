"""`verity data stats MANIFEST`: counts per label, modality, product and split, as readable tables.

Also checks the one rule splits must keep: no case (or product-only group) in two splits.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from verity.datasets.manifest import read_manifest
from verity.datasets.split import group_key
from verity.inference.vocabulary import LABELS, SPLITS

_NONE = "(none)"


def _table(title: str, counts: dict[str, Counter], limit: int | None = None) -> list[str]:
    """One row per key, one column per label, plus a total; keys sorted by total, largest first."""
    # splits keep their natural order; other keys go largest first
    keys = (
        list(counts)
        if title == "split"
        else sorted(counts, key=lambda key: (-sum(counts[key].values()), key))
    )
    width = max([len(title), *(len(key) for key in keys[:limit])]) + 2
    lines = [f"{title:<{width}}" + "".join(f"{label:>13}" for label in LABELS) + f"{'total':>10}"]
    for key in keys[:limit]:
        row = counts[key]
        lines.append(
            f"{key:<{width}}"
            + "".join(f"{row[label]:>13,}" for label in LABELS)
            + f"{sum(row.values()):>10,}"
        )
    if limit is not None and len(keys) > limit:
        rest: Counter = Counter()
        for key in keys[limit:]:
            rest.update(counts[key])
        lines.append(
            f"{f'({len(keys) - limit} more)':<{width}}"
            + "".join(f"{rest[label]:>13,}" for label in LABELS)
            + f"{sum(rest.values()):>10,}"
        )
    return lines


def manifest_stats(manifest: Path, max_products: int = 30) -> str:
    """Streams the manifest once and renders the tables; raises ManifestError on a bad line."""
    by: dict[str, dict[str, Counter]] = {
        name: defaultdict(Counter) for name in ("modality", "product", "split")
    }
    totals: Counter = Counter()
    group_splits: dict[str, set[str]] = defaultdict(set)
    for row in read_manifest(manifest):
        totals[row.label] += 1
        by["modality"][row.modality][row.label] += 1
        by["product"][row.product or _NONE][row.label] += 1
        by["split"][row.split or _NONE][row.label] += 1
        if row.split:
            group_splits[group_key(row)].add(row.split)
    if not totals:
        return f"{manifest}: no rows."
    rows = sum(totals.values())
    lines = [
        f"{manifest}: {rows:,} images, " + ", ".join(f"{totals[label]:,} {label}" for label in LABELS),
        "",
    ]
    split_counts = {split: by["split"][split] for split in (*SPLITS, _NONE) if split in by["split"]}
    for title, counts, limit in (
        ("split", split_counts, None),
        ("modality", by["modality"], None),
        ("product", by["product"], max_products),
    ):
        lines += _table(title, counts, limit) + [""]
    leaks = sorted(key for key, splits in group_splits.items() if len(splits) > 1)
    cases = sum(key.startswith("case:") for key in group_splits)
    lines.append(f"groups: {len(group_splits):,} ({cases:,} by case_id)")
    if leaks:
        lines.append(
            f"WARNING: {len(leaks)} group(s) appear in more than one split, e.g. {', '.join(leaks[:5])}"
        )
    else:
        lines.append("no group appears in more than one split")
    return "\n".join(lines)
