"""End-to-end sweeps on a local Ray cluster: parent/child runs, ASHA, leaderboard, DDP trials, errors."""

import textwrap

import pytest
from mlflow.tracking import MlflowClient

from conftest import start_local_ray
from deconvlab.errors import UserError
from deconvlab.sweep.runner import run_sweep


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke_sweep(ray_cluster, tmp_path_factory):
    """The quickstart sweep with --smoke-test, run once for the tests of this module."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DECONVLAB_ARTIFACT_ROOT", str(root / "mlartifacts"))
        outcome = run_sweep("quickstart", smoke_test=True, storage_path=str(root / "ray"), quiet=True)
    return outcome, MlflowClient(uri)


def _children(client, outcome):
    experiment = client.get_experiment_by_name(outcome.experiment_name)
    return client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")


def test_smoke_sweep_tracks_parent_and_finished_children(smoke_sweep):
    outcome, client = smoke_sweep
    parent = client.get_run(outcome.parent_run_id)
    children = _children(client, outcome)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 == len(outcome.leaderboard)
    assert all(c.info.status == "FINISHED" for c in children)
    # Each child has the trial's params, per-epoch metrics, a checkpoint and sample images.
    child = client.get_run(outcome.best_run_id)
    assert "optim.lr" in child.data.params and "val/psnr" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "checkpoints", "samples"} <= artifacts
    assert parent.data.tags["deconvlab.best_run_id"] == outcome.best_run_id
    assert {"epochs", "params", "best val/psnr", "n", "optim.lr"} <= set(outcome.leaderboard.columns)
    assert outcome.leaderboard["n"].tolist() == [1] * 4 and parent.data.params["sweep.repeats"] == "1"
    # Without repeats a trial has no seed of its own: its child run has no seed tag and keeps its name.
    assert all("deconvlab.seed" not in c.data.tags and "deconvlab.config_id" in c.data.tags for c in children)


def test_the_outcome_carries_tunes_results_for_every_trial(smoke_sweep):
    outcome, _ = smoke_sweep
    assert len(outcome.results) == len(outcome.leaderboard) and not outcome.results.errors
    best = outcome.results.get_best_result(metric="val/psnr", mode="max", scope="all")
    assert best.metrics_dataframe["val/psnr"].max() == pytest.approx(outcome.leaderboard.iloc[0]["best val/psnr"],
                                                                     abs=1e-4)


def test_every_trial_ends_finished_with_a_stop_reason_matching_its_epochs(smoke_sweep):
    outcome, client = smoke_sweep
    children = _children(client, outcome)
    for child in children:
        epochs = len(client.get_metric_history(child.info.run_id, "val/psnr"))
        reason = child.data.tags["deconvlab.stop_reason"]
        assert child.info.status == "FINISHED"
        # Which trials ASHA stops depends on the order they reach a rung (timing), so this cannot ask for a
        # stopped one; tests/test_sweep_callback.py drives the labelling of scheduler stops directly.
        expected = "completed" if epochs == 4 else f"stopped early by the scheduler after epoch {epochs}"
        assert reason == expected and child.data.tags["deconvlab.epochs"] == str(epochs)
    assert any(c.data.tags["deconvlab.stop_reason"] == "completed" for c in children)


def test_leaderboard_artifacts_and_ranking(smoke_sweep):
    outcome, client = smoke_sweep
    files = {a.path for a in client.list_artifacts(outcome.parent_run_id, "leaderboard")}
    assert {"leaderboard/leaderboard.csv", "leaderboard/leaderboard.png", "leaderboard/curves.png"} <= files
    scores = outcome.leaderboard["best val/psnr"].tolist()
    assert scores == sorted(scores, reverse=True)
    assert outcome.leaderboard.iloc[0]["trial"] == outcome.best_trial


def test_two_worker_ddp_trial_reports_the_same_metric_keys(smoke_sweep, tmp_path, monkeypatch):
    one_worker_outcome, one_client = smoke_sweep
    one_keys = set(one_client.get_run(one_worker_outcome.best_run_id).data.metrics)
    sweep = tmp_path / "ddp.yaml"
    sweep.write_text(textwrap.dedent("""
        experiment: quickstart
        overrides: [trainer.max_epochs=2, trainer.limit_train_batches=3, data.samples_per_epoch=48,
                    data.max_eval_size=48, trainer.enable_progress_bar=false]
        metric: val/psnr
        mode: max
        search_space:
          optim.lr: choice([0.001])
        num_samples: 1
        resources: {cpu: 0.5, gpu: 0}
        workers_per_trial: 2
    """))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    outcome = run_sweep(str(sweep), storage_path=str(tmp_path / "ray"), quiet=True)
    client = MlflowClient(uri)
    (child,) = _children(client, outcome)
    assert child.info.status == "FINISHED"
    ddp_keys = set(child.data.metrics)
    # Step values reach the logs only every log_every_n_steps: this 6-step trial logs none, the 12-step one does.
    assert {k for k in one_keys if k.startswith(("val/", "train/", "best/")) and not k.endswith("_step")} <= ddp_keys
    assert len(client.get_metric_history(child.info.run_id, "val/psnr")) == 2


def test_resources_the_cluster_cannot_satisfy_are_refused_before_any_run(ray_cluster, tmp_path, tracking_uri):
    sweep = tmp_path / "huge.yaml"
    sweep.write_text(textwrap.dedent("""
        experiment: quickstart
        metric: val/psnr
        mode: max
        search_space:
          optim.lr: choice([0.001])
        resources: {cpu: 1, gpu: 1}
    """))
    with pytest.raises(UserError, match="needs 1 GPU but the Ray cluster has 0"):
        run_sweep(str(sweep), storage_path=str(tmp_path / "ray"), quiet=True)
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
