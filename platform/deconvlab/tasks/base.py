"""What every task shares: the optimiser, the train/val loop skeleton and sample-image logging.

A task is a LightningModule that wraps any ``nn.Module`` of its family. Subclasses say how to get
the model input and the loss from a batch (:meth:`step`), which metrics to update (:meth:`update_metrics`)
and how to draw a few samples (:meth:`render_samples`).

Per-item results: with ``task.record_items = True`` (off by default, so training pays nothing) every
validation/test epoch fills ``task.item_rows``, one dict per image (per case for the volumetric task):
``item`` (the batch's ``name``/``case`` entry, else the item's position in evaluation order as
``"00000"``), then each per-item metric under its logged key (``val/psnr``, ...). ``item_aggregates()``
says how each logged figure follows from those rows (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torchmetrics import MetricCollection

from deconvlab.perf import to_channels_last

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
# How a logged figure follows from the per-item rows (BaseTask.item_aggregates):
#   "mean": the mean of the column over the rows that have a value (NaN = the item has none);
#   "sum": the column's sum (a count of items);
#   "pooled": computed from counts summed over the split (e.g. mIoU from the split's confusion matrix),
#             so not a function of the rows' values.
AGGREGATES = ("mean", "sum", "pooled")
ITEM_KEYS = ("name", "case")  # batch entries that name its items


class BaseTask(pl.LightningModule):
    """Common training logic for all tasks.

    Args:
        model: the network (a plain ``nn.Module``).
        optimizer: a factory taking the parameters (Hydra ``_partial_: true``); Adam(lr=1e-3) if None.
        scheduler: an optional factory taking the optimiser (stepped once per epoch).
        monitor: the metric that picks the best checkpoint and ranks sweep trials.
        monitor_mode: "max" or "min".
        sample_every_n_epochs: how often sample images are rendered (0 disables them).
        num_samples: how many validation samples a rendering shows.
    """

    # Set by every task class: "restoration", "segmentation", "volumetric", "reconstruction" or
    # "localisation". The one spelling of task families: model catalogue entries use the same words.
    family: ClassVar[str]

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, monitor: str = "val/loss",
                 monitor_mode: str = "min", sample_every_n_epochs: int = 1, num_samples: int = 4) -> None:
        super().__init__()
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
        # Only plain values go into hparams: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.sample_every_n_epochs, self.num_samples = sample_every_n_epochs, num_samples
        self.val_metrics = self.build_metrics()
        self._samples_seen = 0
        self._train_loss_sum: torch.Tensor | None = None
        self._train_samples = 0
        self.channels_last = False  # set by deconvlab.perf.apply_perf (config perf.channels_last)
        self.rendered_samples: dict[str, np.ndarray] = {}
        self.num_params = sum(p.numel() for p in model.parameters())
        self.record_items = False  # set by whoever wants per-item rows (evaluate --per-item, compare)
        self.item_rows: list[dict[str, Any]] = []

    # -- what subclasses provide -------------------------------------------------------------
    def build_metrics(self) -> MetricCollection:
        """The validation metrics, keyed by the name logged under ``val/``."""
        raise NotImplementedError

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on a batch; return ``(loss, output)``."""
        raise NotImplementedError

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.val_metrics.update(output, self.target_of(batch))

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Images (H x W or H x W x 3, uint8) to log, keyed by a short file-safe name."""
        return {}

    def item_aggregates(self) -> dict[str, str]:
        """Per key of :attr:`item_rows`: how its logged figure follows from the rows ("mean", "sum" or
        "pooled", see :data:`AGGREGATES`)."""
        return {}

    # -- per-item rows -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.item_rows = []

    on_test_epoch_start = on_validation_epoch_start

    def record(self, batch: dict[str, Any], values: dict[str, torch.Tensor]) -> None:
        """Append one row per item of ``batch`` to :attr:`item_rows` (when :attr:`record_items` is on).

        Args:
            batch: the batch the values are of (its ``name`` or ``case`` entry names the items).
            values: full logged key (``val/psnr``) -> ``[B]`` per-item values (NaN: the item has none).
        """
        if not self.record_items or not values:
            return
        columns = {k: v.detach().double().cpu().tolist() for k, v in values.items()}
        count = len(next(iter(columns.values())))
        names = item_names(batch, len(self.item_rows), count)
        self.item_rows += [{"item": names[i], **{k: column[i] for k, column in columns.items()}}
                           for i in range(count)]

    # -- the loop ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def in_model_layout(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch in the memory layout the model runs in (channels-last when ``perf.channels_last``)."""
        if not self.channels_last:
            return batch
        # Inputs in the weights' layout: a convolution with channels-last weights and NCHW input would
        # convert the input on every call.
        return {k: to_channels_last(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.step(self.in_model_layout(batch))
        self._accumulate_train_loss(loss.detach(), self.batch_size_of(batch))
        # self.log costs ~0.5 ms of bookkeeping a call (more than a small model's whole step), so the step
        # value is handed to Lightning only on the steps it writes to the loggers. Never on the progress
        # bar: Lightning reads progress-bar values back with .item() after every batch (a GPU sync).
        if self._logs_this_step():
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes step metrics to the loggers after this step (``log_every_n_steps``)."""
        every = self.trainer.log_every_n_steps
        return bool(every) and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def _accumulate_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        # A running sum on the loss's device: no sync, one tiny kernel a step.
        weighted = loss.float() * batch_size
        self._train_loss_sum = weighted if self._train_loss_sum is None else self._train_loss_sum + weighted
        self._train_samples += batch_size

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_samples = None, 0

    def on_train_epoch_end(self) -> None:
        if self._train_loss_sum is None:
            return
        mean = self._train_loss_sum / self._train_samples
        # The sample-weighted epoch mean, as Lightning's own on_epoch=True reduction would give it;
        # "train/loss" (not sent to the loggers) keeps the name callbacks and sweeps read.
        self.log("train/loss_epoch", mean, on_step=False, on_epoch=True)
        self.log("train/loss", mean, on_step=False, on_epoch=True, logger=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch = self.in_model_layout(batch)
        loss, output = self.step(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=self.batch_size_of(batch))
        self.update_metrics(output, batch)
        self._collect_samples(batch, output, batch_idx)

    def on_validation_epoch_end(self) -> None:
        values = self.flatten_metrics(self.val_metrics.compute())
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=True)
        self._stop_if_diverged(values)
        # Logged beside the metrics so leaderboards can compare models at equal parameter budgets.
        self.log("model/num_params", float(self.num_params), sync_dist=False)
        self.val_metrics.reset()

    def _stop_if_diverged(self, values: dict[str, torch.Tensor]) -> None:
        """A NaN/inf validation metric means training diverged: fail the run (or trial) with the reason.

        Checked once per validation rather than per training step, so the hot loop never syncs.
        """
        bad = {k: float(v) for k, v in values.items() if not torch.isfinite(v).all()}
        if bad and not self.trainer.sanity_checking:
            raise FloatingPointError(f"validation metrics {bad} are not finite at epoch {self.current_epoch}: "
                                     "training diverged (lower optim.lr or clip gradients: trainer.gradient_clip_val)")

    def _collect_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor, batch_idx: int) -> None:
        """Render the first ``num_samples`` validation samples (written by the SampleImages callback)."""
        if batch_idx == 0:
            self.rendered_samples, self._samples_seen = {}, 0
        wanted = self.num_samples - self._samples_seen
        if wanted <= 0 or not self._wants_samples():
            return
        sliced = {k: v[:wanted] for k, v in batch.items()}
        for name, image in self.render_samples(sliced, output[:wanted].detach()).items():
            self.rendered_samples[f"batch{batch_idx}_{name}"] = image
        self._samples_seen += int(output[:wanted].shape[0])

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def flatten_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn metric results into scalars (subclasses split per-class/per-region vectors)."""
        return values

    def val_metric_names(self) -> list[str]:
        """Names (without ``val/``) of the scalars logged at the end of validation."""
        return list(self.val_metrics.keys())

    def metric_names(self) -> set[str]:
        """Every metric this task logs: what sweeps may rank trials by."""
        return {"train/loss", "train/loss_epoch", "train/loss_step", "val/loss", "model/num_params",
                *(f"val/{name}" for name in self.val_metric_names())}

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def batch_size_of(self, batch: dict[str, torch.Tensor]) -> int:
        return int(self.input_of(batch).shape[0])

    def _wants_samples(self) -> bool:
        n = self.sample_every_n_epochs
        return bool(n) and not self.trainer.sanity_checking and (self.current_epoch + 1) % n == 0

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(parameter_groups(self.model, self.optimizer_factory))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


def parameter_groups(model: nn.Module, optimizer_factory: OptimizerFactory) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one per learning-rate scale.

    A sub-module may set ``lr_scale`` (a float): its parameters, and those of its children that set none,
    then train at ``lr * lr_scale``. Xu et al.'s deconvolution CNN needs this: its weights are an inverse
    kernel of size ~1e-3, and one Adam step at the outlier network's rate rewrites them (measured: one
    step at 2e-3 took it from 22.65 to 6.2 dB). Frozen parameters are left out.
    """
    base_lr = getattr(optimizer_factory, "keywords", {}).get("lr")
    scales: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()  # a parameter shared by two modules may sit in one group only

    def visit(module: nn.Module, scale: float) -> None:
        scale = float(getattr(module, "lr_scale", scale))
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                scales.setdefault(scale, []).append(parameter)
        for child in module.children():
            visit(child, scale)

    visit(model, 1.0)
    if not scales:  # nothing to train: the optimiser still needs its parameters (it then never steps them)
        return [{"params": list(model.parameters())}]
    if set(scales) - {1.0} and base_lr is None:
        raise ValueError("a module sets lr_scale, so the optimiser needs an explicit lr (optim.lr)")
    return [{"params": params} if scale == 1.0 else {"params": params, "lr": base_lr * scale}
            for scale, params in scales.items()]


def item_names(batch: dict[str, Any], first: int, count: int) -> list[str]:
    """The ids of a batch's items: its ``name`` (or ``case``) entries, else their positions
    ``first, first + 1, ...`` in evaluation order as five-digit strings."""
    given = next((batch[k] for k in ITEM_KEYS if k in batch), None)
    if given is None:
        return [f"{first + i:05d}" for i in range(count)]
    values = given.tolist() if isinstance(given, torch.Tensor) else list(given)
    return [str(v) for v in values]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C,H,W] or [H,W] float in [0,1] -> H x W (x 3) uint8."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)
    return (array * 255 + 0.5).astype(np.uint8)


def side_by_side(*images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Concatenate equally tall uint8 images horizontally with a white gap."""
    as_rgb = [np.repeat(im[..., None], 3, axis=-1) if im.ndim == 2 else im for im in images]
    spacer = np.full((as_rgb[0].shape[0], gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for im in as_rgb:
        parts += [im, spacer]
    return np.concatenate(parts[:-1], axis=1)
