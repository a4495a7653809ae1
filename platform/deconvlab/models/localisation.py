"""Classification + localisation: one class and one box per image (the lecture's "5 values").

A VGG-16 encoder (the same as FCN's and DeconvNet's, :mod:`deconvlab.models.vgg`) feeds two heads. The
box head reads pool5 averaged onto a small fixed grid (any input size works, and the grid keeps *where*).
The class head reads pool5 pooled over the whole image (max and mean per channel): *what* an object is
does not depend on where it is, whereas a fully connected layer over grid cells learns each class once per
cell (``class_pooling="grid"``, the older design, where the class head shares the box head's grid layer).
On shapes the global head named the class (0.88) in half the steps the grid head needed; both end alike
given enough labelled images (docs/results.md). The output keeps the models' one-tensor contract:
``[B, K + 4]``, the K class logits followed by the box ``x0, y0, x1, y1`` in normalised ``[0, 1]`` image coordinates.

The box is *parametrised* so that it is always inside the image and ordered, whatever the raw outputs:
per axis a size ``w = sigmoid(raw_w)`` and a start ``x0 = sigmoid(raw_x) * (1 - w)`` in the room that
size leaves, so ``0 <= x0 <= x0 + w = x1 <= 1``. Both are smooth everywhere (no clamp at the border
that would kill the gradient); a final clamp only absorbs float rounding of ``(1 - w) + w``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model
from deconvlab.models.vgg import VGG16, scaled

BOX_VALUES = 4
CLASS_POOLINGS = ("global", "grid")


def box_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Raw ``[..., 4]`` outputs ``(start_x, start_y, size_x, size_y)`` -> an inside, ordered normalised box."""
    size = torch.sigmoid(raw[..., 2:])
    start = torch.sigmoid(raw[..., :2]) * (1 - size)
    return torch.cat([start, start + size], dim=-1).clamp(0, 1)


def split_output(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K + 4]`` localiser output -> (class logits ``[B, K]``, boxes ``[B, 4]``)."""
    return output[:, :-BOX_VALUES], output[:, -BOX_VALUES:]


@register_model("localiser", "localisation", example_shape=(3, 32, 32),
                tiny_kwargs={"num_classes": 3, "width": 1 / 16, "hidden": 16, "grid": 2})
class Localiser(nn.Module):
    """VGG-16 encoder, a class head and a box head.

    Args:
        num_classes: number of classes the class head scores.
        in_channels: image channels.
        width: VGG-16 channel multiplier (0.125 gives 8..64 channels).
        batch_norm: BatchNorm after every conv (nothing is pretrained here).
        grid: pool5 is averaged onto ``grid x grid`` cells before the heads; more cells keep more of
            *where* things are, which the box head needs (global pooling would keep only *what*).
        hidden: units of the fully connected layer(s) before the heads (before the width multiplier).
        dropout: dropout before the heads.
        class_pooling: "global": the class head has its own hidden layer on pool5's per-channel max and
            mean over the whole image (translation invariant); "grid": it reads the box head's grid layer.
            The default stays "grid" so that models saved before the option load as they were trained;
            ``conf/model/localiser.yaml`` picks "global".
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 0.25, batch_norm: bool = True,
                 grid: int = 4, hidden: int = 1024, dropout: float = 0.2, class_pooling: str = "grid") -> None:
        super().__init__()
        if class_pooling not in CLASS_POOLINGS:
            raise ValueError(f"class_pooling must be one of {CLASS_POOLINGS}, got {class_pooling!r} "
                             "(config key model.class_pooling)")
        self.num_classes, self.grid = num_classes, grid
        self.encoder = VGG16(in_channels, width, batch_norm)
        channels, units = self.encoder.out_channels, scaled(hidden, width)
        self.fc = _hidden_layer(channels * grid * grid, units, dropout)
        self.class_fc = _hidden_layer(2 * channels, units, dropout) if class_pooling == "global" else None
        self.class_head = nn.Linear(units, num_classes)
        self.box_head = nn.Linear(units, BOX_VALUES)
        # Raw zeros = a centred box of half the image per axis: a neutral first guess.
        nn.init.zeros_(self.box_head.weight)
        nn.init.zeros_(self.box_head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool5 = self.encoder(x).pool5
        hidden = self.fc(F.adaptive_avg_pool2d(pool5, self.grid))
        if self.class_fc is None:
            class_hidden = hidden
        else:
            class_hidden = self.class_fc(torch.cat([pool5.amax(dim=(2, 3)), pool5.mean(dim=(2, 3))], dim=1))
        return torch.cat([self.class_head(class_hidden), box_from_raw(self.box_head(hidden))], dim=1)


def _hidden_layer(in_features: int, units: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, units), nn.ReLU(inplace=True), nn.Dropout(dropout))
