"""Cumulative training compute per epoch (``compute/*``): logged by single runs, reported by sweep trials."""

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.sweep.trial_callbacks import ReportToRay
from deconvlab.train import train

EPOCHS, BATCHES, BATCH = 3, 2, 4
PATCH, WIDTH, DEPTH = 24, 8, 3
TINY = ["experiment=quickstart", f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}",
        "trainer.limit_val_batches=1", f"data.batch_size={BATCH}", f"data.patch_size={PATCH}",
        "data.samples_per_epoch=64", "data.max_eval_size=32", f"model.width={WIDTH}", f"model.depth={DEPTH}"]


def _forward_macs_by_hand() -> int:
    # ResidualDeblurCNN: 3x3 convolutions 1 -> w, (depth - 2) x w -> w, w -> 1, at every pixel of the patch.
    return PATCH * PATCH * 9 * (1 * WIDTH + (DEPTH - 2) * WIDTH * WIDTH + WIDTH * 1)


def _expected_macs(epochs: int) -> float:
    # Forward + backward = 3 forwards, times every training sample seen so far.
    return 3.0 * _forward_macs_by_hand() * BATCH * BATCHES * epochs


def test_a_run_logs_training_macs_and_cpu_seconds_per_epoch(compose, tracking_uri):
    result = train(compose(*TINY))
    client = MlflowClient(tracking_uri)
    macs = sorted(client.get_metric_history(result.run_id, "compute/train_macs"), key=lambda m: m.step)
    cpu = sorted(client.get_metric_history(result.run_id, "compute/cpu_s"), key=lambda m: m.step)
    assert [m.value for m in macs] == [_expected_macs(epoch) for epoch in range(1, EPOCHS + 1)]
    # Logged at the same steps as the epoch's validation metrics, so the two pair up by step.
    val_steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val/psnr"))
    assert [m.step for m in macs] == val_steps == [m.step for m in cpu]
    assert 0 < cpu[0].value < cpu[1].value < cpu[2].value
    assert not client.get_metric_history(result.run_id, "compute/gpu_s")  # trained on the CPU
    assert result.metrics["compute/train_macs"] == _expected_macs(EPOCHS)


def test_a_trial_reports_compute_to_ray_and_a_resume_keeps_counting(compose, tmp_path):
    reports: list[dict] = []
    first = compose(*TINY, "logger=none", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'first'}")
    train(first, callbacks=[ReportToRay(lambda metrics, checkpoint: reports.append(metrics))])
    resumed = compose(*TINY, "logger=none", f"paths.output_dir={tmp_path / 'resumed'}")
    resumed.ckpt_path = str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    train(resumed, callbacks=[ReportToRay(lambda metrics, checkpoint: reports.append(metrics))])
    # Epoch 1 from the first process, epochs 2-3 after the resume: the totals continue from the checkpoint.
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert [r["compute/train_macs"] for r in reports] == [_expected_macs(e) for e in (1, 2, 3)]
    assert reports[0]["compute/cpu_s"] < reports[1]["compute/cpu_s"] < reports[2]["compute/cpu_s"]


def test_a_model_with_nothing_to_train_logs_no_compute(compose, tracking_uri):
    # Wiener with a fixed SNR is only validated (train() never fits it): there is no training to count.
    result = train(compose("experiment=quickstart", "model=wiener", "model.learn_snr=false",
                           "trainer.limit_val_batches=1", "data.max_eval_size=32"))
    assert not MlflowClient(tracking_uri).get_metric_history(result.run_id, "compute/train_macs")
    assert "compute/train_macs" not in result.metrics


@pytest.mark.slow
def test_a_two_worker_trial_reports_the_compute_of_both_workers(tmp_path, tracking_uri):
    import ray

    from conftest import start_local_ray
    from deconvlab.sweep.runner import run_sweep

    sweep = tmp_path / "ddp.yaml"
    overrides = ", ".join(o for o in TINY if not o.startswith("experiment="))
    sweep.write_text(f"experiment: quickstart\noverrides: [{overrides}, trainer.enable_progress_bar=false]\n"
                     "metric: val/psnr\nmode: max\nsearch_space:\n  optim.lr: choice([0.001])\nnum_samples: 1\n"
                     "resources: {cpu: 0.5, gpu: 0}\nworkers_per_trial: 2\n")
    start_local_ray()
    try:
        outcome = run_sweep(str(sweep), storage_path=str(tmp_path / "ray"), quiet=True)
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri)
    child = client.get_run(outcome.best_run_id)
    macs = sorted(client.get_metric_history(child.info.run_id, "compute/train_macs"), key=lambda m: m.step)
    # Each worker sees its own BATCHES batches an epoch: the trial's compute is both workers' together.
    assert [m.value for m in macs] == [2 * _expected_macs(epoch) for epoch in range(1, EPOCHS + 1)]
    # Rank 0's config.yaml, written into its checkpoint folder, is the child's config.
    assert child.data.tags["deconvlab.config_source"] == "trial"
    assert child.data.params["model.width"] == str(WIDTH)
