"""Multi-scale convnet for scene labelling (Farabet, Couprie, Najman & LeCun, TPAMI 2013).

The image is decomposed into a 3-level Laplacian pyramid, each level locally contrast-normalised; one
convnet, with the *same weights* at every scale, turns each level into features at stride 4; the coarser
levels' features are upsampled to the finest and concatenated, so that every pixel sees a context up to
4x wider than the net's own receptive field, and a per-pixel linear classifier (a 1x1 conv) scores them.

Optional clean-up: majority vote of the predicted labels inside scikit-image superpixels
(:func:`superpixel_vote`), the paper's cheapest post-processing. Switched on with
``superpixels=True`` it runs in evaluation mode only, where the net then returns, per pixel, the log of
its superpixel's vote shares: the argmax is the majority label and the tensor is still a valid logit map
for the task's loss and metrics.

Geometry: downsampling is a 5-tap binomial blur followed by 2x2 averaging (``ceil_mode``), so pixel j of
a level is centred on 2j + 1/2 of the level below, the same convention as ``F.interpolate(...,
align_corners=False)`` uses to upsample: levels and features stay aligned for any input size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model
from deconvlab.models.vgg import he_init, scaled

BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)  # Burt & Adelson's generating kernel, a Gaussian of sigma ~1
FARABET_CHANNELS = (16, 64, 256)  # the three stages of the paper's shared convnet


def _blur(x: torch.Tensor) -> torch.Tensor:
    taps = x.new_tensor(BINOMIAL_5) / sum(BINOMIAL_5)
    kernel = torch.outer(taps, taps).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=x.shape[1])


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Blur and halve (rounding up): one step down a Gaussian pyramid."""
    return F.avg_pool2d(_blur(x), 2, ceil_mode=True)


def upsample(x: torch.Tensor, factor: int, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear upsampling by ``factor``, trimmed to ``size`` (undoes ``ceil_mode`` rounding)."""
    if factor == 1:
        return x[..., : size[0], : size[1]]
    y = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    return y[..., : size[0], : size[1]]


def laplacian_pyramid(image: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
    """Band-pass levels ``g_k - up(g_{k+1})`` of a Gaussian pyramid, finest first, plus the low-pass top.

    Level k has size ``ceil(H / 2**k)``; :func:`reconstruct_laplacian` inverts the decomposition exactly.
    """
    gaussians = [image]
    for _ in range(levels - 1):
        gaussians.append(downsample(gaussians[-1]))
    pairs = zip(gaussians[:-1], gaussians[1:], strict=True)
    bands = [g - upsample(coarser, 2, g.shape[-2:]) for g, coarser in pairs]
    return bands + [gaussians[-1]]


def reconstruct_laplacian(bands: list[torch.Tensor]) -> torch.Tensor:
    """The image a :func:`laplacian_pyramid` came from."""
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = band + upsample(image, 2, band.shape[-2:])
    return image


def local_contrast_normalise(x: torch.Tensor) -> torch.Tensor:
    """Subtract a local (Gaussian, ~9x9) mean per channel, divide by the local standard deviation.

    The std is floored at its image-wide mean (Jarrett et al.'s rule), so flat regions are not blown up
    into noise. Farabet et al. normalise every pyramid level this way; here it also gives the band-pass
    levels and the low-pass top the same statistics, which the shared BatchNorm layers need: otherwise
    their running statistics average three different distributions and evaluation drifts from training.
    """
    centred = x - _blur(_blur(x))
    std = _blur(_blur(centred**2)).sqrt()
    floor = std.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-4)
    return centred / torch.maximum(std, floor)


class SharedConvNet(nn.Module):
    """The paper's 3-stage net (7x7 convs, 2x2 pools after the first two: stride 4), run on every pyramid
    level with the same weights.

    BatchNorm (not in the paper, which predates it) pools its statistics over the pixels of *all* levels
    at once: per-level batch statistics in training would not match the single set of running statistics
    used in evaluation, and a from-scratch net then scores far worse in evaluation than in training.
    """

    def __init__(self, in_channels: int, width: float, batch_norm: bool) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in FARABET_CHANNELS]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 7, padding=3, bias=not batch_norm)
                                   for c_in, c_out in zip([in_channels, *widths], widths, strict=False))
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) if batch_norm else nn.Identity() for c in widths)
        self.out_channels = widths[-1]

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            levels = [F.relu(x) for x in _joint_norm(norm, [conv(x) for x in levels])]
            if i < len(self.convs) - 1:
                levels = [F.max_pool2d(x, 2, ceil_mode=True) for x in levels]
        return levels


def _joint_norm(norm: nn.Module, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a BatchNorm1d to the pixels of all maps together ([N, C, H*W] concatenated along pixels)."""
    flat = norm(torch.cat([m.flatten(2) for m in maps], dim=2))
    parts = flat.split([m.shape[-2] * m.shape[-1] for m in maps], dim=2)
    return [part.reshape(m.shape) for part, m in zip(parts, maps, strict=True)]


def superpixel_segments(image: np.ndarray, n_segments: int = 200, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels of an H x W x 3 image (any range), numbered 0..S-1."""
    from skimage.segmentation import slic

    lo, hi = float(image.min()), float(image.max())
    scaled_image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    segments = slic(scaled_image, n_segments=n_segments, compactness=compactness, channel_axis=-1,
                    start_label=0)
    return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)


def vote_shares(labels: np.ndarray, segments: np.ndarray, num_classes: int) -> np.ndarray:
    """Per segment, the fraction of its pixels carrying each label: an S x K array."""
    counts = np.bincount(segments.ravel() * num_classes + labels.ravel(),
                         minlength=(segments.max() + 1) * num_classes).reshape(-1, num_classes)
    return counts / counts.sum(axis=1, keepdims=True)


def superpixel_vote(labels: np.ndarray, segments: np.ndarray, num_classes: int) -> np.ndarray:
    """Relabel every superpixel with its most frequent label (ties go to the lower class index).

    Args:
        labels: H x W integer labels in [0, num_classes).
        segments: H x W superpixel ids in [0, S).
        num_classes: number of classes.

    Returns:
        H x W labels, constant inside every superpixel.
    """
    return vote_shares(labels, segments, num_classes).argmax(axis=1)[segments]


@register_model("farabet", "segmentation", example_shape=(3, 37, 45),
                tiny_kwargs={"num_classes": 3, "width": 0.25})
class Farabet(nn.Module):
    """Laplacian pyramid -> shared-weight convnet per level -> upsample + concat -> per-pixel classifier.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        width: channel multiplier of the shared convnet (16, 64, 256 channels at width 1).
        levels: pyramid levels (3 in the paper).
        batch_norm: BatchNorm after every conv.
        superpixels: in evaluation mode, replace the prediction by a majority vote inside SLIC
            superpixels (see module doc); training is unaffected.
        n_segments: SLIC's target number of superpixels per image.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, levels: int = 3,
                 batch_norm: bool = True, superpixels: bool = False, n_segments: int = 200) -> None:
        super().__init__()
        self.levels, self.num_classes = levels, num_classes
        self.superpixels, self.n_segments = superpixels, n_segments
        self.features = he_init(SharedConvNet(in_channels, width, batch_norm))
        self.classifier = nn.Conv2d(levels * self.features.out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [local_contrast_normalise(level) for level in laplacian_pyramid(x, self.levels)]
        per_level = self.features(levels)
        size = per_level[0].shape[-2:]
        stacked = torch.cat([upsample(f, 2**k, size) for k, f in enumerate(per_level)], dim=1)
        logits = upsample(self.classifier(stacked), 4, x.shape[-2:])
        if self.superpixels and not self.training:
            return self.vote_logits(logits, x)
        return logits

    def vote_logits(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per pixel, the log vote shares of its superpixel (argmax = the superpixel's majority label)."""
        out = []
        for image, labels in zip(images, logits.argmax(dim=1), strict=True):
            picture = image.detach().permute(1, 2, 0).float().cpu().numpy()
            segments = superpixel_segments(picture, self.n_segments)
            shares = vote_shares(labels.cpu().numpy(), segments, self.num_classes)[segments]
            out.append(torch.from_numpy(shares).permute(2, 0, 1))
        # A small floor keeps the loss finite for classes that no pixel of a superpixel voted for.
        return torch.stack(out).to(logits).clamp_min(1e-4).log()
