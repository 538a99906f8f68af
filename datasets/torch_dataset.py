"""The torch Dataset over manifest rows (see datasets.rows for how `--data` becomes split rows).

Each item goes through the server's own decoder: `decode_image` then `to_model_input`, with the training
augmentation applied to the decoded array in between (training only).

This is the one module of `datasets/` that imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from verity.datasets.manifest import ManifestRow
from verity.inference.decode import decode_image
from verity.inference.preprocess import to_model_input
from verity.inference.spec import PreprocessSpec

# An augmenter takes a decoded HxWxC array and returns (augmented array, spec to preprocess it with).
Augment = Callable[[np.ndarray], tuple[np.ndarray, PreprocessSpec]]


class ManifestDataset(Dataset):
    """Rows -> (CxSxS float32 tensor in [0, 1], class index), decoded exactly as the server decodes.

    A key may be an index or (index, augmentation seed): the trainer's sampler hands out seeds, so each
    sample's augmentation depends on (run seed, epoch, index) only, not on which worker decodes it,
    and a resumed run sees the same augmentations it would have seen.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        spec: PreprocessSpec,
        augment: Augment | None = None,
        seed_augment: Callable[[int], None] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.spec = spec
        self.augment = augment
        self.seed_augment = seed_augment
        self.targets = [row.target for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[index]
        try:
            image = decode_image(Path(row.path).read_bytes(), draft_size=self.spec.image_size)
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read training image {row.path}: {error}") from error
        spec = self.spec
        if self.augment is not None:
            if seed is not None and self.seed_augment is not None:
                self.seed_augment(seed)
            image, spec = self.augment(image)
        return torch.from_numpy(to_model_input(image, spec)), row.target
