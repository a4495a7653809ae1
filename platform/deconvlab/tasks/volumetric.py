"""Volumetric (MRI) segmentation: patches in, voxel class logits out; Dice per tumour region."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.loggers import MLFlowLogger
from torchmetrics import Metric, MetricCollection

from deconvlab.data.brats import BRATS_REGIONS
from deconvlab.errors import UserError
from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8
from deconvlab.tasks.segmentation import colourise, default_palette
from deconvlab.volume.report import (
    aggregate_of,
    case_items,
    evaluate_cases,
    log_table,
    summarise,
    volume_key,
    write_table,
)

DEFAULT_CLEAN_UP = {"keep_fraction": 0.1, "fill_holes": True, "smooth_radius": 1}
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The layer(s) producing a net's class scores: ``model.output_layers()`` where the net says (an
    ensemble has one per member), else its last convolution or linear layer."""
    if hasattr(model, "output_layers"):
        return list(model.output_layers())
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise UserError(f"{type(model).__name__} has no convolution or linear layer to re-train",
                        "task.two_phase_epochs")
    return layers[-1:]


class RegionDice(Metric):
    """Dice of label *regions* (unions of classes), accumulated over all voxels of an epoch.

    Accumulating intersections and volumes (rather than averaging per-batch Dice) gives the Dice of all
    validation voxels pooled: for patch nets, of the sampled centre voxels. A training monitor; the
    per-case figures papers report are the whole-volume ``val/volume_*`` metrics (docs/metrics.md).
    """

    full_state_update = False

    def __init__(self, regions: Mapping[str, Sequence[int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.regions = {name: tuple(labels) for name, labels in regions.items()}
        n = len(self.regions)
        for state in ("intersection", "predicted", "actual"):
            self.add_state(state, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        predicted = logits.argmax(dim=1)
        for i, classes in enumerate(self.regions.values()):
            members = torch.tensor(classes, device=labels.device)
            p, t = torch.isin(predicted, members), torch.isin(labels, members)
            self.intersection[i] += (p & t).sum()
            self.predicted[i] += p.sum()
            self.actual[i] += t.sum()

    def compute(self) -> torch.Tensor:
        total = self.predicted + self.actual
        # A region absent from both prediction and truth is a perfect match, not 0/0.
        dice = torch.where(total > 0, 2 * self.intersection / total.clamp_min(1), torch.ones_like(total))
        return dice.float()


class VolumetricSegmentationTask(BaseTask):
    """Voxel-wise cross-entropy; Dice per region (and their mean) on validation.

    ``val/dice_<region>`` is pooled over the validation voxels (:class:`RegionDice`); the whole-volume
    ``val/volume_*`` figures are per-case means (:func:`deconvlab.volume.report.summarise`), and they are
    what per-item rows hold: one row per case when ``record_items`` is on.

    Labels may be dense ([B, D, H, W] or [B, H, W]) or one centre voxel per patch ([B]); the model's
    logits match them with the class axis second.

    Args:
        num_classes: number of label values (background included).
        regions: region name -> the labels it unites (BraTS whole/core/enhancing by default); the
            validation Dice and the whole-volume table are keyed by these names.
        class_weights: optional per-class loss weights.
        volume_eval: when to label the validation cases' whole volumes with a patch net's dense inference
            ("never", "last" = the last training epoch and every ``validate``, "every" epoch): a per-case
            table (Dice, sensitivity, HD95 per region, with and without clean-up) and contour overlays
            are logged (see :mod:`deconvlab.volume.report`); needs a net with ``dense_logits`` and a data
            module whose ``eval_set`` holds ``cases`` (BraTS / phantom cases).
        clean_up: keyword arguments of :func:`deconvlab.volume.cleanup.clean_up` for the "cleaned" rows;
            None leaves the clean-up out.
        crf: keyword arguments of :func:`deconvlab.volume.cleanup.mean_field_refine` for "crf" rows (the
            refinement, then the clean-up); None (default) leaves it out.
        volume_tile: dense inference tile side.
        two_phase_epochs: Havaei et al.'s two-phase training: the last ``two_phase_epochs`` epochs re-train
            only the net's output layer (:func:`output_layers`; everything else frozen, its BatchNorm and
            dropout in eval mode) on patches drawn from the true label distribution (the data module's
            ``sample_naturally_from``), correcting the over-segmentation class-balanced patches teach.
            0 (default) = one phase.
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "volumetric"

    def __init__(self, *args, num_classes: int, regions: Mapping[str, Sequence[int]] | None = None,
                 class_weights: Sequence[float] | None = None, volume_eval: str = "last",
                 clean_up: Mapping[str, Any] | None = DEFAULT_CLEAN_UP, crf: Mapping[str, Any] | None = None,
                 volume_tile: int = 48, two_phase_epochs: int = 0, **kwargs) -> None:
        if volume_eval not in ("never", "last", "every"):
            raise ValueError(f"task.volume_eval must be never, last or every, got {volume_eval!r}")
        if two_phase_epochs < 0:
            raise UserError(f"task.two_phase_epochs must be >= 0, got {two_phase_epochs}", "task.two_phase_epochs")
        self.two_phase_epochs, self.in_phase_two = two_phase_epochs, False
        self.volume_eval, self.volume_tile = volume_eval, volume_tile
        self.clean_up = dict(clean_up) if clean_up is not None else None
        self.crf = dict(crf) if crf is not None else None
        self.volume_rows: list[dict[str, Any]] = []
        self.volume_overlays: dict[str, np.ndarray] = {}
        self.num_classes = num_classes
        self.regions = {k: list(v) for k, v in (regions or BRATS_REGIONS).items()}
        kwargs.setdefault("monitor", "val/dice_mean")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.palette = default_palette(num_classes)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"dice": RegionDice(self.regions)})

    def flatten_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dice = values["dice"]
        flat = {f"dice_{name}": dice[i] for i, name in enumerate(self.regions)}
        flat["dice_mean"] = dice.mean()
        return flat

    def val_metric_names(self) -> list[str]:
        return [*(f"dice_{name}" for name in self.regions), "dice_mean"]

    def item_aggregates(self) -> dict[str, str]:
        """The whole-volume keys of the per-case rows: Dice, sensitivity and HD95 "mean", the count of
        penalised HD95s "sum" (:func:`deconvlab.volume.report.summarise`)."""
        optional = {"cleaned": self.clean_up, "crf": self.crf}
        stages = ["raw", *(stage for stage, settings in optional.items() if settings is not None)]
        columns = [f"{metric}_{region}" for metric in ("dice", "sensitivity", "hd95", "hd95_missed")
                   for region in self.regions]
        return {f"val/{volume_key(c, stage)}": aggregate_of(c) for stage in stages for c in columns}

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["label"]

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        return F.cross_entropy(logits, batch["label"], weight=self.class_weights), logits

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Middle axial slice: first modality | truth | prediction (dense 3-D labels only)."""
        if batch["label"].ndim != 4:
            return {}
        images, labels, predictions = batch["image"], batch["label"], output.argmax(dim=1)
        samples = {}
        for i in range(images.shape[0]):
            z = labels.shape[1] // 2
            # Patch nets may predict a centred sub-volume: take the matching slice of the input.
            zi = images.shape[2] // 2
            slice_ = images[i, 0, zi]
            shown = (slice_ - slice_.min()) / (slice_.max() - slice_.min()).clamp_min(1e-6)
            h, w = labels.shape[-2:]
            top, left = (shown.shape[0] - h) // 2, (shown.shape[1] - w) // 2
            samples[f"sample{i}_slice_truth_prediction"] = side_by_side(
                to_uint8(shown[top:top + h, left:left + w]), colourise(labels[i, z], self.palette),
                colourise(predictions[i, z], self.palette))
        return samples

    # -- two-phase training (Havaei et al. 2017) --------------------------------------------------
    def _phase_two_start(self) -> int:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs <= self.two_phase_epochs:
            raise UserError(f"task.two_phase_epochs={self.two_phase_epochs} leaves no first phase in "
                            f"trainer.max_epochs={max_epochs}", "task.two_phase_epochs",
                            "give fewer second-phase epochs than trainer.max_epochs")
        return max_epochs - self.two_phase_epochs

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.two_phase_epochs:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "sample_naturally_from"):
            raise UserError(f"two-phase training needs a data module that can draw patches from the true label "
                            f"distribution; {type(datamodule).__name__} cannot", "task.two_phase_epochs",
                            "use data=brats (BraTS or phantom cases) or task.two_phase_epochs=0")
        datamodule.sample_naturally_from(self._phase_two_start())

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.two_phase_epochs and not self.in_phase_two and self.current_epoch >= self._phase_two_start():
            self.enter_phase_two()

    def enter_phase_two(self) -> None:
        """Freeze everything but the output layer (the optimiser skips parameters without gradients)."""
        trained = {id(p) for layer in output_layers(self.model) for p in layer.parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in trained)
        self.in_phase_two = True
        self.train(self.training)

    def train(self, mode: bool = True) -> VolumetricSegmentationTask:
        """In the second phase the frozen layers stay in eval mode: their BatchNorm statistics and
        dropout must not move, only the output layer learns."""
        super().train(mode)
        if mode and self.in_phase_two:
            self.model.eval()
            for layer in output_layers(self.model):
                layer.train()
        return self

    # -- whole-volume evaluation -------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        cases = getattr(getattr(self.trainer.datamodule, "eval_set", None), "cases", None) \
            if self.trainer.datamodule is not None else None
        if not self._volume_eval_due() or not cases or not hasattr(self.model, "dense_logits"):
            return
        # Full precision: the whole-volume metrics should not depend on the training's mixed precision.
        with torch.autocast(self.device.type, enabled=False):
            self.volume_rows, self.volume_overlays = evaluate_cases(
                self.model, cases, self.regions, tile=self.volume_tile, clean=self.clean_up, crf=self.crf)
        self.log_dict({f"val/{k}": v for k, v in summarise(self.volume_rows).items()}, sync_dist=True)
        if self.record_items:
            self.item_rows = case_items(self.volume_rows)
        self.rendered_samples.update(self.volume_overlays)  # written beside the other samples by SampleImages
        self._log_volume_table()

    def _volume_eval_due(self) -> bool:
        trainer = self.trainer
        if self.volume_eval == "never" or trainer.sanity_checking:
            return False
        if self.volume_eval == "every" or trainer.state.fn != "fit":  # validate/test: every time
            return True
        return trainer.max_epochs is not None and self.current_epoch + 1 >= trainer.max_epochs

    def _log_volume_table(self) -> None:
        """``volume/per_case_epochNNN.csv``: an MLflow artifact, or (training without a logger: a sweep
        trial) a file under the run's root folder. Otherwise (``validate`` without a logger) the rows and
        overlays stay in ``volume_rows`` / ``volume_overlays`` for the caller to log."""
        if not self.trainer.is_global_zero:
            return
        name = f"per_case_epoch{self.current_epoch:03d}.csv"
        logger = next((lg for lg in self.trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is None:
            if self.trainer.state.fn == "fit":
                write_table(self.volume_rows, Path(self.trainer.default_root_dir) / "volume" / name)
            return
        log_table(logger.experiment, logger.run_id, self.volume_rows, name)
