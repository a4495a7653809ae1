"""Where MRI patch centres come from: class-balanced training centres drawn afresh every epoch, uniform
validation centres, and the sampler that tells a dataset which epoch it is serving.

A *case* here is anything with ``label`` (``[D, H, W]`` ints) and ``brain`` (``[D, H, W]`` bool) arrays, as
:class:`deconvlab.data.brats.Case`; centres are ``[N, 4]`` int64 arrays of (case index, z, y, x).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from deconvlab.errors import DataError


def label_pools(cases: Sequence[Any], num_labels: int) -> list[list[np.ndarray]]:
    """``pools[k][j]``: flat indices of case ``j``'s voxels of label ``k`` (background: inside the brain)."""
    return [[np.flatnonzero((c.label == k) & (c.brain if k == 0 else True)) for c in cases]
            for k in range(num_labels)]


def draw_balanced(cases: Sequence[Any], pools: list[list[np.ndarray]], count: int,
                  label_fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """:func:`sample_balanced_centres` from precomputed :func:`label_pools` and a generator."""
    fractions = np.array([f if any(p.size for p in pools[k]) else 0.0 for k, f in enumerate(label_fractions)])
    if fractions.sum() <= 0:
        raise DataError("no voxel of any sampled label in the cases", "data.label_fractions",
                        "give a share to a label the cases hold, or check their label files")
    labels = rng.choice(len(fractions), size=count, p=fractions / fractions.sum())
    centres = np.empty((count, 4), np.int64)
    for i, k in enumerate(labels):
        holders = [j for j, p in enumerate(pools[k]) if p.size]
        case = holders[rng.integers(len(holders))]
        flat = pools[k][case][rng.integers(pools[k][case].size)]
        centres[i] = (case, *np.unravel_index(flat, cases[case].label.shape))
    return centres


def sample_balanced_centres(cases: Sequence[Any], count: int, label_fractions: Sequence[float],
                            seed: int | Sequence[int]) -> np.ndarray:
    """Centre voxels whose labels follow ``label_fractions`` (background = brain voxels of label 0).

    A label is drawn first, then a case holding it, then one of its voxels, so rare labels get the
    share configured for them rather than their share of the volume. Labels absent from every case
    have their share spread over the others.

    Returns:
        ``[count, 4]`` int64 array of (case index, z, y, x).
    """
    pools = label_pools(cases, len(label_fractions))
    return draw_balanced(cases, pools, count, label_fractions, np.random.default_rng(seed))


def sample_uniform_centres(cases: Sequence[Any], count: int, seed: int | Sequence[int]) -> np.ndarray:
    """Centre voxels drawn uniformly inside the brains (the natural class mix, for validation Dice)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([c.brain.sum() for c in cases], np.float64)
    which = rng.choice(len(cases), size=count, p=sizes / sizes.sum())
    centres = np.empty((count, 4), np.int64)
    for j, case in enumerate(cases):
        rows = np.flatnonzero(which == j)
        pool = np.flatnonzero(case.brain)
        picked = pool[rng.integers(pool.size, size=rows.size)]
        centres[rows, 0] = j
        centres[rows, 1:] = np.stack(np.unravel_index(picked, case.label.shape), axis=1)
    return centres


class FreshCentres:
    """Training centres drawn afresh every epoch: class-balanced, or (from ``natural_from`` on) uniform
    inside the brain, i.e. following the true label distribution (Havaei's second training phase).

    Epoch ``e``'s centres come from ``numpy.random.default_rng([seed, e])``: the same seed gives the same
    sequence of epochs, whatever ran before, in any process (loader workers draw them again themselves).

    Args:
        cases: the training volumes.
        count: centres per epoch.
        label_fractions: class shares of the balanced epochs.
        seed: the data seed.
        natural_from: first epoch drawn from the true distribution; None = never.
    """

    def __init__(self, cases: Sequence[Any], count: int, label_fractions: Sequence[float], seed: int,
                 natural_from: int | None = None) -> None:
        self.cases, self.count, self.seed = list(cases), count, seed
        self.label_fractions, self.natural_from = list(label_fractions), natural_from
        self._pools: list[list[np.ndarray]] | None = None
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def natural(self, epoch: int) -> bool:
        """Whether ``epoch`` draws from the true label distribution."""
        return self.natural_from is not None and epoch >= self.natural_from

    def __call__(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            rng_seed = [self.seed, epoch]
            if self.natural(epoch):
                centres = sample_uniform_centres(self.cases, self.count, rng_seed)
            else:
                if self._pools is None:  # the label pools cost a pass over every volume: once
                    self._pools = label_pools(self.cases, len(self.label_fractions))
                centres = draw_balanced(self.cases, self._pools, self.count, self.label_fractions,
                                        np.random.default_rng(rng_seed))
            self._cached = (epoch, centres)
        return self._cached[1]


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for ``i < size``: the dataset draws that epoch's centres itself, so loader
    workers (started afresh every epoch or not) read the same centres as the main process.

    Lightning calls :meth:`set_epoch` before every training epoch (as for a ``DistributedSampler``); a
    plain loop gets the next epoch after each complete pass. The order is sequential: the centres are
    already independent random draws.
    """

    def __init__(self, size: int) -> None:
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        yield from ((epoch, i) for i in range(self.size))
        self.epoch = epoch + 1  # reached only after a complete pass
