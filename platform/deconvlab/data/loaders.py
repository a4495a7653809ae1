"""The DataLoaders every data module builds the same way."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                worker_init_fn: Callable[[int], None] | None = None, pin_memory: bool = False,
                batched: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is reproducible by ``seed`` and whose workers persist across epochs.

    Args:
        dataset: the samples.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a fresh seeded permutation every epoch.
        num_workers: loader processes; 0 loads in the training process.
        seed: seeds the shuffling (and, through it, each worker's torch seed).
        worker_init_fn: run in each worker at start (e.g. to reseed NumPy-based augmentation).
        pin_memory: page-locked batches, for faster and asynchronous copies to a GPU.
        batched: ``dataset[indices]`` takes a list of indices and returns the whole batch at once (one
            vectorised gather instead of ``batch_size`` lookups and a collation); the batches are the
            same, in the same order, as per-sample indexing with the same seed gives.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    common = {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": pin_memory,
              "worker_init_fn": worker_init_fn, "generator": generator}
    if not batched:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **common)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    # batch_size=None turns automatic batching off: each "index" the sampler yields is a whole batch.
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None, **common)


def uses_gpu(trainer: pl.Trainer | None) -> bool:
    """Whether ``trainer`` (the one a data module is attached to, if any) trains on a CUDA device."""
    from pytorch_lightning.accelerators import CUDAAccelerator

    return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)


class SplitDataModule(pl.LightningDataModule):
    """A data module with a training set and an evaluation set (the ``split`` val/test loaders read).

    Subclasses fill ``train_set`` and ``eval_set`` in ``setup`` and set ``batch_size``, ``num_workers`` and
    ``seed``; this class builds their loaders. Batches are pinned only when the attached trainer uses a GPU
    (pinning costs a copy per batch and buys nothing on CPU). ``batched_indexing = True`` says the data
    sets accept a list of indices (see :func:`make_loader`).
    """

    train_set: Dataset | None = None
    eval_set: Dataset | None = None
    worker_init_fn: Callable[[int], None] | None = None
    batched_indexing = False

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return make_loader(dataset, self.batch_size, shuffle, self.num_workers, self.seed, self.worker_init_fn,
                           pin_memory=uses_gpu(self.trainer), batched=self.batched_indexing)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
