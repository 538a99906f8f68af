"""The weak-run guard: a run that did not learn must say so, never quietly become a model.

A model that answers `uncertain` to nearly every image, or scores at chance, looks like any other
model file to the server. `verity train` checks the validation figures before it writes model.pt and
refuses (exit status 3) unless `--allow-weak` is given. Signs, each with its likely causes:

- validation ROC AUC indistinguishable from chance (its 95% interval, Hanley & McNeil 1982, holds 0.5);
- nearly every validation image between the thresholds (`uncertain`).

Reported with them, but not refused alone: the calibration temperature at its clamp (with chance-level
ranking it means the logits carry nothing; a model that ranks perfectly but is offset hits it too),
and the training loss not falling after the first epoch (an easy set converges within it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from verity.inference.card import WEAK_RUN
from verity.training.calibrate import MAX_TEMPERATURE, MIN_TEMPERATURE

UNCERTAIN_SHARE_LIMIT = 0.9
LOSS_DROP_MIN = 0.05  # the best epoch's training loss at least 5% below the first epoch's

CAUSES = (
    "labels that do not match the images (a shuffled or inverted folder, a wrong manifest column)",
    "images the decoder turns into near-constant inputs (check `verity data stats` and a few "
    "`verity predict` scores)",
    "too few images or too few epochs for the differences to show",
    "augmentation that erases the evidence (try --no-augment to compare)",
)


class WeakRunError(RuntimeError):
    """The run did not learn; the message lists the signs and the likely causes."""


def auc_interval(auc: float, n_genuine: int, n_counterfeit: int) -> tuple[float, float]:
    """A 95% interval for ROC AUC from its Hanley-McNeil standard error (no resampling needed)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (n_counterfeit - 1) * (q1 - auc * auc) + (n_genuine - 1) * (q2 - auc * auc)
    ) / max(1, n_genuine * n_counterfeit)
    half = 1.96 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def weak_signs(
    val_auc: float | None,
    val_targets: np.ndarray,
    uncertain_share: float,
    temperature: float,
    history: list[dict[str, Any]],
) -> tuple[list[str], list[str]]:
    """(signs that refuse the run, signs only reported) from the validation figures and the loss log."""
    refuse, report = [], []
    n_counterfeit = int(np.sum(val_targets))
    n_genuine = len(val_targets) - n_counterfeit
    if val_auc is not None:
        low, high = auc_interval(val_auc, n_genuine, n_counterfeit)
        if low <= 0.5:
            refuse.append(
                f"validation ROC AUC {val_auc:.3f} (95% interval {low:.2f}-{high:.2f}) is not above chance"
            )
    at_clamp = min(abs(temperature - MAX_TEMPERATURE), abs(temperature - MIN_TEMPERATURE)) < 1e-6
    if at_clamp:
        report.append(f"the calibration temperature hit its clamp ({temperature:g})")
    if uncertain_share >= UNCERTAIN_SHARE_LIMIT:
        refuse.append(f"{uncertain_share:.0%} of validation images would be answered `uncertain`")
    losses = [record["train_loss"] for record in history if record.get("train_loss") is not None]
    if len(losses) >= 2 and min(losses[1:]) > losses[0] * (1 - LOSS_DROP_MIN):
        report.append(f"the training loss did not fall ({losses[0]:.3f} in epoch 1, best {min(losses):.3f})")
    return refuse, report


def check_run(refuse: list[str], report: list[str], allow_weak: bool) -> list[str]:
    """Raises WeakRunError when a refusing sign is present and weak runs are not allowed; else returns
    the warnings to record in the card."""
    if refuse and not allow_weak:
        signs = "\n".join(f"  - {sign}" for sign in refuse + report)
        causes = "\n".join(f"  - {cause}" for cause in CAUSES)
        raise WeakRunError(
            f"This run did not learn to tell genuine from counterfeit, so no model was written:\n{signs}\n"
            f"Likely causes:\n{causes}\n"
            "Give --allow-weak to write the model anyway (it is then marked weak in its card)."
        )
    return [f"{WEAK_RUN}{sign}" for sign in refuse] + report
