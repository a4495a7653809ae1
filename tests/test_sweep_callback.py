"""The sweep driver's MLflow callback, driven with Tune's callback calls directly (no Ray cluster)."""

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.sweep.child_runs import MLflowSweepCallback
from deconvlab.sweep.spec import load_sweep


@pytest.fixture
def callback(tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("callback")
    parent = client.create_run(experiment_id).info.run_id
    return MLflowSweepCallback(tracking_uri, experiment_id, parent, load_sweep("quickstart").to_dict(), [],
                               max_epochs=4)


def _finish(callback, trial_id: str, results: list[dict]) -> dict[str, str]:
    """Feed ``results`` (one per epoch) to the callback, complete the trial, return its run's tags."""
    trial = SimpleNamespace(trial_id=trial_id, config={"optim.lr": 1e-3}, checkpoint=None)
    for epoch, result in enumerate(results, start=1):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val/psnr": 20.0 + epoch, **result})
    callback.on_trial_complete(0, [], trial)
    run = callback.client.get_run(callback.run_ids[trial_id])
    assert run.info.status == "FINISHED" and run.data.metrics["best/val/psnr"] == 20.0 + len(results)
    return run.data.tags


def test_stop_reason_tells_scheduler_stops_from_trials_that_ended_by_themselves(callback):
    # Tune marks the result at which a scheduler stops a trial as done; a trial that returns sends none.
    stopped = _finish(callback, "t_stopped", [{"done": False}, {"done": True}])
    assert stopped["deconvlab.stop_reason"] == "stopped early by the scheduler after epoch 2"
    assert stopped["deconvlab.epochs"] == "2"
    completed = _finish(callback, "t_completed", [{"done": False}] * 3 + [{"done": True}])
    assert completed["deconvlab.stop_reason"] == "completed"
    ended = _finish(callback, "t_ended", [{"done": False}] * 3)
    assert ended["deconvlab.stop_reason"] == "ended by itself after epoch 3 of 4"


def test_a_trial_without_a_checkpoint_gets_a_recomposed_config_that_says_so(callback, tmp_path):
    # The trial's own config.yaml travels in its checkpoints (tests/test_rerun.py); one that failed before its
    # first checkpoint has none, and the driver composes it from the same overrides, tagged as such.
    trial = SimpleNamespace(trial_id="t_failed", config={"optim.lr": 1e-3, "model.width": 16}, checkpoint=None)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_error(0, [], trial)
    run = callback.client.get_run(callback.run_ids["t_failed"])
    assert run.info.status == "FAILED"
    assert run.data.tags["deconvlab.config_source"].startswith("recomposed by the sweep driver")
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.width"] == "16"
    config = callback.client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "width: 16" in open(config).read()
