"""Reconstruction (autoencoders): the image in, the same image out through a bottleneck."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection

from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8


class PerPixelMetric(MeanMetric):
    """Mean over pixels of an elementwise loss between a reconstruction in [0,1] and the image."""

    def __init__(self, loss_fn, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loss_fn = loss_fn

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(self.loss_fn(output, target, reduction="none"))


def _bce(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Clamped: a reconstruction of exactly 0 or 1 must not produce an infinite BCE.
    return F.binary_cross_entropy(output.clamp(1e-6, 1 - 1e-6), target, reduction=reduction)


class ReconstructionTask(BaseTask):
    """Trains an autoencoder; reports per-pixel MSE and BCE on validation.

    Args:
        loss: "mse" or "bce" (both on reconstructions in [0, 1]).
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    def __init__(self, *args, loss: str = "mse", **kwargs) -> None:
        if loss not in ("mse", "bce"):
            raise ValueError(f"unknown reconstruction loss {loss!r}; choose 'mse' or 'bce'")
        self.loss_name = loss
        kwargs.setdefault("monitor", "val/mse")
        kwargs.setdefault("monitor_mode", "min")
        super().__init__(*args, **kwargs)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": PerPixelMetric(F.mse_loss), "bce": PerPixelMetric(_bce)})

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    target_of = input_of

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["image"])
        loss_fn = F.mse_loss if self.loss_name == "mse" else _bce
        return loss_fn(output, batch["image"]), output

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """One grid: originals on the top row, reconstructions below."""
        top = side_by_side(*(to_uint8(x) for x in batch["image"]))
        bottom = side_by_side(*(to_uint8(x) for x in output))
        return {"reconstructions": np.concatenate([top, np.full_like(top[:2], 255), bottom], axis=0)}
