"""How fast each data module feeds its model, and how much of a training step waits for data.

For each data module (its default config: default ``num_workers``, batch size, augmentation), with
the model of one experiment that trains on it, one intra-op thread:

1. loader: samples/s of the training ``DataLoader`` alone (decode, degrade or augment, crop, patch
   sampling, collate), the first batch (worker start, lazy set-up) left out;
2. model: training steps/s (forward, backward, optimiser step) on one batch held in memory;
3. together: a plain training loop over the loader, timing the wait in ``next(loader)`` apart from the
   step; the waiting fraction is wait / (wait + step).

BraTS (``../shared/data/brats``) and CamVid (``../shared/data/camvid``) are measured when present.
Data module set-up (case decoding, plan, synthetic generation) is excluded and printed apart.

    python benchmarks/data_pipeline.py [--batches 20] [--smoke-test]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# data module -> (experiment that trains on it, real-data folder it needs or None)
MODULES = {
    "natural_images": ("quickstart", None),
    "shapes": ("fcn8s_shapes", None),
    "phantom": ("phantom_tinyvol", None),
    "mnist": ("autoencoder_fc", None),
    "brats": ("deepmedic_p9_ctx3_brats", "brats"),
    "camvid": ("fcn8s_camvid", "camvid"),
}


def build(experiment: str):  # noqa: ANN201
    """The composed config, the set-up data module and the task (model + loss)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from deconvlab.config import compose_config
    from deconvlab.train import build_task

    cfg = compose_config([f"experiment={experiment}", "trainer.accelerator=cpu"])
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    start = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup("fit")
    setup_s = time.perf_counter() - start
    return cfg, datamodule, build_task(cfg), setup_s


def optimiser_of(task):  # noqa: ANN001, ANN201
    optimizers = task.configure_optimizers()
    return optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers


def loader_rate(loader, batches: int) -> tuple[float, int]:  # noqa: ANN001
    """Samples/s over ``batches`` batches after the first; also the batch size seen."""
    iterator = iter(loader)
    first = next(iterator)
    size = len(next(iter(first.values())))
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        samples += len(next(iter(batch.values())))
    return samples / (time.perf_counter() - start), size


def train_step(task, optimizer, batch) -> None:  # noqa: ANN001
    optimizer.zero_grad(set_to_none=True)
    loss, _ = task.step(batch)
    loss.backward()
    optimizer.step()


def model_rate(task, optimizer, batch, steps: int) -> float:  # noqa: ANN001
    train_step(task, optimizer, batch)  # warm-up (allocations, lazy modules)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(task, optimizer, batch)
    return steps / (time.perf_counter() - start)


def waiting_fraction(task, optimizer, loader, batches: int) -> float:  # noqa: ANN001
    """Share of loop time spent in ``next(loader)``, the first batch left out."""
    iterator = iter(loader)
    train_step(task, optimizer, next(iterator))
    wait = compute = 0.0
    for _ in range(batches):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        middle = time.perf_counter()
        train_step(task, optimizer, batch)
        wait, compute = wait + middle - start, compute + time.perf_counter() - middle
    return wait / (wait + compute)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    parser.add_argument("--modules", nargs="*", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--smoke-test", action="store_true", help="3 batches of the synthetic modules")
    args = parser.parse_args()
    if args.smoke_test:
        args.batches, args.modules = 3, [m for m in args.modules if MODULES[m][1] is None]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    import torch

    torch.set_num_threads(1)
    rows = []
    for name in args.modules:
        experiment, needs = MODULES[name]
        if needs is not None and not (SHARED_DATA / needs).is_dir():
            print(f"skipping {name}: {SHARED_DATA / needs} is absent")
            continue
        cfg, datamodule, task, setup_s = build(experiment)
        task.train()
        optimizer = optimiser_of(task)
        loader = datamodule.train_dataloader()
        samples_s, batch_size = loader_rate(loader, args.batches)
        steps_s = model_rate(task, optimizer, next(iter(loader)), args.batches)
        waiting = waiting_fraction(task, optimizer, loader, args.batches)
        rows.append((name, experiment, loader.num_workers, batch_size, setup_s, samples_s, steps_s, waiting))

    print(f"\n{args.batches} batches per figure, 1 thread, default num_workers and batch size")
    print(f"{'data':15s} {'experiment':24s} {'workers':>7s} {'batch':>5s} {'setup s':>7s} {'loader smp/s':>12s} "
          f"{'model smp/s':>11s} {'model step/s':>12s} {'waiting':>8s}")
    for name, experiment, workers, batch, setup_s, samples_s, steps_s, waiting in rows:
        print(f"{name:15s} {experiment:24s} {workers:7d} {batch:5d} {setup_s:7.2f} {samples_s:12.0f} "
              f"{steps_s * batch:11.0f} {steps_s:12.1f} {waiting:8.1%}")
    print("waiting = time in next(loader) / (that + training step), in a plain loop over the loader")


if __name__ == "__main__":
    main()
