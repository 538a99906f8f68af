"""Group-aware, label-stratified train/val/test splits that stay put when new data is appended.

A group is a seizure or shipment (case_id), else a product, else a single file: every image of a group
lands in one split, so the model is never tested on a shipment it trained on. Groups are placed greedily,
largest first (ties broken by the seed), each into the split whose per-label share is furthest below
its target, counting the rows already placed (including those of an existing manifest, which never move).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

from verity.datasets.manifest import ManifestRow
from verity.inference.vocabulary import LABELS, SPLITS


def group_key(row: ManifestRow) -> str:
    """The unit that must not straddle splits: case_id, else product, else the file itself."""
    if row.case_id:
        return f"case:{row.case_id}"
    if row.product:
        return f"product:{row.product}"
    return f"file:{row.path}"


def split_fractions(val: float, test: float) -> dict[str, float]:
    """Target share of each split; raises ValueError naming the valid range."""
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(
            f"Invalid split fractions val={val}, test={test}: each must be in [0, 1) and val + test < 1."
        )
    return {"train": 1.0 - val - test, "val": val, "test": test}


def _imbalance(counts: Mapping[str, Counter], totals: Counter, fractions: Mapping[str, float]) -> float:
    """Squared distance between each split's share of each label and its target share."""
    error = 0.0
    for split in SPLITS:
        for label in LABELS:
            if totals[label]:
                error += (counts[split][label] / totals[label] - fractions[split]) ** 2
    return error


def assign_groups(
    new_groups: Mapping[str, Counter],
    fractions: Mapping[str, float],
    seed: int,
    placed: Mapping[str, Counter] | None = None,
) -> dict[str, str]:
    """Chooses a split for each new group (its label counts given), reproducibly for a seed.

    `placed` holds the label counts per split already fixed (an existing manifest); the new groups are
    placed so the whole reaches the target fractions as closely as groups allow.
    """
    counts = {split: Counter((placed or {}).get(split, {})) for split in SPLITS}
    totals: Counter = Counter()
    for split in SPLITS:
        totals.update(counts[split])
    for labels in new_groups.values():
        totals.update(labels)
    keys = sorted(new_groups)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda key: -sum(new_groups[key].values()))  # stable: the shuffle breaks ties
    assignment: dict[str, str] = {}
    for key in keys:
        labels = new_groups[key]
        best_split, best_error = SPLITS[0], float("inf")
        for split in SPLITS:
            if fractions[split] <= 0.0:
                continue
            counts[split].update(labels)
            error = _imbalance(counts, totals, fractions)
            counts[split].subtract(labels)
            if error < best_error - 1e-12:
                best_split, best_error = split, error
        counts[best_split].update(labels)
        assignment[key] = best_split
    return assignment
