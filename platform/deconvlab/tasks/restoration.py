"""Image restoration (deblurring, denoising): degraded image in, sharp image out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}
# An image reproduced exactly (MSE 0) would be +inf dB; it counts as 100 dB (MSE 1e-10) so a mean stays finite.
MIN_MSE = 1e-10
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03  # Wang et al. 2004: an 11-tap Gaussian window


def psnr_per_image(output: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``[B]`` PSNR (dB) of each image against its target: ``10 log10(range^2 / MSE)``, the MSE over the
    image's channels and pixels (scikit-image's ``peak_signal_noise_ratio``)."""
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(MIN_MSE))


def ssim_per_image(output: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``[B]`` mean SSIM of each ``[B, C, H, W]`` image against its target.

    Wang et al. 2004 as scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``: local statistics under an 11 x 11 Gaussian window,
    averaged over the positions where the window lies inside the image (5 pixels from each border) and
    over the channels.
    """
    side = 2 * SSIM_RADIUS + 1
    if min(output.shape[-2:]) < side:
        raise ValueError(f"SSIM needs images of at least {side}x{side} pixels (after task.crop_border), got "
                         f"{tuple(output.shape[-2:])}: use larger validation images or a smaller task.crop_border")
    x, y = output.double(), target.double()
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=x.device)
    g = torch.exp(-taps ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    channels = x.shape[1]

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable, valid: only full windows
        z = F.conv2d(z, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)
        return F.conv2d(z, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)

    with torch.autocast(x.device.type, enabled=False):  # in float64 whatever the training precision
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim.flatten(1).mean(dim=1)


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border else x


class RestorationTask(BaseTask):
    """Trains a restoration network; reports PSNR/SSIM of its output and of the degraded input.

    ``val/psnr``, ``val/ssim`` and ``val/psnr_input`` (the degraded input against the target: the bar a
    model must clear) are per-image means: each image's score after the ``crop_border`` crop, output
    clamped to [0, 1], data range 1, then the mean over the split's images (as papers report them).
    ``val/psnr_pooled`` is torchmetrics' default: one PSNR of the squared error pooled over the split.

    Args:
        loss: "l1", "mse" or "smooth_l1".
        crop_border: pixels ignored at each border by the metrics (boundary effects of the blur).
        loss_border: pixels ignored at each border of a training crop by the loss. A network with a
            large support (Xu's 121-pixel inverse kernel) sees mostly padding near a small crop's edges,
            which whole test images do not have; without this it learns to repair its own padding.
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "restoration"
    PER_IMAGE = ("psnr", "ssim", "psnr_input")

    def __init__(self, *args, loss: str = "l1", crop_border: int = 0, loss_border: int = 0, **kwargs) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown restoration loss {loss!r}; choose one of {sorted(LOSSES)}")
        if loss_border < 0:
            raise ValueError(f"loss_border must be >= 0, got {loss_border}")
        self.loss_name, self.crop_border, self.loss_border = loss, crop_border, loss_border
        kwargs.setdefault("monitor", "val/psnr")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)

    def build_metrics(self) -> MetricCollection:
        # Fed one by one (update_metrics): compute groups would merge the three means' identical states.
        means = {name: MeanMetric() for name in self.PER_IMAGE}
        return MetricCollection({**means, "psnr_pooled": PeakSignalNoiseRatio(data_range=1.0)},
                                compute_groups=False)

    def item_aggregates(self) -> dict[str, str]:
        return {f"val/{name}": "mean" for name in self.PER_IMAGE}

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input"]

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["target"]

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["input"])
        border = self.loss_border if self.training else 0
        if border and 2 * border >= min(output.shape[-2:]):
            raise ValueError(f"task.loss_border={border} leaves nothing of {tuple(output.shape[-2:])} crops: "
                             "raise data.patch_size above twice the border")
        loss = LOSSES[self.loss_name](_crop(output, border), _crop(batch["target"], border))
        return loss, output

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        return _crop(x, self.crop_border)

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        target = self._crop(batch["target"]).float()
        restored = self._crop(output).float().clamp(0, 1)
        degraded = self._crop(batch["input"]).float().clamp(0, 1)
        values = {"psnr": psnr_per_image(restored, target), "ssim": ssim_per_image(restored, target),
                  "psnr_input": psnr_per_image(degraded, target)}
        for name, per_image in values.items():
            self.val_metrics[name].update(per_image)
        self.val_metrics["psnr_pooled"].update(restored, target)
        self.record(batch, {f"val/{name}": v for name, v in values.items()})

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Triptychs: degraded input | restored output | sharp target."""
        return {f"sample{i}_input_output_target": side_by_side(
                    to_uint8(batch["input"][i]), to_uint8(output[i]), to_uint8(batch["target"][i]))
                for i in range(output.shape[0])}
