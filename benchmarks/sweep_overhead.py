"""What a sweep costs on top of running the same trials by hand, and what ASHA saves over FIFO.

Side by side in one run (absolute seconds are noisy on a shared machine; the ratios are the result):
1. the same N short quickstart trials run back-to-back in this process (one thread each), then as a
   sweep with 2 concurrent one-CPU trials: per-trial overhead and parallel efficiency;
   (a sweep of n/2 and one of n trials separate the fixed start-up from the cost per trial);
2. one grid of configurations under FIFO and under ASHA: epochs of compute each spends, and whether
   ASHA's best trial reaches FIFO's best metric within a tolerance.

Each sweep is also timed from its own records: the child runs' start and end times in the tracking store
split its wall time into the start (Ray, the store, until the first trial's run opens), the trials (first
trial's start to the last one's end) and the end (the leaderboard, views and reports), so the trials'
own parallel efficiency is told apart from the sweep's fixed costs.

``--long`` makes each trial longer (1,280 training samples per epoch, 4 epochs: 42-44 s on one thread of this
2-core machine on 2026-12-04; the back-to-back time per trial is printed, so the length is checked, not
assumed), where a sweep's fixed costs weigh less; its ASHA setting is the one a user of a 16-epoch
quickstart-like sweep would pick, ``grace_period 1, reduction_factor 3`` over ``max_t`` = ``--asha-epochs``:
rungs at 1, 3 and 9 epochs, a third of the trials going on at each.

``--seeds N`` repeats the FIFO/ASHA comparison with seeds 0..N-1: a trial is deterministic for its seed, so
ASHA's best can only fall short of FIFO's (it stops some of FIFO's trials early); the shortfall, mean and 95 %
Student-t CI over the seeds, is set against how far FIFO's own best moves from seed to seed (its standard
deviation), the noise within which "ASHA reaches FIFO's best" is read.

    python benchmarks/sweep_overhead.py [--trials 8] [--epochs 2] [--asha-epochs 6] [--seeds 1] [--smoke-test]
    nice python benchmarks/sweep_overhead.py --long --seeds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

TINY = ["data.samples_per_epoch=64", "data.max_eval_size=64", "trainer.enable_progress_bar=false"]
# --long: 512 samples an epoch took 3.5 s on one thread here on 2026-12-04 (14 s a trial): 1,280 for >= 30 s.
LONG = ["data.samples_per_epoch=1280", "data.max_eval_size=64", "trainer.enable_progress_bar=false"]


def lr_grid(n: int) -> list[float]:
    return [round(3e-4 * (15 ** (i / max(n - 1, 1))), 6) for i in range(n)]


def write_sweep(folder: Path, name: str, lrs: list[float], epochs: int, scheduler: dict,
                widths: tuple[int, ...] = (), data: list[str] = TINY, seed: int = 0) -> str:
    """A quickstart sweep over ``lrs`` (and ``widths``; none: the model's own width, as :func:`sequential`)."""
    search_space = {"optim.lr": f"grid({lrs})"}
    if widths:
        search_space["model.width"] = f"grid({list(widths)})"
    spec = {
        "experiment": "quickstart", "metric": "val/psnr", "mode": "max",
        "overrides": [f"trainer.max_epochs={epochs}", f"seed={seed}", *data],
        "search_space": search_space,
        "scheduler": scheduler, "num_samples": 1, "max_concurrent_trials": 2, "resources": {"cpu": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def sequential(lrs: list[float], epochs: int, data: list[str] = TINY) -> float:
    import torch

    from deconvlab.config import compose_config
    from deconvlab.train import train

    torch.set_num_threads(1)  # a sweep trial with cpu: 1 gets one thread too
    start = time.perf_counter()
    for lr in lrs:
        train(compose_config(["experiment=quickstart", f"trainer.max_epochs={epochs}", *data, f"optim.lr={lr}",
                              "logger=none"]))
    return time.perf_counter() - start


@dataclass
class SweepTiming:
    """One sweep's wall time, split by its child runs' start and end times in the tracking store."""

    wall: float
    start: float  # from the call until the first trial's run opened: Ray, the store, the parent run
    trials: float  # the first trial's start to the last trial's end
    end: float  # after the last trial: leaderboard, views, reports, closing the parent


def timed_sweep(path: str, storage: Path):
    from mlflow import MlflowClient

    from deconvlab.sweep.records import child_runs
    from deconvlab.sweep.runner import run_sweep

    start = time.time()
    outcome = run_sweep(path, storage_path=str(storage), quiet=True)
    stop = time.time()
    client = MlflowClient()
    experiment_id = client.get_run(outcome.parent_run_id).info.experiment_id
    runs = child_runs(client, experiment_id, outcome.parent_run_id)
    first = min(run.info.start_time for run in runs) / 1000
    last = max(run.info.end_time for run in runs) / 1000
    return SweepTiming(stop - start, first - start, last - first, stop - last), outcome


def measure_overhead(args: argparse.Namespace, folder: Path, data: list[str]) -> None:
    """The same trials back to back in this process, then as sweeps of n/2 and of n trials."""
    lrs = lr_grid(args.trials)
    t_seq = sequential(lrs, args.epochs, data)
    # A sweep pays a fixed start (Ray, the tracking store, worker imports) and then a cost per trial.
    # Sweeping n/2 and n trials separates the two: the difference is the marginal cost of n/2 trials.
    half = lrs[: args.trials // 2]
    t_half, _ = timed_sweep(write_sweep(folder, "half", half, args.epochs, {"type": "fifo"}, data=data),
                            folder / "r0")
    t_full, _ = timed_sweep(write_sweep(folder, "full", lrs, args.epochs, {"type": "fifo"}, data=data),
                            folder / "r1")
    report_overhead(t_seq, args.trials, len(half), t_half, t_full, args.epochs)


def report_overhead(t_seq: float, trials: int, half: int, t_half: SweepTiming, t_full: SweepTiming,
                    epochs: int, concurrency: int = 2) -> None:
    """Print the per-trial overhead and parallel efficiency: of the whole sweeps (the difference of the two
    sweeps' wall times per extra trial) and of their trials alone (from the child runs' times)."""
    marginal = (t_full.wall - t_half.wall) / (trials - half)  # wall seconds per extra trial
    per_trial_seq = t_seq / trials
    overhead = marginal * concurrency - per_trial_seq
    fixed = t_half.wall - marginal * half
    print(f"{trials} trials x {epochs} epochs: back-to-back {t_seq:.1f} s ({per_trial_seq:.2f} s/trial); sweeps of "
          f"{half} and {trials} trials with {concurrency} concurrent: {t_half.wall:.1f} s and {t_full.wall:.1f} s")
    for timing, n in ((t_half, half), (t_full, trials)):
        print(f"  sweep of {n}: start {timing.start:.1f} s, trials {timing.trials:.1f} s, end {timing.end:.1f} s; "
              f"trials' efficiency {per_trial_seq * n / (concurrency * timing.trials):.0%}")
    trial_marginal = (t_full.trials - t_half.trials) / (trials - half)
    print(f"whole sweeps: fixed start-up + end {fixed:.1f} s; per-trial overhead {overhead:.2f} s (goal <= 2 s); "
          f"parallel efficiency {per_trial_seq / (marginal * concurrency):.0%} (goal >= 80 %); whole-sweep "
          f"speed-up {t_seq / t_full.wall:.2f}x")
    print(f"trials alone (child runs' span): per-trial overhead {trial_marginal * concurrency - per_trial_seq:.2f} s;"
          f" parallel efficiency {per_trial_seq / (trial_marginal * concurrency):.0%}; the end grows "
          f"{(t_full.end - t_half.end) / (trials - half):.2f} s and the start "
          f"{(t_full.start - t_half.start) / (trials - half):.2f} s per extra trial")


def compare_asha_fifo(args: argparse.Namespace, folder: Path) -> None:
    """One grid under FIFO and under ASHA per seed: the compute each spends and ASHA's shortfall from FIFO's
    best, against the seed-to-seed spread of FIFO's best."""
    # The grid: learning rates x two widths (an odd count of configs takes one width).
    grid, widths = (lr_grid(args.configs // 2), (16, 32)) if args.configs % 2 == 0 else (lr_grid(args.configs),
                                                                                         (16,))
    asha = {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction}
    fractions, shortfalls, fifo_bests = [], [], []
    for seed in range(args.seeds):
        results = {}
        for kind, scheduler in (("fifo", {"type": "fifo"}), ("asha", asha)):
            name = f"{kind}-s{seed}"
            _, outcome = timed_sweep(write_sweep(folder, name, grid, args.asha_epochs, scheduler, widths, TINY, seed),
                                     folder / f"r-{name}")
            table = outcome.leaderboard
            results[kind] = (int(table["epochs"].sum()), float(table["best val/psnr"].max()))
        (fifo_epochs, fifo_best), (asha_epochs, asha_best) = results["fifo"], results["asha"]
        fractions.append(asha_epochs / fifo_epochs)
        shortfalls.append(fifo_best - asha_best)
        fifo_bests.append(fifo_best)
        print(f"seed {seed}: ASHA (grace {args.grace}, reduction {args.reduction}) vs FIFO over "
              f"{len(grid) * len(widths)} configs x {args.asha_epochs} epochs: FIFO {fifo_epochs} epochs (best "
              f"{fifo_best:.3f} dB), ASHA {asha_epochs} epochs (best {asha_best:.3f} dB): ASHA used "
              f"{asha_epochs / fifo_epochs:.0%} of FIFO's compute, {fifo_best - asha_best:.3f} dB short of its best")
    from deconvlab.sweep.leaderboard import seed_stats  # the leaderboard's Student-t interval over seeds

    shortfall, fifo = seed_stats(shortfalls), seed_stats(fifo_bests)
    spread = 0.0 if np.isnan(fifo.std) else fifo.std  # one seed: no spread measured
    within = shortfall.mean <= max(args.tolerance, spread)
    print(f"over {args.seeds} seed(s): ASHA used {np.mean(fractions):.0%} of FIFO's compute (goal <= 40 %); "
          f"shortfall from FIFO's best {shortfall.mean:.3f} dB [95 % CI {shortfall.ci_low:.3f}, "
          f"{shortfall.ci_high:.3f}]; FIFO's best across seeds sd {spread:.3f} dB: "
          f"{'within' if within else 'outside'} the noise (max of the sd and {args.tolerance} dB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--asha-epochs", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=0.05, help="dB of PSNR")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace_period")
    parser.add_argument("--reduction", type=int, default=2, help="ASHA reduction_factor")
    parser.add_argument("--configs", type=int, default=8, help="configurations in the ASHA vs FIFO grid")
    parser.add_argument("--seeds", type=int, default=1, help="repeat the ASHA vs FIFO grid with seeds 0..N-1")
    parser.add_argument("--long", action="store_true", help="trials of >= 30 s (see the module docstring)")
    parser.add_argument("--only", choices=("overhead", "asha"), help="run one of the two parts")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.trials, args.epochs, args.asha_epochs = 2, 1, 2
    if args.long:
        args.trials, args.epochs, args.asha_epochs, args.reduction, args.configs = 4, 4, 9, 3, 9
    data = LONG if args.long else TINY
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as the CLI: no bar per read-back
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        os.environ["DECONVLAB_ARTIFACT_ROOT"] = str(folder / "mlartifacts")
        if args.only != "asha":
            measure_overhead(args, folder, data)
        if args.only != "overhead":
            compare_asha_fifo(args, folder)
    ray.shutdown()


if __name__ == "__main__":
    main()
