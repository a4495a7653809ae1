"""What the platform's training loop costs on top of a hand-written PyTorch loop, per task.

For one experiment per task, side by side in one process, on the same batches (the same data
module config and seed, so the same shuffled order):

* platform: ``deconvlab.train.train(cfg)``: the Lightning task, its callbacks (checkpointing, sample
  images at the default interval), MLflow logging to a throw-away SQLite store, the progress bar as
  configured by ``conf/trainer/default.yaml`` (``--quiet`` turns it off, like ``deconvlab train --quiet``);
* plain: the model and optimiser from ``deconvlab.train.build_task(cfg)``, the data module's
  ``train_dataloader()``, and ``zero_grad / step(batch) / backward / optimizer.step`` by hand.

Both run ``--epochs`` epochs of ``--steps`` training batches, one intra-op thread each.

What is timed (one-off setup is excluded from both): a step is the time from the end of the previous
training batch to the end of this one, so it includes fetching its batch from the loader. The first
step of each epoch (loader start, epoch-boundary work) is left out of the *hot-loop* rate. Excluded
from the platform figures: imports, SQLite store and MLflow run creation, config logging, data module
setup, model build, ``trainer.fit`` start-up, and after the last batch the final validation,
checkpoint upload and cost logging. The *all-in* rate is steps over the window from the first
training batch's start to the last one's end: it also holds the validation, sample images and
checkpoint of every epoch but the last, which the plain loop does not do.

    python benchmarks/train_overhead.py [--steps 8] [--epochs 4] [--quiet] [--smoke-test]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl

EXPERIMENTS = {
    "restoration": "quickstart",
    "segmentation": "fcn8s_shapes",
    "volumetric": "phantom_tinyvol",
    "reconstruction": "autoencoder_fc",
}


@dataclass
class StepClock:
    """Step times grouped by epoch: each is the gap between consecutive ends of training batches."""

    epochs: list[list[float]] = field(default_factory=list)
    first_start: float | None = None
    last_end: float | None = None
    _previous_end: float | None = None

    def epoch_start(self) -> None:
        self.epochs.append([])
        self._previous_end = None

    def batch_start(self) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
        if self._previous_end is None:
            self._previous_end = now  # the first step of an epoch is timed from its own start

    def batch_end(self) -> None:
        now = time.perf_counter()
        self.epochs[-1].append(now - self._previous_end)
        self._previous_end = self.last_end = now

    def hot_rate(self) -> float:
        """Steps per second, without the first step of each epoch."""
        times = [t for epoch in self.epochs for t in epoch[1:]]
        return len(times) / sum(times)

    def all_in_rate(self) -> float:
        steps = sum(len(e) for e in self.epochs)
        return steps / (self.last_end - self.first_start)


class ClockCallback(pl.Callback):
    """Feeds a :class:`StepClock` from Lightning's training-batch hooks."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.clock.batch_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.clock.batch_end()


def compose(experiment: str, steps: int, epochs: int, quiet: bool):  # noqa: ANN201
    from deconvlab.config import compose_config

    overrides = [f"experiment={experiment}", "trainer.accelerator=cpu", f"trainer.max_epochs={epochs}",
                 f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=2"]
    if quiet:
        overrides.append("trainer.enable_progress_bar=false")
    return compose_config(overrides)


def platform_run(cfg) -> StepClock:  # noqa: ANN001
    from deconvlab.train import train

    clock = StepClock()
    train(cfg, callbacks=[ClockCallback(clock)])
    return clock


def plain_run(cfg, steps: int, epochs: int) -> StepClock:  # noqa: ANN001
    """The same forward/backward/step by hand, in the same order as ``train`` builds things."""
    from hydra.utils import instantiate

    from deconvlab.train import build_task

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    optimizers = task.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    task.train()
    loader = datamodule.train_dataloader()
    clock = StepClock()
    for _ in range(epochs):
        clock.epoch_start()
        for index, batch in enumerate(loader):
            if index == steps:
                break
            clock.batch_start()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = task.step(batch)
            loss.backward()
            optimizer.step()
            clock.batch_end()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training batches per epoch (phantom has 8)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quiet", action="store_true", help="progress bar off (deconvlab train --quiet)")
    parser.add_argument("--tasks", nargs="*", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--smoke-test", action="store_true", help="3 steps x 2 epochs of two tasks")
    args = parser.parse_args()
    if args.smoke_test:
        args.steps, args.epochs, args.tasks = 3, 2, args.tasks[:2]

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                           "DECONVLAB_ARTIFACT_ROOT": str(Path(tmp) / "artifacts"),
                           "DECONVLAB_OUTPUT_ROOT": str(Path(tmp) / "outputs"),
                           "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1"})
        rows = []
        for task, experiment in EXPERIMENTS.items():
            if task not in args.tasks:
                continue
            cfg = compose(experiment, args.steps, args.epochs, args.quiet)
            plain = plain_run(cfg, args.steps, args.epochs)
            platform = platform_run(cfg)
            rows.append((task, experiment, plain, platform))

    print(f"\n{args.steps} steps x {args.epochs} epochs, 1 thread, progress bar "
          f"{'off' if args.quiet else 'as configured'}")
    print(f"{'task':15s} {'experiment':16s} {'plain/s':>8s} {'platform/s':>10s} {'overhead':>9s} "
          f"{'all-in/s':>9s} {'all-in ovh':>10s}")
    for task, experiment, plain, platform in rows:
        hot = 1 - platform.hot_rate() / plain.hot_rate()
        all_in = 1 - platform.all_in_rate() / plain.all_in_rate()
        print(f"{task:15s} {experiment:16s} {plain.hot_rate():8.1f} {platform.hot_rate():10.1f} "
              f"{hot:9.1%} {platform.all_in_rate():9.1f} {all_in:10.1%}")
    print("overhead = 1 - platform steps/s / plain steps/s (hot loop: first step of each epoch left out; "
          "all-in: first batch start to last batch end, incl. mid-run validation, samples, checkpoints)")


if __name__ == "__main__":
    main()
