"""benchmarks/sweep_scale.py: a sweep at cluster scale on one machine, its store read back for lost trials."""

import importlib.util
import re
import subprocess
import sys

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT


def _benchmark():
    spec = importlib.util.spec_from_file_location("sweep_scale", REPO_ROOT / "benchmarks" / "sweep_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


sweep_scale = _benchmark()

LAST_LINE = re.compile(r"trials=(\d+) results=(\d+) results_per_s=[\d.]+ driver_overhead_per_trial_s=[\d.]+ "
                       r"lost=(\d+) peak_driver_rss_mb=\d+")


def _run(*args: str, timeout: int) -> re.Match:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "sweep_scale.py"), *args],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = LAST_LINE.fullmatch(result.stdout.strip().splitlines()[-1])
    assert last, result.stdout[-2000:]
    return last


def test_asha_stops_all_but_one_in_reduction_trials_at_each_rung():
    stops = [sweep_scale.asha_stop(i, epochs=10, grace=1, reduction=3) for i in range(27)]
    assert stops.count(1) == 18 and stops.count(3) == 6 and stops.count(9) == 2 and stops.count(10) == 1


def test_a_trial_missing_an_epoch_or_left_running_counts_as_lost(tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("scale")
    parent = client.create_run(experiment).info.run_id

    def child(trial_id: str, steps: list[int], status: str) -> None:
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "deconvlab.trial_id": trial_id})
        client.log_batch(run.info.run_id, metrics=[Metric("val/psnr", 20.0, 0, s) for s in steps])
        client.set_terminated(run.info.run_id, status)

    child("kept", [1, 2, 3], "FINISHED")
    child("missing_epoch", [1, 3], "FINISHED")
    child("failed", [1, 2], "FAILED")
    reported = {"kept": [1, 2, 3], "missing_epoch": [1, 2, 3], "failed": [1, 2], "no_run": [1]}
    lost, examples = sweep_scale.count_lost(tracking_uri, parent, reported, trials=5)
    assert lost == 4  # three seen lost, and one trial of the five never reported at all
    assert set(examples) == {"missing_epoch", "failed", "no_run"}


@pytest.mark.slow
def test_the_driver_alone_loses_nothing_and_prints_the_last_line():
    # The sweep's real MLflow callback, tracking queue and end of sweep, fed Tune's calls without Ray
    # (~25 s idle, 63 s at load 10: imports, a fresh SQLite store, each trial's model cost, the plots).
    last = _run("--trials", "6", "--epochs", "2", "--driver-only", "--backend", "sqlite", timeout=300)
    assert last.group(1) == "6" and last.group(3) == "0" and int(last.group(2)) >= 6


@pytest.mark.benchmark
@pytest.mark.slow
def test_quick_scale_run_loses_nothing_on_sqlite_and_a_postgres_backed_server():
    # 200 trials x 5 epochs under ASHA on 4 simulated nodes x 8 logical GPUs, through run_sweep (~4-9 min).
    last = _run("--quick", timeout=1800)
    assert last.group(1) == "200" and last.group(3) == "0" and int(last.group(2)) >= 200


def test_the_stand_in_config_is_the_base_with_the_sampled_values(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  depth: 6\n  width: 16\noptim:\n  lr: 0.002\n")
    monkeypatch.setenv(sweep_scale.BASE_CONFIG_ENV, str(base))
    text = sweep_scale.trial_config_text({"model.depth": 8, "optim.lr": 0.001})
    assert text == "model:\n  depth: 8\n  width: 16\noptim:\n  lr: 0.001\n"
