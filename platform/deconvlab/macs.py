"""Multiply-accumulates of one forward pass: what a model costs (``cost``) and what training spends
(the ``TrainingCompute`` callback) are counted the same way.

torch's own ``FlopCounterMode`` (torch.utils.flop_counter) counts while the model runs on one input: every
convolution, transposed convolution and matrix product dispatched to ATen, also those called functionally
(``F.conv2d`` with a computed kernel, as Xu's separable layers do), which module hooks would miss. FFTs are
not counted, so a Wiener filter shows 0 MACs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example`` (convolutions and matmuls)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    # FlopCounterMode counts a multiply and an add as two FLOPs.
    return counter.get_total_flops() // 2
