"""What a sweep costs on top of running the same trials by hand, and what ASHA saves over FIFO.

Side by side in one run (absolute seconds are noisy on a shared machine; the ratios are the result):
1. the same N short quickstart trials run back-to-back in this process (one thread each), then as a
   sweep with 2 concurrent one-CPU trials: per-trial overhead and parallel efficiency;
   (a sweep of n/2 and one of n trials separate the fixed start-up from the cost per trial);
2. one grid of configurations under FIFO and under ASHA: epochs of compute each spends, and whether
   ASHA's best trial reaches FIFO's best metric within a tolerance.

``--long`` makes each trial longer (512 training samples per epoch, 4 epochs: 14 s on one thread of
this 2-core machine on 2026-12-04, ~30 s on a slower day; the back-to-back time per trial is printed, so the
length is checked, not assumed), where a sweep's fixed costs weigh less; its ASHA setting is the one a user
of a 16-epoch quickstart-like sweep would pick, ``grace_period 1, reduction_factor 3`` over ``max_t`` =
``--asha-epochs``: rungs at 1, 3 and 9 epochs, a third of the trials going on at each.

    python benchmarks/sweep_overhead.py [--trials 8] [--epochs 2] [--asha-epochs 6] [--smoke-test]
    nice python benchmarks/sweep_overhead.py --long     # 4-5 min on 2 idle cores (2026-12-04)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

TINY = ["data.samples_per_epoch=64", "data.max_eval_size=64", "trainer.enable_progress_bar=false"]
# --long: 3.5 s an epoch on one thread here on 2026-12-04 (8 s on a slower day): 14-30 s per trial.
LONG = ["data.samples_per_epoch=512", "data.max_eval_size=64", "trainer.enable_progress_bar=false"]


def lr_grid(n: int) -> list[float]:
    return [round(3e-4 * (15 ** (i / max(n - 1, 1))), 6) for i in range(n)]


def write_sweep(folder: Path, name: str, lrs: list[float], epochs: int, scheduler: dict, widths=(32,),
                data: list[str] = TINY) -> str:
    spec = {
        "experiment": "quickstart", "metric": "val/psnr", "mode": "max",
        "overrides": [f"trainer.max_epochs={epochs}", *data],
        "search_space": {"optim.lr": f"grid({lrs})", "model.width": f"grid({list(widths)})"},
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


def timed_sweep(path: str, storage: Path):
    from deconvlab.sweep.runner import run_sweep

    start = time.perf_counter()
    outcome = run_sweep(path, storage_path=str(storage), quiet=True)
    return time.perf_counter() - start, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--asha-epochs", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=0.05, help="dB of PSNR")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace_period")
    parser.add_argument("--reduction", type=int, default=2, help="ASHA reduction_factor")
    parser.add_argument("--configs", type=int, default=8, help="configurations in the ASHA vs FIFO grid")
    parser.add_argument("--long", action="store_true", help="trials of >= 30 s (see the module docstring)")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.trials, args.epochs, args.asha_epochs = 2, 1, 2
    if args.long:
        args.trials, args.epochs, args.asha_epochs, args.reduction, args.configs = 4, 4, 9, 3, 9
    data = LONG if args.long else TINY
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        os.environ["DECONVLAB_ARTIFACT_ROOT"] = str(folder / "mlartifacts")
        lrs = lr_grid(args.trials)
        t_seq = sequential(lrs, args.epochs, data)
        # A sweep pays a fixed start (Ray, the tracking store, worker imports) and then a cost per trial.
        # Sweeping n/2 and n trials separates the two: the difference is the marginal cost of n/2 trials.
        half = lrs[: args.trials // 2]
        t_half, _ = timed_sweep(write_sweep(folder, "half", half, args.epochs, {"type": "fifo"}, data=data),
                                folder / "r0")
        t_sweep, _ = timed_sweep(write_sweep(folder, "full", lrs, args.epochs, {"type": "fifo"}, data=data),
                                 folder / "r1")
        concurrency = 2
        marginal = (t_sweep - t_half) / (args.trials - len(half))  # wall seconds per extra trial
        per_trial_seq = t_seq / args.trials
        overhead = marginal * concurrency - per_trial_seq
        efficiency = per_trial_seq / (marginal * concurrency)
        fixed = t_half - marginal * len(half)
        print(f"{args.trials} trials x {args.epochs} epochs: back-to-back {t_seq:.1f} s "
              f"({per_trial_seq:.2f} s/trial); sweeps of {len(half)} and {args.trials} trials with {concurrency} "
              f"concurrent: {t_half:.1f} s and {t_sweep:.1f} s")
        print(f"fixed sweep start-up {fixed:.1f} s; per-trial overhead {overhead:.2f} s (goal <= 2 s); parallel "
              f"efficiency {efficiency:.0%} (goal >= 80 %); whole-sweep speed-up {t_seq / t_sweep:.2f}x")

        # The grid: learning rates x two widths (an odd count of configs takes one width).
        grid, widths = (lr_grid(args.configs // 2), (16, 32)) if args.configs % 2 == 0 else (lr_grid(args.configs),
                                                                                             (16,))
        asha = {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction}
        results = {}
        for kind, scheduler in (("fifo", {"type": "fifo"}), ("asha", asha)):
            _, outcome = timed_sweep(write_sweep(folder, kind, grid, args.asha_epochs, scheduler, widths, TINY),
                                     folder / f"r-{kind}")
            table = outcome.leaderboard
            results[kind] = (int(table["epochs"].sum()), float(table["best val/psnr"].max()))
        (fifo_epochs, fifo_best), (asha_epochs, asha_best) = results["fifo"], results["asha"]
        reached = asha_best >= fifo_best - args.tolerance
        print(f"ASHA (grace {args.grace}, reduction {args.reduction}) vs FIFO over {len(grid) * len(widths)} configs "
              f"x {args.asha_epochs} epochs: FIFO {fifo_epochs} epochs "
              f"(best {fifo_best:.3f} dB), ASHA {asha_epochs} epochs (best {asha_best:.3f} dB): "
              f"ASHA used {asha_epochs / fifo_epochs:.0%} of FIFO's compute (goal <= 40 %), "
              f"{'reached' if reached else 'missed'} FIFO's best within {args.tolerance} dB")
    ray.shutdown()


if __name__ == "__main__":
    main()
