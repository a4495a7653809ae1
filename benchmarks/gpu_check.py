"""One prepared check of every GPU code path, for a machine with one GPU: a table in under 8 minutes.

Rows (each runs on its own; a failure is a row with its error, not the end of the check):

1. ``sweep 4 x gpu 0.25``: a 4-trial quickstart sweep at ``resources.gpu: 0.25``, ``max_concurrent_trials: 4``:
   how many trials ran at once (from their child runs' start and end times), wall time, best val/psnr;
2. ``quickstart`` and ``fcn8s`` at ``32-true``, ``bf16-mixed`` and ``16-mixed``, all with
   ``perf.channels_last=true``: seconds per epoch, the run's validation metric, peak GPU memory;
3. ``perf.compile``: the quickstart compiled (bf16-mixed on a GPU), seconds per epoch after compiling;
4. ``ray train 1 worker``: a Tune trial driving a 1-worker Ray Train ``TorchTrainer`` (the path of
   ``workers_per_trial > 1``): NCCL on a GPU (Ray's backend with ``use_gpu``), gloo on CPU;
5. ``dense MRI``: dense inference of an untrained DeepMedic-like net over a 64^3 four-modality volume, GPU vs
   CPU (voxels/s) and the largest probability difference between the two.

Without a GPU it says so on its first line and runs every row on the CPU (``trainer=cpu``, sweep trials at
``resources.cpu: 0.5``), so the same script is tested here; rows that only mean something on a GPU say why.

    python benchmarks/gpu_check.py                   # every row
    python benchmarks/gpu_check.py --rows quickstart,mri --epochs 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
import yaml

# Settings that keep each training row to seconds: the point is the code path, not the model.
SHORT = ["trainer.limit_train_batches=20", "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false",
         "logger=none"]
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
ROW_NAMES = ("sweep", "quickstart", "fcn8s", "compile", "raytrain", "mri")


@dataclass
class Row:
    name: str
    status: str  # ok / error / skipped
    seconds: float
    result: str
    peak_gpu_mb: float | None


def gpu() -> bool:
    return torch.cuda.is_available()


def trainer_overrides(precision: str) -> list[str]:
    if gpu():
        return ["trainer=gpu", f"trainer.precision={precision}"]
    return ["trainer=cpu", f"trainer.precision={precision}"]


def run_row(name: str, check: Callable[[], str]) -> Row:
    """Run one check; its time, its result or error, and the GPU's peak memory during it."""
    if gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        result, status = check(), "ok"
    except SkipRow as reason:
        result, status = str(reason), "skipped"
    except Exception as exc:  # noqa: BLE001 - a failing path is this check's finding
        lines = str(exc).strip().splitlines() or [""]
        result, status = f"{type(exc).__name__}: {lines[0][:150]}", "error"
        traceback.print_exc()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu() else None
    row = Row(name, status, seconds, result, peak)
    print(f"{name}: {status} in {seconds:.1f} s: {result}", flush=True)
    return row


class SkipRow(Exception):
    """A row that cannot mean anything on this machine, with the reason."""


# -- the checks ----------------------------------------------------------------------------------------------
def train_row(experiment: str, precision: str, epochs: int, extra: list[str] = ()) -> str:
    from deconvlab.config import compose_config
    from deconvlab.train import train

    cfg = compose_config([f"experiment={experiment}", *trainer_overrides(precision), f"trainer.max_epochs={epochs}",
                          "perf.channels_last=true", *SHORT, *extra])
    start = time.perf_counter()
    result = train(cfg)
    per_epoch = (time.perf_counter() - start) / epochs
    metric, _ = result.monitor
    value = result.metrics.get(metric, float("nan"))
    return f"{per_epoch:.2f} s/epoch (first epoch included), {metric} {value:.4g}"


def compile_row(epochs: int) -> str:
    from deconvlab.perf import check_compiler

    check_compiler()
    return train_row("quickstart", "bf16-mixed" if gpu() else "32-true", epochs, ["perf.compile=true"])


def sweep_row(folder: Path, epochs: int) -> str:
    from mlflow.tracking import MlflowClient

    from deconvlab.sweep.records import child_runs
    from deconvlab.sweep.runner import run_sweep

    resources = {"cpu": 1, "gpu": 0.25} if gpu() else {"cpu": 0.5, "gpu": 0}
    spec = {"experiment": "quickstart", "metric": "val/psnr", "mode": "max",
            "overrides": ["trainer=gpu" if gpu() else "trainer=cpu", f"trainer.max_epochs={epochs}", *SHORT[:3]],
            "search_space": {"optim.lr": "grid([0.001, 0.0015, 0.002, 0.003])"}, "max_concurrent_trials": 4,
            "resources": resources}
    sweep = folder / "gpu_share.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    outcome = run_sweep(str(sweep), storage_path=str(folder / "ray"), quiet=True)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(outcome.experiment_name).experiment_id
    spans = [(r.info.start_time, r.info.end_time) for r in child_runs(client, experiment, outcome.parent_run_id)]
    together = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    best = float(outcome.leaderboard["best val/psnr"].max())
    return (f"{len(spans)} trials, at most {together} at once, resources cpu {resources['cpu']:g} gpu "
            f"{resources['gpu']:g}, best val/psnr {best:.3f}")


def raytrain_row(folder: Path, epochs: int) -> str:
    from ray import tune

    from deconvlab.config import compose_config
    from deconvlab.sweep.distributed import fit_with_ray_train

    cfg = compose_config(["experiment=quickstart", *trainer_overrides("32-true"), f"trainer.max_epochs={epochs}",
                          *SHORT, f"paths.output_dir={folder / 'raytrain'}"])
    resources = {"cpu": 1, "gpu": 1 if gpu() else 0}

    def trial(config: dict) -> None:  # what run_trial does for workers_per_trial > 1, with one worker
        fit_with_ray_train(cfg, 1, resources, "gpu-check-raytrain", str(folder / "ray"))

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.01}),
                       run_config=tune.RunConfig(name="gpu-check", storage_path=str(folder / "ray"), verbose=0))
    result = tuner.fit()[0]
    if result.error:
        raise result.error
    backend = "nccl" if gpu() else "gloo"
    epochs_done, psnr = result.metrics.get("epoch", 0), result.metrics["val/psnr"]
    return f"{backend}, {epochs_done:.0f} epoch(s) reported, val/psnr {psnr:.3f}"


def mri_row() -> str:
    from hydra.utils import instantiate

    from deconvlab.config import compose_config
    from deconvlab.volume.dense import dense_probabilities

    cfg = compose_config(["experiment=deepmedic_p9_ctx3_phantom"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    modalities = len(cfg.data.get("modalities", [None] * 4))
    image = np.random.default_rng(0).standard_normal((modalities, 64, 64, 64)).astype(np.float32)
    timings, outputs = {}, {}
    for device in (["cuda"] if gpu() else []) + ["cpu"]:
        model.to(device)
        start = time.perf_counter()
        outputs[device] = dense_probabilities(model, image, tile=48)
        timings[device] = time.perf_counter() - start
    voxels = image[0].size
    text = ", ".join(f"{d} {voxels / s / 1e3:.0f}k voxels/s" for d, s in timings.items())
    if gpu():
        diff = float(np.abs(outputs["cuda"] - outputs["cpu"]).max())
        return f"{text}, GPU {timings['cpu'] / timings['cuda']:.1f}x, max |p_gpu - p_cpu| {diff:.1e}"
    return f"{text} (no GPU: the CPU side only)"


def checks(rows: set[str], folder: Path, epochs: int) -> list[tuple[str, Callable[[], str]]]:
    """The rows asked for, in the table's order."""
    plan: list[tuple[str, Callable[[], str]]] = []
    if "sweep" in rows:
        plan.append(("sweep 4 x gpu 0.25" if gpu() else "sweep 4 x cpu 0.5", lambda: sweep_row(folder, epochs)))
    for experiment in ("quickstart", "fcn8s"):
        if experiment in rows:
            name = "quickstart" if experiment == "quickstart" else "fcn8s_shapes"
            for precision in PRECISIONS:
                plan.append((f"{experiment} {precision} channels_last",
                             lambda n=name, p=precision: precision_row(n, p, epochs)))
    if "compile" in rows:
        plan.append(("quickstart perf.compile", lambda: compile_row(epochs)))
    if "raytrain" in rows:
        plan.append(("ray train 1 worker", lambda: raytrain_row(folder, epochs)))
    if "mri" in rows:
        plan.append(("dense MRI GPU vs CPU", mri_row))
    return plan


def precision_row(experiment: str, precision: str, epochs: int) -> str:
    if precision == "16-mixed" and not gpu():
        raise SkipRow("16-mixed (float16 autocast + gradient scaler) is a CUDA path: on CPU Lightning runs "
                      "bf16-mixed instead, the row above")
    if precision == "bf16-mixed" and gpu() and not torch.cuda.is_bf16_supported():
        raise SkipRow(f"{torch.cuda.get_device_name()} has no bfloat16")
    return train_row(experiment, precision, epochs)


def print_table(rows: list[Row], wall: float) -> None:
    width = max(len(r.name) for r in rows)
    print(f"\n{'check':<{width}}  {'status':<8}{'seconds':>8}  {'peak GPU MB':>11}  result")
    for r in rows:
        peak = f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-"
        print(f"{r.name:<{width}}  {r.status:<8}{r.seconds:>8.1f}  {peak:>11}  {r.result}")
    failed = sum(r.status == "error" for r in rows)
    print(f"{len(rows)} checks, {failed} failed, {wall:.0f} s in all", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help=f"comma-separated subset of {ROW_NAMES}")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    rows = set(args.rows.split(","))
    if rows - set(ROW_NAMES):
        parser.error(f"unknown rows {sorted(rows - set(ROW_NAMES))}; choose from {ROW_NAMES}")
    # patch.dict puts the environment back afterwards: the suite calls main() in-process, and a later test
    # must not inherit an output root inside this run's deleted temporary folder.
    with patch.dict(os.environ, {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                                 "NO_ALBUMENTATIONS_UPDATE": "1"}):
        return _run_checks(rows, args.epochs)


def _run_checks(rows: set[str], epochs: int) -> int:
    if gpu():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    else:
        print("no GPU (torch.cuda.is_available() is False): every row runs its CPU fallback", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deconvlab-gpu-check-") as tmp:
        folder = Path(tmp)
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
                           "DECONVLAB_ARTIFACT_ROOT": str(folder / "mlartifacts"),
                           "DECONVLAB_OUTPUT_ROOT": str(folder / "outputs")})
        results = [run_row(name, check) for name, check in checks(rows, folder, epochs)]
        import ray

        ray.shutdown()
    print_table(results, time.perf_counter() - start)
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
