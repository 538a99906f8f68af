"""A moving average of the weights (EMA): what `verity train` validates, calibrates and exports.

Why: on a small set the raw weights of any one step are a noisy draw. Their exponential moving average
is a smoother model that depends less on the seed and on which epoch happened to end the run (timm's
training script and torchvision's classification references keep one for the same reason). Buffers are
averaged too, so the BatchNorm statistics are those of many batches, not the last few: a batch of 32
upsampled patches cannot wreck them.

The average spans about EMA_WINDOW_SHARE of the run's steps (the last tenth: the cosine tail), and starts
with a warm-up (timm's decay schedule), so the first steps are followed closely instead of being mixed
with the random head.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

EMA_WINDOW_SHARE = 0.1
MIN_DECAY, MAX_DECAY = 0.9, 0.9998
WARMUP_POWER = 3 / 4  # timm's advice for runs of thousands, not millions, of steps


def ema_decay(total_steps: int) -> float:
    """The decay whose averaging window (1 / (1 - decay) steps) is EMA_WINDOW_SHARE of the run."""
    window = max(1.0, EMA_WINDOW_SHARE * total_steps)
    return min(MAX_DECAY, max(MIN_DECAY, 1.0 - 1.0 / window))


class WeightAverage:
    """The EMA of a model's parameters and buffers, updated after every optimizer step."""

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.decay = ema_decay(total_steps)
        self.ema = ModelEmaV3(
            model, decay=self.decay, use_warmup=True, warmup_power=WARMUP_POWER, foreach=True
        )

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        """`step`: optimizer steps done, counting this one (the schedule's warm-up reads it)."""
        self.ema.update(model, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {key: value.detach().to("cpu", copy=True) for key, value in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
