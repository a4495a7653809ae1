"""The hot training loop stays cheap: logging is not synced every step, NIfTI cases are decoded once."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import pytest
import pytorch_lightning as pl
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, write_phantom_case
from deconvlab.data import brats
from deconvlab.data.brats import BratsDataModule

STEPS = 14  # one epoch of quickstart's 16 batches, more than one logging interval


class LightningItemCounter(pl.Callback):
    """Counts ``Tensor.item()`` calls made by Lightning (not the optimiser) during each training step.

    A step's count covers its ``on_train_batch_start`` to the next one, so it includes the logging
    Lightning does after ``on_train_batch_end``. ``.item()`` waits for the device: one per step is a
    sync per step on a GPU.
    """

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._counting = False

    def count(self) -> None:
        if not self._counting:
            return
        frame = sys._getframe(2)
        while frame is not None:
            if "torch/optim/" in frame.f_code.co_filename:
                return  # Adam reads its CPU step counters: no device sync, and a plain loop does it too
            if "pytorch_lightning" in frame.f_code.co_filename:
                self.per_step[-1] += 1
                return
            frame = frame.f_back

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.per_step.append(0)
        self._counting = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._counting = False


def train_quickstart(tmp: Path, tracked: bool, counter: LightningItemCounter | None = None):
    """One epoch of a narrow quickstart at the default logging interval (``.item()`` calls counted)."""
    from deconvlab.config import compose_config
    from deconvlab.train import train

    original_item = torch.Tensor.item

    def counting_item(self: torch.Tensor):  # noqa: ANN202
        if counter is not None:
            counter.count()
        return original_item(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp / "artifacts"))
        mp.setenv("DECONVLAB_OUTPUT_ROOT", str(tmp / "outputs"))
        mp.setattr(torch.Tensor, "item", counting_item)
        cfg = compose_config(["experiment=quickstart", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                              f"trainer.limit_train_batches={STEPS}", "trainer.limit_val_batches=1",
                              "trainer.enable_progress_bar=false", "model.width=8", "model.depth=2",
                              "data.max_eval_size=32", f"logger.enabled={str(tracked).lower()}"])
        return cfg, train(cfg, callbacks=[counter] if counter else [])


def test_default_trainer_logs_every_few_steps():
    config = yaml.safe_load((REPO_ROOT / "conf" / "trainer" / "default.yaml").read_text())
    assert config["log_every_n_steps"] > 1


@pytest.mark.slow  # ~8 s, nearly all of it creating the SQLite store (MLflow's schema migrations)
def test_step_loss_reaches_mlflow_only_every_log_interval(tmp_path):
    cfg, result = train_quickstart(tmp_path, tracked=True)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result.run_id,
                                                                                    "train/loss_step")
    every = cfg.trainer.log_every_n_steps
    assert every == 10  # the default config, not a test override
    # Lightning logs on the steps whose 1-based index is a multiple of the interval.
    assert sorted(m.step for m in history) == [s - 1 for s in range(every, STEPS + 1, every)]


def test_training_steps_do_not_sync_for_logging(tmp_path):
    counter = LightningItemCounter()
    train_quickstart(tmp_path, tracked=False, counter=counter)
    assert len(counter.per_step) == STEPS
    syncing_steps = sum(1 for n in counter.per_step if n)
    # Only the steps that write to the loggers may read values back from the device.
    assert syncing_steps <= STEPS // 10 + 1, counter.per_step


def write_case(folder: Path, seed: int, size: int = 16) -> None:
    write_phantom_case(folder, seed, size)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_brats_decodes_each_case_once_not_per_patch(tmp_path, monkeypatch, num_workers):
    for split, seeds in (("train", (0, 1)), ("validation", (2,))):
        for seed in seeds:
            write_case(tmp_path / "data" / split / f"case{seed}", seed)
    # A file, not a list: DataLoader workers are forked processes and would count in their own copy.
    log = tmp_path / "loads.txt"
    original_load = nib.load

    def counting_load(path, *args, **kwargs):  # noqa: ANN001, ANN202
        with log.open("a") as f:
            f.write(f"{path}\n")
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    monkeypatch.setattr(brats, "_CASE_CACHE", {})
    datamodule = BratsDataModule(root=str(tmp_path / "data"), samples_per_epoch=512, eval_samples=256,
                                 batch_size=64, num_workers=num_workers, phantom_size=16)
    datamodule.setup("fit")
    patches = 0
    for _ in range(2):  # two epochs
        for batch in datamodule.train_dataloader():
            patches += len(batch["label"])
    for batch in datamodule.val_dataloader():
        patches += len(batch["label"])
    loads = log.read_text().split()
    assert patches == 2 * 512 + 256
    # 3 cases x (2 modalities + label + brain mask), each decoded exactly once.
    assert len(loads) == 3 * 4 and len(set(loads)) == 3 * 4
    BratsDataModule(root=str(tmp_path / "data"), num_workers=num_workers).setup("fit")
    assert len(log.read_text().split()) == 3 * 4  # a second data module reuses the process cache
