"""The sweep driver's MLflow callback, driven with Tune's callback calls directly (no Ray cluster)."""

import pickle
import threading
import time
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Checkpoint

from deconvlab.sweep.child_runs import MLflowSweepCallback
from deconvlab.sweep.spec import load_sweep
from deconvlab.tracking import TrackingQueue


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
    callback.on_experiment_end([])  # Tune's last call: the callback's queued writes are in the store after it
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
    callback.on_experiment_end([])
    run = callback.client.get_run(callback.run_ids["t_failed"])
    assert run.info.status == "FAILED"
    assert run.data.tags["deconvlab.config_source"].startswith("recomposed by the sweep driver")
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.width"] == "16"
    config = callback.client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "width: 16" in open(config).read()


def test_the_driver_log_holds_what_the_store_holds_and_is_not_pickled(callback, tmp_path):
    # The end of the sweep takes configs and curves from the driver's log instead of reading them back: they
    # must be what the store holds, point for point.
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.yaml").write_text("model:\n  width: 8\noptim:\n  lr: 0.001\n")
    ran = SimpleNamespace(trial_id="t_ran", config={"optim.lr": 1e-3}, checkpoint=None)
    failed = SimpleNamespace(trial_id="t_failed", config={"optim.lr": 1e-3, "model.width": 16}, checkpoint=None)
    for epoch, psnr in ((1, 21.5), (2, float("nan")), (3, 23.25)):  # a NaN is neither logged nor kept
        callback.on_trial_result(0, [], ran, {"epoch": epoch, "val/psnr": psnr, "compute/train_macs": 1e9 * epoch,
                                              "train/loss": 0.1})
        callback.on_checkpoint(0, [], ran, Checkpoint.from_directory(str(folder)))
    callback.on_trial_complete(0, [], ran)
    callback.on_trial_start(0, [], failed)
    callback.on_trial_error(0, [], failed)
    callback.on_experiment_end([])
    client, logged = callback.client, callback.logged
    for run_id in callback.run_ids.values():
        for key in ("val/psnr", "compute/train_macs"):
            stored = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert logged.history(run_id, key) == stored
        stored_config = client.download_artifacts(run_id, "config.yaml", str(tmp_path / run_id))
        assert logged.configs[run_id] == open(stored_config).read()
    assert logged.history(callback.run_ids["t_ran"], "val/psnr") == [(1, 21.5), (3, 23.25)]
    assert logged.history(callback.run_ids["t_failed"], "val/psnr") == []
    assert logged.history("a-run-the-driver-did-not-create", "val/psnr") is None
    assert pickle.loads(pickle.dumps(callback)).logged is None  # a restored driver saw only part of the sweep


class CountingClient(MlflowClient):
    """An MlflowClient that records which of its store calls ran on which thread."""

    CALLS = ("create_run", "search_runs", "log_batch", "log_metric", "set_tag", "log_text", "log_artifact",
             "list_artifacts", "set_terminated", "update_run", "log_artifacts")

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.calls: list[tuple[str, str]] = []
        for name in self.CALLS:
            setattr(self, name, self._counted(name, getattr(self, name)))

    def _counted(self, name, method):
        def counted(*args, **kwargs):
            self.calls.append((name, threading.current_thread().name))
            return method(*args, **kwargs)
        return counted


def _checkpoint(folder, epoch: int) -> Checkpoint:
    path = folder / f"checkpoint_{epoch}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model:\n  width: 16\noptim:\n  lr: 0.001\n")
    (path / "checkpoint.ckpt").write_bytes(b"weights")
    return Checkpoint.from_directory(str(path))


def test_the_tune_loop_only_creates_runs_and_a_trial_costs_a_few_round_trips(callback, tmp_path):
    # Tune runs the callback in its own loop: before, each result was a round trip there and a trial of
    # 6 epochs cost ~20 (a search, the config's list/params/tags one by one, a git subprocess, 6 closing calls).
    client = callback._client = CountingClient(callback.tracking_uri)
    trial = SimpleNamespace(trial_id="t_fast", config={"optim.lr": 1e-3}, checkpoint=None)
    callback.on_trial_start(0, [], trial)
    for epoch in range(1, 7):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val/psnr": 20.0 + epoch, "node_id": "n1",
                                                "done": False})
        callback.on_checkpoint(0, [], trial, _checkpoint(tmp_path, epoch))
    callback.on_trial_complete(0, [], trial)
    in_loop = [name for name, thread in client.calls if thread == threading.current_thread().name]
    assert in_loop == ["create_run"]
    callback.on_experiment_end([])
    assert len(client.calls) <= 8, client.calls
    run = client.get_run(callback.run_ids["t_fast"])
    assert run.info.status == "FINISHED" and run.data.metrics["best/val/psnr"] == 26.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [1, 2, 3, 4, 5, 6]
    assert run.data.tags["deconvlab.epochs"] == "6" and run.data.tags["deconvlab.nodes"] == "n1"
    assert run.data.tags["deconvlab.config_source"] == "trial" and run.data.params["model.width"] == "16"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "checkpoints"}


def test_a_restored_callback_finds_its_trials_runs_again_and_a_fresh_one_does_not_search(callback, tmp_path):
    client = callback._client = CountingClient(callback.tracking_uri)
    trial = SimpleNamespace(trial_id="t_resumed", config={"optim.lr": 1e-3}, checkpoint=None)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 1, "val/psnr": 21.0})
    callback.on_checkpoint(0, [], trial, _checkpoint(tmp_path, 1))
    callback.on_experiment_end([])
    assert "search_runs" not in {name for name, _ in client.calls}
    restored = pickle.loads(pickle.dumps(callback))  # how Ray restores it with the experiment (--resume)
    restored.run_ids.clear()
    restored.configured.clear()
    restored.on_trial_result(0, [], trial, {"epoch": 2, "val/psnr": 22.0})
    restored.on_checkpoint(0, [], trial, _checkpoint(tmp_path, 2))
    restored.on_trial_complete(0, [], trial)
    restored.on_experiment_end([])
    runs = restored.client.search_runs([callback.experiment_id], "tags.`deconvlab.trial_id` = 't_resumed'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = restored.client.get_metric_history(runs[0].info.run_id, "val/psnr")
    assert [m.step for m in history] == [1, 2]
    configs = [a for a in restored.client.list_artifacts(runs[0].info.run_id) if a.path == "config.yaml"]
    assert len(configs) == 1


class RecordingClient:
    """A store stand-in for TrackingQueue: records calls; the first log_batch waits until ``release``; a
    batch of ``fail_run`` holding a param is refused."""

    def __init__(self, fail_run: str | None = None) -> None:
        self.calls, self.release, self.fail_run = [], threading.Event(), fail_run

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.release.wait(10)
        if run_id == self.fail_run and params:
            raise RuntimeError(f"store refused {run_id}")
        self.calls.append(("log_batch", run_id, len(metrics), len(params), len(tags)))

    def set_terminated(self, run_id, status, end_time=None):
        self.calls.append(("set_terminated", run_id, status))


def test_the_tracking_queue_merges_what_waited_and_ends_a_run_after_its_data():
    client = RecordingClient()
    queue = TrackingQueue(client)
    queue.log_batch("a", metrics=[Metric("m", 0.0, 0, 0)])  # the writer takes it and waits in the store
    time.sleep(0.2)
    for step in range(1, 51):
        queue.log_batch("a", metrics=[Metric("m", float(step), 0, step)], tags=[RunTag("t", str(step))])
        if step == 25:  # an artifact upload queued among them does not break the merge
            queue.call("a", lambda: client.calls.append(("call", "a")))
    queue.log_batch("a", params=[Param("p", "1")])
    queue.terminate("a")
    queue.log_batch("b", metrics=[Metric("m", 1.0, 0, 1)] * 1500)  # more than one call may carry
    client.release.set()
    queue.flush(timeout_s=10)
    a = [c for c in client.calls if c[1] == "a"]
    # 51 queued batches: the first alone, the other 50 and the param in one call (the tag once, its last value).
    assert a == [("log_batch", "a", 1, 0, 0), ("call", "a"), ("log_batch", "a", 50, 1, 1),
                 ("set_terminated", "a", "FINISHED")]
    assert [c[2] for c in client.calls if c[1] == "b"] == [1000, 500]
    assert queue.calls == 6


def test_a_failed_write_is_raised_by_flush_and_the_rest_is_still_written():
    client = RecordingClient(fail_run="bad")
    client.release.set()
    queue = TrackingQueue(client)
    # The refused batch (a param over 100 entities splits the run's writes in two calls) is followed by
    # more of the same run: the metrics of its second call and its end must still be written.
    queue.log_batch("bad", params=[Param(f"p{i}", "1") for i in range(101)])
    queue.call("bad", lambda: client.calls.append(("call", "bad")))
    queue.terminate("bad", "FAILED")
    queue.log_batch("good", metrics=[Metric("m", 1.0, 0, 1)])
    queue.terminate("good")
    with pytest.raises(RuntimeError, match="store refused bad"):
        queue.flush(timeout_s=10)
    assert ("call", "bad") in client.calls and ("set_terminated", "bad", "FAILED") in client.calls
    assert ("set_terminated", "good", "FINISHED") in client.calls
    queue.flush(timeout_s=10)  # reported once
