"""What the platform's training loop costs on top of a hand-written PyTorch loop, per task.

For one experiment per task, side by side in one process, on the same batches (the same data
module config and seed, so the same shuffled order):

* platform: ``deconvlab.train.train(cfg)``: the Lightning task, its callbacks (checkpointing, sample
  images at the default interval), MLflow logging to a throw-away SQLite store, the progress bar as
  configured by ``conf/trainer/default.yaml`` (``--quiet`` turns it off, like ``deconvlab train --quiet``);
* plain: the model and optimiser from ``deconvlab.train.build_task(cfg)``, the data module's
  ``train_dataloader()``, and ``zero_grad / step(batch) / backward / optimizer.step`` by hand.

Both run ``--epochs`` epochs of ``--steps`` training batches (default: the experiment's full epoch),
one intra-op thread each, ``--repeats`` times, interleaved (plain, platform, platform, plain, ...) after
one untimed warm-up run of each, so a burst of load from other processes hits both alike.

What is timed (one-off setup is excluded from both): a step is the time from the end of the previous
training batch to the end of this one, so it includes fetching its batch from the loader. The first
step of each epoch (loader start, epoch-boundary work) is left out of the *hot-loop* rate, which is
1 / the median step time over all repeats (a median, so that other processes' bursts on a shared
machine do not decide it). Excluded
from the platform figures: imports, SQLite store and MLflow run creation, config logging, data module
setup, model build, ``trainer.fit`` start-up, and after the last batch the final validation,
checkpoint upload and cost logging. The *all-in* rate is steps over the window from the first
training batch's start to the last one's end: it also holds the validation, sample images and
checkpoint of every epoch but the last, which the plain loop does not do.

    python benchmarks/train_overhead.py [--steps N] [--epochs 2] [--repeats 3] [--quiet] [--smoke-test]
    python benchmarks/train_overhead.py --switches  # platform steps/s per perf switch instead
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    """Step times grouped by epoch: each is the gap between consecutive ends of training batches.

    Kept twice: wall-clock time, and the training thread's CPU time (``time.thread_time``), which a
    busy shared machine disturbs far less (other processes' time slices do not count).
    """

    epochs: list[list[float]] = field(default_factory=list)
    cpu_epochs: list[list[float]] = field(default_factory=list)
    first_start: float | None = None
    last_end: float | None = None
    _previous_end: tuple[float, float] | None = None

    def epoch_start(self) -> None:
        self.epochs.append([])
        self.cpu_epochs.append([])
        self._previous_end = None

    def batch_start(self) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
        if self._previous_end is None:
            self._previous_end = (now, time.thread_time())  # an epoch's first step is timed from its start

    def batch_end(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.epochs[-1].append(now - self._previous_end[0])
        self.cpu_epochs[-1].append(cpu - self._previous_end[1])
        self._previous_end, self.last_end = (now, cpu), now

    def hot_steps(self, cpu: bool = False) -> list[float]:
        """Step times without the first step of each epoch."""
        return [t for epoch in (self.cpu_epochs if cpu else self.epochs) for t in epoch[1:]]

    def all_in_rate(self) -> float:
        steps = sum(len(e) for e in self.epochs)
        return steps / (self.last_end - self.first_start)


def hot_rate(clocks: list[StepClock], cpu: bool = False) -> float:
    """Steps per second: 1 / the median hot-loop step time over several runs."""
    return 1 / statistics.median(t for clock in clocks for t in clock.hot_steps(cpu))


def all_in_rate(clocks: list[StepClock]) -> float:
    return statistics.median(clock.all_in_rate() for clock in clocks)


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


def compose(experiment: str, steps: int | None, epochs: int, quiet: bool, extra: list[str] = ()):  # noqa: ANN201
    from deconvlab.config import compose_config

    overrides = [f"experiment={experiment}", "trainer.accelerator=cpu", f"trainer.max_epochs={epochs}",
                 f"trainer.limit_train_batches={steps or 'null'}", "trainer.limit_val_batches=2"]
    if quiet:
        overrides.append("trainer.enable_progress_bar=false")
    return compose_config(overrides + list(extra))


def platform_run(cfg) -> StepClock:  # noqa: ANN001
    from deconvlab.train import train

    clock = StepClock()
    train(cfg, callbacks=[ClockCallback(clock)])
    return clock


def plain_run(cfg, steps: int | None, epochs: int) -> StepClock:  # noqa: ANN001
    """The same forward/backward/step by hand, in the same order as ``train`` builds things."""
    from hydra.utils import instantiate

    from deconvlab.build import build_task

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
            if steps and index == steps:
                break
            clock.batch_start()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = task.step(batch)
            loss.backward()
            optimizer.step()
            clock.batch_end()
    return clock


def measure(cfg, steps: int | None, epochs: int, repeats: int) -> tuple[list[StepClock], list[StepClock]]:  # noqa: ANN001
    """Plain and platform runs interleaved (ABBA order), after an untimed warm-up of each."""
    plain_run(cfg, steps, epochs)
    platform_run(cfg)
    plain, platform = [], []
    for repeat in range(repeats):
        order = (plain, platform) if repeat % 2 == 0 else (platform, plain)
        for runs in order:
            runs.append(plain_run(cfg, steps, epochs) if runs is plain else platform_run(cfg))
    return plain, platform


SWITCHES = {"default": [], "bf16-mixed": ["trainer.precision=bf16-mixed"],
            "channels_last": ["perf.channels_last=true"], "compile": ["perf.compile=true"]}


def measure_switches(experiment: str, steps: int | None, epochs: int, repeats: int) -> dict[str, tuple]:
    """Platform hot-loop steps/s (wall, CPU) per perf switch, interleaved; the first run of each is warm-up
    (for compile it holds the compilation, reported apart as the first run's extra seconds)."""
    configs = {name: compose(experiment, steps, epochs, True, extra) for name, extra in SWITCHES.items()}
    warm_up, failed = {}, {}
    for name, cfg in configs.items():
        try:
            warm_up[name] = platform_run(cfg)
        except Exception as error:  # noqa: BLE001 - a switch a model cannot use is a finding, not the end
            failed[name] = (float("nan"), float("nan"), f"{type(error).__name__}: {str(error).splitlines()[0]}")
    configs = {name: cfg for name, cfg in configs.items() if name not in failed}
    runs: dict[str, list[StepClock]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, cfg in configs.items():
            runs[name].append(platform_run(cfg))
    return {name: (hot_rate(clocks), hot_rate(clocks, cpu=True),
                   (warm_up[name].last_end - warm_up[name].first_start)
                   - statistics.median(c.last_end - c.first_start for c in clocks))
            for name, clocks in runs.items()} | failed


def print_switches(experiment: str, results: dict[str, tuple]) -> None:
    base_wall, base_cpu, _ = results["default"]
    for name, (wall, cpu, first_extra_s) in results.items():
        if isinstance(first_extra_s, str):
            print(f"{experiment:16s} {name:14s} failed: {first_extra_s[:200]}")
            continue
        print(f"{experiment:16s} {name:14s} {wall:8.1f} {wall / base_wall:7.2f}x {cpu:8.1f} {cpu / base_cpu:7.2f}x "
              f"{first_extra_s:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved")
    parser.add_argument("--quiet", action="store_true", help="progress bar off (deconvlab train --quiet)")
    parser.add_argument("--tasks", nargs="*", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. data.num_workers=1")
    parser.add_argument("--switches", action="store_true",
                        help="instead: platform steps/s with each perf switch (bf16-mixed, channels_last, compile)")
    parser.add_argument("--smoke-test", action="store_true", help="3 steps x 2 epochs x 1 repeat of two tasks")
    args = parser.parse_args()
    if args.smoke_test:
        args.steps, args.epochs, args.repeats, args.tasks = 3, 2, 1, args.tasks[:2]

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                           "DECONVLAB_ARTIFACT_ROOT": str(Path(tmp) / "artifacts"),
                           "DECONVLAB_OUTPUT_ROOT": str(Path(tmp) / "outputs"),
                           "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1"})
        rows = []
        if args.switches:
            print(f"{'experiment':16s} {'switch':14s} {'steps/s':>8s} {'speed':>8s} {'cpu st/s':>8s} {'cpu spd':>8s} "
                  f"{'1st run +s':>9s}")
            for task in args.tasks:
                print_switches(EXPERIMENTS[task], measure_switches(EXPERIMENTS[task], args.steps, args.epochs,
                                                                   args.repeats))
            return
        for task, experiment in EXPERIMENTS.items():
            if task not in args.tasks:
                continue
            cfg = compose(experiment, args.steps, args.epochs, args.quiet, args.override)
            plain, platform = measure(cfg, args.steps, args.epochs, args.repeats)
            rows.append((task, experiment, sum(len(e) for e in plain[0].epochs) // args.epochs, plain, platform))

    print(f"\n{args.steps or 'all'} steps x {args.epochs} epochs x {args.repeats} interleaved repeats, 1 thread, "
          f"progress bar {'off' if args.quiet else 'as configured'}")
    print(f"{'task':15s} {'experiment':16s} {'steps':>5s} {'plain/s':>8s} {'platform/s':>10s} {'overhead':>9s} "
          f"{'cpu ovh':>8s} {'all-in/s':>9s} {'all-in ovh':>10s}")
    for task, experiment, steps, plain, platform in rows:
        hot = 1 - hot_rate(platform) / hot_rate(plain)
        cpu = 1 - hot_rate(platform, cpu=True) / hot_rate(plain, cpu=True)
        all_in = 1 - all_in_rate(platform) / all_in_rate(plain)
        print(f"{task:15s} {experiment:16s} {steps:5d} {hot_rate(plain):8.1f} {hot_rate(platform):10.1f} "
              f"{hot:9.1%} {cpu:8.1%} {all_in_rate(platform):9.1f} {all_in:10.1%}")
    print("overhead = 1 - platform steps/s / plain steps/s (hot loop: median step, first step of each epoch left "
          "out; cpu: the same from the training thread's CPU time; all-in: first batch start to last batch end, "
          "incl. mid-run validation, samples, checkpoints)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

if __name__ == "__main__":
    main()
