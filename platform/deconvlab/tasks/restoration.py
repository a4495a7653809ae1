"""Image restoration (deblurring, denoising): degraded image in, sharp image out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


class RestorationTask(BaseTask):
    """Trains a restoration network; reports PSNR/SSIM of its output and of the degraded input.

    ``val/psnr_input`` (the degraded input against the target) is the bar a model must clear.

    Args:
        loss: "l1", "mse" or "smooth_l1".
        crop_border: pixels ignored at each border by the metrics (boundary effects of the blur).
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "restoration"

    def __init__(self, *args, loss: str = "l1", crop_border: int = 0, **kwargs) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown restoration loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.loss_name, self.crop_border = loss, crop_border
        kwargs.setdefault("monitor", "val/psnr")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        self.input_metrics = MetricCollection({"psnr_input": PeakSignalNoiseRatio(data_range=1.0)})

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({
            "psnr": PeakSignalNoiseRatio(data_range=1.0),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        })

    def val_metric_names(self) -> list[str]:
        return [*super().val_metric_names(), "psnr_input"]

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input"]

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["target"]

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["input"])
        return LOSSES[self.loss_name](output, batch["target"]), output

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        b = self.crop_border
        return x[..., b:-b, b:-b] if b else x

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        target = self._crop(batch["target"])
        self.val_metrics.update(self._crop(output).clamp(0, 1), target)
        self.input_metrics.update(self._crop(batch["input"]).clamp(0, 1), target)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.input_metrics.compute().items()}, sync_dist=True)
        self.input_metrics.reset()
        super().on_validation_epoch_end()

    on_test_epoch_end = on_validation_epoch_end

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Triptychs: degraded input | restored output | sharp target."""
        return {f"sample{i}_input_output_target": side_by_side(
                    to_uint8(batch["input"][i]), to_uint8(output[i]), to_uint8(batch["target"][i]))
                for i in range(output.shape[0])}
