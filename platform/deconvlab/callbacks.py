"""Lightning callbacks the platform adds to every run: sample images, the training compute spent, and the
epoch lines of the run's ``train.log``."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.trainer.states import TrainerFn

from deconvlab.macs import count_macs
from deconvlab.tracking import log_images, release_interrupted_reads, save_images


class SampleImages(pl.Callback):
    """Writes the images a task rendered at the end of validation (input / output / target).

    With an MLflow logger they become artifacts ``samples/epoch_NNN/*.png`` of the run; without one
    (a sweep trial, whose run is logged by the sweep driver) they are written under
    ``<default_root_dir>/samples/epoch_NNN/`` and travel with the trial's checkpoint.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = getattr(pl_module, "rendered_samples", None)
        if not images or not trainer.is_global_zero:
            return
        folder = f"samples/epoch_{trainer.current_epoch:03d}"
        mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if mlflow_logger is not None:
            log_images(mlflow_logger.experiment, mlflow_logger.run_id, images, folder)
        else:
            save_images(images, Path(trainer.default_root_dir) / folder)
        pl_module.rendered_samples = {}


RUN_LOGGER = "deconvlab.run"


class EpochLog(pl.Callback):
    """One line per validated epoch in the run's log (``train.log`` in its output folder): every scalar
    metric Lightning holds at that point, sorted by name, so the file reads the same in every run."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        shown = " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items()) if not math.isnan(v))
        logging.getLogger(RUN_LOGGER).info("epoch %d: %s", trainer.current_epoch, shown)


class ReleaseInterruptedReads(pl.Callback):
    """On Ctrl-C, frees the store read it cut short before Lightning's loggers end the run (Lightning calls
    callbacks' ``on_exception`` first): see :func:`deconvlab.tracking.release_interrupted_reads`."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        release_interrupted_reads(exception)


class LearningRateLog(pl.Callback):
    """The learning rate of every optimiser's first parameter group as metric ``lr`` (``lr/1``, ... for more
    optimisers), logged at the end of each training epoch.

    Lightning's ``LearningRateMonitor`` writes to loggers only and refuses a trainer without one, which is
    every sweep trial (the driver logs trials) and every ``logger=none`` run; logged through the module,
    the value reaches the tracked run, the trial's reports to Ray and ``train.log`` alike.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            key = "lr" if index == 0 else f"lr/{index}"
            pl_module.log(key, float(optimizer.param_groups[0]["lr"]), on_step=False, on_epoch=True)


class TrainingCompute(pl.Callback):
    """Cumulative training compute, logged after each epoch's training (at its validation) as metrics.

    - ``compute/train_macs``: multiply-accumulates spent on training so far, estimated as
      3 x (forward MACs of one training sample) x (training samples seen, all ranks). The forward MACs
      are counted once, by :func:`deconvlab.macs.count_macs` on the first item of the first training
      batch (the model in eval mode, the RNG state left as it was). The factor 3 stands for forward +
      backward: the backward pass costs about twice the forward (gradients with respect to the
      activations and to the weights, each about one forward's MACs).
    - ``compute/cpu_s``: process CPU seconds (``time.process_time``: every thread of the process, summed
      over ranks) spent inside training batches (forward, backward, optimiser step); data loading and
      validation are not counted.
    - ``compute/gpu_s``: wall seconds of the same training batches on the GPU (synchronised at each
      batch's start and end), summed over ranks; logged only when training runs on a GPU.

    With a logger (a single run) they go to it at Lightning's step; a sweep trial's ``ReportToRay`` reads
    them through :func:`training_compute`, and the sweep driver logs them to the child run per epoch. The
    totals are saved in checkpoints, so a resumed run or trial keeps counting from where it was.
    """

    # Forward + backward, as a multiple of one forward pass (see above).
    FORWARD_BACKWARD = 3

    def __init__(self) -> None:
        self.macs_per_sample: int | None = None
        self.on_gpu = False
        self._base = {"samples": 0.0, "cpu_s": 0.0, "gpu_s": 0.0}  # restored from a checkpoint
        self._local = dict.fromkeys(self._base, 0.0)  # this rank, since this process started
        self._started: tuple[float, float] | None = None
        self._totals: dict[str, float] = dict(self._base)
        self._totals_step: int | None = None
        self._logged_step: int | None = None
        self.latest: dict[str, float] = {}

    def _measure(self, pl_module: pl.LightningModule, batch: Any) -> None:
        model = pl_module.model
        # In the layout training feeds the model, so the count sees the same kernels.
        example = pl_module.input_of(pl_module.in_model_layout(batch))[:1]
        devices = [example.device] if example.device.type == "cuda" else []
        was_training = model.training
        # Eval mode: a counting pass must not update batch-norm statistics or draw dropout masks;
        # fork_rng: nor move the random state the run's reproducibility depends on; the precision
        # plugin's context: it runs in the run's precision (bf16 autocast), as training does.
        with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"), \
                pl_module.trainer.precision_plugin.forward_context():
            model.eval()
            try:
                self.macs_per_sample = count_macs(model, example)
            finally:
                model.train(was_training)

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.macs_per_sample is None:
            self.on_gpu = pl_module.device.type == "cuda"
            self._measure(pl_module, batch)
        self._sync()
        self._started = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._started is None:
            return
        self._sync()
        cpu, wall = self._started
        self._local["cpu_s"] += time.process_time() - cpu
        self._local["gpu_s"] += (time.perf_counter() - wall) if self.on_gpu else 0.0
        self._local["samples"] += pl_module.batch_size_of(batch)
        self._started = None

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The ``compute/*`` totals so far, summed over ranks (every rank must call this at the same point).

        Returns:
            An empty dict before the first training batch.
        """
        if self.macs_per_sample is None:
            return {}
        if self._totals_step != trainer.global_step:
            device = trainer.lightning_module.device
            local = torch.tensor([self._local[k] for k in self._base], dtype=torch.float64, device=device)
            summed = trainer.strategy.reduce(local, reduce_op="sum").tolist()
            self._totals = {k: self._base[k] + v for k, v in zip(self._base, summed, strict=True)}
            self._totals_step = trainer.global_step
        self.latest = {"compute/train_macs": float(self.FORWARD_BACKWARD * self.macs_per_sample
                                                   * self._totals["samples"]),
                       "compute/cpu_s": self._totals["cpu_s"]}
        if self.on_gpu:
            self.latest["compute/gpu_s"] = self._totals["gpu_s"]
        return dict(self.latest)

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = self.metrics(trainer)
        # The step Lightning's own logging uses at this point (LoggerConnector.log_metrics): at a validation
        # it is the step val/* metrics are logged at, so a run's metric and compute pair up by step.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._logged_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch without a validation (check_val_every_n_epoch > 1) still logs its compute.
        if self._logged_step != trainer.global_step:
            self._log(trainer)

    def state_dict(self) -> dict[str, float]:
        # The totals of the last report: checkpoints are written right after it (at validation end).
        return dict(self._totals)

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._base = {k: float(state_dict.get(k, 0.0)) for k in self._base}
        self._totals, self._totals_step = dict(self._base), None


def training_compute(trainer: pl.Trainer) -> dict[str, float]:
    """The ``compute/*`` totals of the trainer's :class:`TrainingCompute` callback (empty without one).

    While fitting they are brought up to date (a collective call under DDP: every rank must call this);
    afterwards they are the last logged values.
    """
    callback = next((c for c in trainer.callbacks if isinstance(c, TrainingCompute)), None)
    if callback is None:
        return {}
    return callback.metrics(trainer) if trainer.state.fn == TrainerFn.FITTING else dict(callback.latest)
