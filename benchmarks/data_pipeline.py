"""How fast each data module feeds its model, and how much of a training step waits for data.

For each data module (its default config: batch size, augmentation, and the default ``num_workers``
unless ``--workers`` lists others to compare), with the model of one experiment that trains on it,
one intra-op thread in the training process:

1. loader: samples/s of the training ``DataLoader`` alone (decode, degrade or augment, crop, patch
   sampling, collate), the first batch (worker start, lazy set-up) left out;
2. model: training steps/s (forward, backward, optimiser step) on one batch held in memory;
3. together: a plain training loop over ``--epochs`` epochs of the loader (as many as ``--batches``
   batches each), timing the wait in ``next(loader)`` apart from the step. "waiting" is wait /
   (wait + step) without the first batch of each epoch; "all-in" keeps it, so it also pays loader
   workers' start-up (the first epoch) and their restart (none with persistent workers): that is what
   the many short trainings of a sweep or a test suite see. "start s" is the first batch's wait.

BraTS (``../shared/data/brats``) and CamVid (``../shared/data/camvid``) are measured when present.
Data module set-up (case decoding, plan, synthetic generation) is excluded and printed apart.

    python benchmarks/data_pipeline.py [--batches 40] [--epochs 2] [--workers 0 1 2] [--smoke-test]
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


def build(experiment: str, workers: int | None):  # noqa: ANN201
    """The composed config, the set-up data module and the task (model + loss)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from deconvlab.build import build_task
    from deconvlab.config import compose_config

    overrides = [f"experiment={experiment}", "trainer.accelerator=cpu"]
    cfg = compose_config(overrides + ([] if workers is None else [f"data.num_workers={workers}"]))
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


def waiting_fractions(task, optimizer, loader, batches: int, epochs: int) -> tuple[float, float, float]:  # noqa: ANN001
    """Steady waiting share, all-in waiting share (first batches included), first batch's wait in s."""
    waits: list[list[float]] = []
    steps: list[list[float]] = []
    for _ in range(epochs):
        waits.append([])
        steps.append([])
        iterator = iter(loader)
        for _ in range(min(batches, len(loader))):
            start = time.perf_counter()
            batch = next(iterator)
            middle = time.perf_counter()
            train_step(task, optimizer, batch)
            waits[-1].append(middle - start)
            steps[-1].append(time.perf_counter() - middle)
        del iterator  # an epoch that stops early must not leave a non-persistent worker pool behind
    steady = sum(sum(w[1:]) for w in waits)
    steady_compute = sum(sum(c[1:]) for c in steps)
    every, compute = sum(sum(w) for w in waits), sum(sum(c) for c in steps)
    return steady / (steady + steady_compute), every / (every + compute), waits[0][0]


def measure(name: str, experiment: str, workers: int | None, batches: int, epochs: int) -> tuple:
    cfg, datamodule, task, setup_s = build(experiment, workers)
    task.train()
    optimizer = optimiser_of(task)
    loader = datamodule.train_dataloader()
    samples_s, batch_size = loader_rate(loader, batches)
    steps_s = model_rate(task, optimizer, next(iter(loader)), batches)
    # A fresh loader, so the all-in figure pays worker start-up as a training run does.
    steady, all_in, start_s = waiting_fractions(task, optimizer, datamodule.train_dataloader(), batches, epochs)
    return (name, experiment, loader.num_workers, batch_size, setup_s, samples_s, steps_s, steady, all_in, start_s)


def format_row(name: str, experiment: str, workers: int, batch: int, setup_s: float, samples_s: float,
               steps_s: float, steady: float, all_in: float, start_s: float) -> str:
    return (f"{name:15s} {experiment:24s} {workers:7d} {batch:5d} {setup_s:7.2f} {samples_s:12.0f} "
            f"{steps_s * batch:11.0f} {steps_s:12.1f} {steady:8.1%} {all_in:7.1%} {start_s:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches timed per figure (per epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the waiting measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="num_workers values to compare (default: each config's own)")
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
        for workers in args.workers or [None]:
            rows.append(format_row(*measure(name, experiment, workers, args.batches, args.epochs)))
            print(f"measured: {rows[-1]}", flush=True)  # long runs: a row as soon as it is known

    print(f"\n{args.batches} batches per figure, {args.epochs} epochs for waiting, 1 thread, "
          f"num_workers {'as configured' if args.workers is None else args.workers}")
    print(f"{'data':15s} {'experiment':24s} {'workers':>7s} {'batch':>5s} {'setup s':>7s} {'loader smp/s':>12s} "
          f"{'model smp/s':>11s} {'model step/s':>12s} {'waiting':>8s} {'all-in':>7s} {'start s':>7s}")
    print("\n".join(rows))
    print("waiting = time in next(loader) / (that + training step), first batch of each epoch left out; "
          "all-in: with them (worker start-up)")


if __name__ == "__main__":
    main()
