"""``deconvlab train --from-run RUN_ID``: a tracked run, or a sweep trial's child run, trained again from the
config it logged; and a trial's child run logs the config the trial really ran.

Tolerance: none. On the CPU, with one intra-op thread (conftest) and the same seed, the same config gives
bit-identical training: the data pipeline is seeded from ``seed``, and the platform's own callbacks (the MAC
count at the first batch included) draw no random numbers. So the re-run's ``best/val/psnr`` must equal the
original's exactly; any difference means the re-run did not run the same config.
"""

import shutil
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from ray.tune import Checkpoint

from deconvlab import tracking
from deconvlab.cli import main
from deconvlab.store import run_config
from deconvlab.sweep.child_runs import CONFIG_SOURCE_TAG, MLflowSweepCallback
from deconvlab.sweep.spec import load_sweep, trial_config
from deconvlab.sweep.trial_callbacks import ReportToRay
from deconvlab.train import RERUN_TAG, train

TINY = ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "data.batch_size=4", "data.patch_size=24", "data.samples_per_epoch=64", "data.max_eval_size=32"]
SAMPLED = {"model.width": 8, "model.depth": 3, "optim.lr": 0.003}


def _rerun(client: MlflowClient, run_id: str, *extra: str):
    """``deconvlab train --from-run run_id`` through the CLI; the new run."""
    assert main(["train", "--from-run", run_id, "--quiet", *extra]) == 0
    reruns = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`{RERUN_TAG}` = '{run_id}'")
    assert len(reruns) == 1
    return reruns[0]


def test_a_rerun_reproduces_a_runs_best_psnr(compose, tracking_uri):
    original = train(compose("experiment=quickstart", "model.width=8", "model.depth=3", "seed=3", *TINY))
    client = MlflowClient(tracking_uri)
    rerun = _rerun(client, original.run_id)
    assert rerun.info.status == "FINISHED" and rerun.info.run_id != original.run_id
    assert rerun.data.metrics["best/val/psnr"] == original.metrics["best/val/psnr"]
    config = run_config(client, rerun.info.run_id)
    before = run_config(client, original.run_id)
    assert config.seed == 3 and config.paths.output_dir != before.paths.output_dir
    assert rerun.info.run_name == "rerun-of-quickstart"


def test_a_rerun_of_a_sweep_trial_is_a_normal_run_with_the_trials_result(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("sweep-quickstart")
    parent = client.create_run(experiment).info.run_id
    sweep = load_sweep("quickstart").to_dict()
    # seed=5 is known only to the trial: the driver, recomposing from its own overrides ([]), would get seed 0.
    cfg = trial_config(sweep, SAMPLED, str(tmp_path / "trial"), [*TINY, "seed=5"])
    reports = []

    def report(metrics, checkpoint):  # what Ray does: keep the folder, hand it to the driver
        kept = tmp_path / "ray" / f"checkpoint_{len(reports)}"
        shutil.copytree(checkpoint.path, kept)
        reports.append((metrics, Checkpoint.from_directory(str(kept))))

    train(cfg, callbacks=[ReportToRay(report, config=cfg)])
    callback = MLflowSweepCallback(tracking_uri, experiment, parent, sweep, [], max_epochs=2)
    trial = SimpleNamespace(trial_id="t_00000", config=SAMPLED, checkpoint=None)
    callback.on_trial_start(0, [], trial)
    for metrics, checkpoint in reports:
        callback.on_trial_result(0, [], trial, dict(metrics))
        callback.on_checkpoint(0, [], trial, checkpoint)
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])  # Tune's last call: the driver's queued writes are in the store

    child = client.get_run(callback.run_ids["t_00000"])
    logged = client.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path / "logged"))
    assert open(logged).read() == OmegaConf.to_yaml(cfg, resolve=True)
    assert child.data.params["seed"] == "5" and child.data.params["model.width"] == "8"
    assert child.data.tags[CONFIG_SOURCE_TAG] == "trial"
    # The driver logs each reported epoch's training compute to the child run.
    assert [m.step for m in client.get_metric_history(child.info.run_id, "compute/train_macs")] == [1, 2]

    rerun = _rerun(client, child.info.run_id)
    assert rerun.data.metrics["best/val/psnr"] == child.data.metrics["best/val/psnr"]
    assert rerun.info.experiment_id != experiment  # tracked as a normal run of its experiment
    config = run_config(client, rerun.info.run_id)
    assert config.logger.enabled and config.seed == 5 and config.ckpt_path is None
    assert str(tmp_path / "trial") not in OmegaConf.to_yaml(config)  # its own output folder
    assert "logger=none" not in config.overrides


def _logged_run(client: MlflowClient, compose) -> str:
    """A run holding a composed quickstart config.yaml, as ``train`` logs it (no training needed)."""
    run_id = client.create_run(client.create_experiment("logged")).info.run_id
    tracking.log_config(client, run_id, compose("experiment=quickstart", "model.width=8", "paths.output_dir=/old/run",
                                                "+data.cache=/old/run/cache", "+data.other=/old/run2"))
    return run_id


def test_overrides_apply_on_top_of_the_logged_config(compose, tracking_uri, capsys):
    run_id = _logged_run(MlflowClient(tracking_uri), compose)
    assert main(["train", "--from-run", run_id, "optim.lr=0.01", "~scheduler", "+extra.note=x", "--cfg", "job"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.optim.lr == 0.01 and printed.model.width == 8 and "scheduler" not in printed
    assert printed.extra.note == "x" and printed.overrides[-3:] == ["optim.lr=0.01", "~scheduler", "+extra.note=x"]
    # What the old run kept under its folder moves under the new run's own.
    raw = OmegaConf.to_container(printed)  # interpolations as printed, not resolved
    assert raw["data"]["cache"] == "${paths.output_dir}/cache" and raw["data"]["other"] == "/old/run2"
    assert "${now:" in raw["paths"]["output_dir"] and "paths.output_dir=/old/run" not in raw["overrides"]


@pytest.mark.parametrize("extra, message", [
    (["model=fcn8s"], "model=fcn8s chooses a config group"),
    (["optim.lr=abc"], "optim.lr='abc' has the wrong type"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["+optim.lr=0.1"], "optim.lr is already set"),
])
def test_overrides_that_do_not_apply_are_one_line_errors(compose, tracking_uri, capsys, extra, message):
    client = MlflowClient(tracking_uri)
    run_id = _logged_run(client, compose)
    capsys.readouterr()
    assert main(["train", "--from-run", run_id, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}")
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1  # no new run


def test_unknown_run_or_a_run_without_config_is_one_line_and_exit_2(tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    bare = client.create_run(client.create_experiment("bare")).info.run_id
    capsys.readouterr()
    for run_id, message in (("0" * 32, f"error: no run {'0' * 32}"), (bare, f"error: run {bare} has no config.yaml")):
        assert main(["train", "--from-run", run_id]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(message)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
