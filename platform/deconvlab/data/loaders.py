"""The DataLoaders every data module builds the same way."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """A DataLoader whose shuffling is reproducible by ``seed``, whose workers persist across epochs,
    and whose batches are pinned for fast copies when a GPU is present."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init_fn)


class SplitDataModule(pl.LightningDataModule):
    """A data module with a training set and an evaluation set (the ``split`` val/test loaders read).

    Subclasses fill ``train_set`` and ``eval_set`` in ``setup`` and set ``batch_size``, ``num_workers`` and
    ``seed``; this class builds their loaders.
    """

    train_set: Dataset | None = None
    eval_set: Dataset | None = None
    worker_init_fn: Callable[[int], None] | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return make_loader(dataset, self.batch_size, shuffle, self.num_workers, self.seed, self.worker_init_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
