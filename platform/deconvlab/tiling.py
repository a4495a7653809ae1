"""Tiled inference for same-size networks: an image or volume too large for one forward pass, in tiles.

Each tile is cut with a halo of input around it (the network's receptive-field radius, measured) and only
the tile's own region of the output is kept, so every output value sees exactly the input it would see in
one pass: the tiled output equals the one-pass output wherever the network is translation-equivariant
(convolutions, pooling and upsampling whose grids the tiles keep aligned: tile origins are multiples of
``multiple``, the network's total stride). Near the image border the halo is clipped where the image ends,
as the one pass pads there too.

This is the platform's tiler, not MONAI's sliding-window inference (which blends overlapping windows and
so differs from one pass); it serves ``deconvlab predict`` for inputs larger than ``--tile``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]


def _rewired(network: nn.Module, seed: int) -> nn.Module:
    """A copy of ``network`` with fresh random weights: its receptive field is the architecture's, not what
    training left (a zero-initialised last layer of a residual branch would hide the branch's reach)."""
    probe = copy.deepcopy(network).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in probe.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:  # kernels: unit gain, so activations neither vanish nor overflow
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
            elif name.endswith("weight"):  # normalisation scales: near 1
                parameter.copy_(1 + 0.1 * noise)
            else:  # biases: small and positive, so ReLUs stay open and every path shows
                parameter.copy_(0.1 * noise.abs())
    return probe


def receptive_radius(network: nn.Module, channels: int, ndim: int, probe: int = 64, limit: int = 512,
                     draws: int = 2) -> int:
    """How far (in input pixels/voxels) one output value reaches on each side, measured by a gradient.

    The gradient of the centre output value with respect to a random input is non-zero exactly over the
    input it depends on. It is measured on copies of the network with random weights (the largest of
    ``draws`` copies), and the probe grows until that region fits inside it (up to ``limit``).
    """
    radius = 0
    for seed in range(draws):
        copy_ = _rewired(network, seed)
        size = probe
        while True:
            x = torch.randn(1, channels, *([size] * ndim), requires_grad=True)
            out = copy_(x)
            centre = [s // 2 for s in out.shape[2:]]
            out[(0, slice(None), *centre)].sum().backward()
            reach = x.grad.abs().sum(dim=(0, 1)).nonzero()
            if not len(reach):  # the centre saw nothing of this draw's input (every path closed): next draw
                found = 0
                break
            scale = [size / s for s in out.shape[2:]]
            at = torch.tensor([c * f for c, f in zip(centre, scale, strict=True)])
            found = int(math.ceil(max((at - reach.min(dim=0).values).max(), (reach.max(dim=0).values - at).max())))
            if 2 * found + 1 < size or size >= limit:
                break
            size *= 2
        radius = max(radius, found)
    return radius


@torch.no_grad()
def equivariance_step(network: nn.Module, channels: int, ndim: int, radius: int,
                      candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int | None:
    """The smallest shift of the input that shifts the output by the same amount (the network's total
    stride, as far as its pooling and upsampling grids go): tile origins must be multiples of it.

    Compared more than ``radius`` away from the borders, where zero padding cannot reach. None when no
    candidate works (the network is not translation-equivariant: it cannot be tiled exactly)."""
    size = 2 * radius + 2 * max(candidates) + 16
    x = torch.randn(1, channels, *([size + max(candidates)] * ndim))
    reference = network(x[(slice(None), slice(None), *([slice(0, size)] * ndim))])
    low, high = radius + max(candidates), size - radius - max(candidates)
    for shift in candidates:
        moved = network(x[(slice(None), slice(None), *([slice(shift, shift + size)] * ndim))])
        inner = (slice(None), slice(None), *([slice(low - shift, high - shift)] * ndim))
        same = (slice(None), slice(None), *([slice(low, high)] * ndim))
        if torch.allclose(moved[inner], reference[same], atol=1e-4, rtol=1e-4):
            return shift
    return None


def _starts(length: int, tile: int) -> list[int]:
    return list(range(0, length, tile)) if length > tile else [0]


@torch.no_grad()
def tiled_forward(forward: Forward, x: torch.Tensor, tile: int, halo: int, multiple: int = 1) -> torch.Tensor:
    """``forward(x)`` computed tile by tile (``x``: [N, C, *spatial], 2-D or 3-D; output the same spatial size).

    Args:
        forward: the network's forward (in eval mode).
        x: the whole input.
        tile: the side of the region each forward pass produces (rounded down to ``multiple``).
        halo: input context added around each tile (at least the receptive radius).
        multiple: the network's total stride: tiles and halos are whole multiples of it, so the grids of
            its pooling and upsampling layers line up with the one-pass grids.
    """
    spatial = x.shape[2:]
    tile = max(multiple, tile // multiple * multiple)
    halo = math.ceil(halo / multiple) * multiple
    if all(s <= tile for s in spatial):
        return forward(x)
    out = None
    for origin in itertools.product(*(_starts(s, tile) for s in spatial)):
        ends = [min(o + tile, s) for o, s in zip(origin, spatial, strict=True)]
        lows = [max(0, o - halo) for o in origin]
        highs = [min(s, e + halo) for e, s in zip(ends, spatial, strict=True)]
        piece = forward(x[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True)))])
        if out is None:
            out = x.new_zeros((x.shape[0], piece.shape[1], *spatial), dtype=piece.dtype)
        keep = tuple(slice(o - lo, e - lo) for o, e, lo in zip(origin, ends, lows, strict=True))
        out[(slice(None), slice(None), *(slice(o, e) for o, e in zip(origin, ends, strict=True)))] = \
            piece[(slice(None), slice(None), *keep)]
    return out


@dataclass(frozen=True)
class TilePlan:
    """How to tile a network exactly: the input context each tile needs and the grid its origins keep."""

    halo: int
    multiple: int


def plan_tiles(network: nn.Module, channels: int, ndim: int) -> TilePlan | None:
    """Measure a network's receptive radius and stride; None when it cannot be tiled exactly (it is not
    translation-equivariant on any grid up to 64, e.g. resampling pyramids or argmax-switch unpooling)."""
    radius = receptive_radius(network, channels, ndim)
    step = equivariance_step(network, channels, ndim, radius)
    return None if step is None else TilePlan(radius, step)
