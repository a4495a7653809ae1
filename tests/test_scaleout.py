"""Scale-out guarantees on real Ray clusters on this machine: lost nodes, a killed driver, --resume.

Each test checks the promise of the README: every trial reaches its final epoch, a trial that lost
its process restarts from its last checkpoint (not from scratch), and MLflow shows each trial exactly
once, FINISHED.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.sweep.child_runs import TRIAL_TAG, child_runs

pytestmark = pytest.mark.slow
EPOCHS = 5
SWEEP = f"""
    experiment: quickstart
    overrides: [trainer.max_epochs={EPOCHS}, data.samples_per_epoch=512, trainer.limit_train_batches=32,
                data.max_eval_size=64, trainer.enable_progress_bar=false]
    metric: val/psnr
    mode: max
    search_space:
      optim.lr: grid([0.001, 0.002])
    num_samples: 1
    max_concurrent_trials: 2
    max_failures: 3
    resources: {{cpu: 1, gpu: 0}}
"""


def _sweep_file(tmp_path):
    path = tmp_path / "faulty.yaml"
    path.write_text(textwrap.dedent(SWEEP))
    return path


def _store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    return uri


def _children(uri):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-faulty")
    if experiment is None:
        return client, []
    parents = client.search_runs([experiment.experiment_id], "tags.`deconvlab.role` = 'parent'")
    runs = [r for p in parents for r in child_runs(client, experiment.experiment_id, p.info.run_id)]
    return client, runs


def _wait_until_all_trials_reported(uri, epochs: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        client, runs = _children(uri)
        done = [r for r in runs if len(client.get_metric_history(r.info.run_id, "val/psnr")) >= epochs]
        if len(runs) == 2 and len(done) == 2:
            return
        time.sleep(0.5)
    raise AssertionError("trials did not report in time")


def _assert_every_trial_complete_once(uri, expect_resumed: bool) -> None:
    client, runs = _children(uri)
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted({r.data.tags[TRIAL_TAG] for r in runs})
    assert len(runs) == 2
    resumed = []
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")]
        # Every epoch reached; an epoch after the restart point may be reported again, never skipped.
        assert set(steps) == set(range(1, EPOCHS + 1))
        history = client.get_metric_history(run.info.run_id, "resumed_from_epoch")
        resumed += [int(m.value) for m in history]
    if expect_resumed:
        assert resumed and all(1 <= e < EPOCHS for e in resumed)


def test_killing_the_driver_then_resume(tmp_path, monkeypatch):
    uri = _store(tmp_path, monkeypatch)
    command = [sys.executable, "-m", "deconvlab.cli", "sweep", str(_sweep_file(tmp_path)), "--quiet",
               "--storage", str(tmp_path / "ray")]
    # Its own session: SIGKILL to the group takes the driver and the local Ray cluster it started.
    driver = subprocess.Popen(command, start_new_session=True, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_all_trials_reported(uri, epochs=1)
        time.sleep(2.5)  # past Ray's experiment-state snapshot (every 2 s), so the checkpoints are on record
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    client, runs = _children(uri)
    assert any(r.info.status == "RUNNING" for r in runs)  # the kill really interrupted the sweep
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_every_trial_complete_once(uri, expect_resumed=True)


def test_losing_a_worker_node_mid_sweep(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from deconvlab.sweep.runner import run_sweep

    uri = _store(tmp_path, monkeypatch)
    ray.shutdown()  # a local Ray left by another test would take the place of this cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()

    def kill_a_node_once_both_trials_run():
        _wait_until_all_trials_reported(uri, epochs=1)
        cluster.remove_node(nodes[1], allow_graceful=False)
        cluster.add_node(num_cpus=1)  # a replacement joins, as an autoscaler would bring one

    killer = threading.Thread(target=kill_a_node_once_both_trials_run, daemon=True)
    killer.start()
    try:
        outcome = run_sweep(str(_sweep_file(tmp_path)), address=cluster.address,
                            storage_path=str(tmp_path / "ray"), quiet=True)
    finally:
        killer.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
    assert len(outcome.leaderboard) == 2, outcome.leaderboard
    _, runs = _children(uri)
    ran_on = [set(r.data.tags["deconvlab.nodes"].split(",")) for r in runs]
    assert len(set().union(*ran_on)) >= 2, ran_on  # trials were placed on both worker nodes
    assert any(len(nodes) == 2 for nodes in ran_on), ran_on  # the killed trial moved to another node
    _assert_every_trial_complete_once(uri, expect_resumed=True)
