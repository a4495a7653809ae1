"""The base every data module stands on: a training set, an evaluation set, and their DataLoaders.

A data module fills ``train_set`` and ``eval_set`` in ``setup``; :class:`SplitDataModule` builds the
loaders, the same way for every data set. What differs between data sets is declared, not coded: class
attributes say how a set is indexed, shuffled and loaded (see the class docstring).

Errors: a data module raises a :class:`~deconvlab.errors.MissingDataError` for something absent (a
folder, a split, a file) and a :class:`~deconvlab.errors.DataError` for something present that cannot be
used (an unreadable or mismatched file, a ``data.*`` value the data cannot satisfy); both are user errors
that name the file or config key and say what to do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int | None,
                worker_init_fn: Callable[[int], None] | None = None, pin_memory: bool = False,
                batched: bool = False, persistent_workers: bool = True) -> DataLoader:
    """A DataLoader whose shuffling is reproducible by ``seed``.

    Args:
        dataset: the samples.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a fresh permutation every epoch.
        num_workers: loader processes; 0 loads in the training process.
        seed: seeds the shuffling (and, through it, each worker's torch seed); None draws both from torch's
            global RNG (which ``pl.seed_everything`` seeds).
        worker_init_fn: run in each worker at start (e.g. to reseed NumPy-based augmentation).
        pin_memory: page-locked batches, for faster and asynchronous copies to a GPU.
        batched: ``dataset[indices]`` takes a list of indices and returns the whole batch at once (one
            vectorised gather instead of ``batch_size`` lookups and a collation); the batches are the
            same, in the same order, as per-sample indexing with the same seed gives.
        persistent_workers: keep the worker processes across epochs (when ``num_workers > 0``) instead of
            starting new ones every epoch.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
    common = {"num_workers": num_workers, "persistent_workers": persistent_workers and num_workers > 0,
              "pin_memory": pin_memory, "worker_init_fn": worker_init_fn, "generator": generator}
    if not batched:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **common)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    # batch_size=None turns automatic batching off: each "index" the sampler yields is a whole batch.
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None, **common)


def uses_gpu(trainer: pl.Trainer | None) -> bool:
    """Whether ``trainer`` (the one a data module is attached to, if any) trains on a CUDA device."""
    return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)


class SplitDataModule(pl.LightningDataModule):
    """A data module with a training set and an evaluation set (the ``split`` val/test loaders read).

    Subclasses fill ``train_set`` and ``eval_set`` in ``setup``; this class builds their loaders. Batches
    are pinned only when the attached trainer uses a GPU (pinning costs a copy per batch and buys nothing
    on CPU). The class attributes below are the hooks a subclass sets instead of writing loaders.

    Attributes:
        worker_init_fn: run in every loader worker at start (both sets).
        batched_indexing: the data sets accept a list of indices (see :func:`make_loader`).
        seeded_shuffle: True shuffles from a generator of the loader's own, seeded by ``seed``, so the order
            does not depend on what else drew random numbers; False shuffles from torch's global RNG.
        persistent_workers: keep loader workers across epochs; False starts fresh ones every epoch.
        eval_batch_size: batch size of the evaluation loader; None uses ``batch_size``.
        eval_num_workers: loader processes of the evaluation loader; None uses ``num_workers``.

    Args:
        batch_size: samples per training batch (and per evaluation batch unless ``eval_batch_size``).
        num_workers: loader processes; 0 loads in the training process.
        seed: seeds the shuffling (when ``seeded_shuffle``) and whatever the subclass draws from it.
    """

    train_set: Dataset | None = None
    eval_set: Dataset | None = None
    worker_init_fn: Callable[[int], None] | None = None
    batched_indexing = False
    seeded_shuffle = True
    persistent_workers = True
    eval_batch_size: int | None = None
    eval_num_workers: int | None = None

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int, num_workers: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return make_loader(dataset, batch_size, shuffle, num_workers, self.seed if self.seeded_shuffle else None,
                           self.worker_init_fn, pin_memory=uses_gpu(self.trainer), batched=self.batched_indexing,
                           persistent_workers=self.persistent_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.batch_size if self.eval_batch_size is None else self.eval_batch_size
        num_workers = self.num_workers if self.eval_num_workers is None else self.eval_num_workers
        return self._loader(self.eval_set, False, batch_size, num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
