"""Where a training step of Xu's full network goes, and what NHWC (channels-last) buys, on this CPU.

One training step (forward, loss, backward) of the model of ``experiment=xu_full_disk7_sat_jpeg90_bsd68``
on a batch like its training batches (16 crops of 96x96, one channel), timed for: the whole network in
the default contiguous layout, the whole network channels-last, the deconvolution CNN alone and the
outlier network alone (on the deconvolution CNN's output). The four are timed in turn, ``--repeats``
rounds, so a burst of load from other processes hits them alike; each figure is its median.

    python benchmarks/xu_step.py [--repeats 6] [--threads 2] [--batch 16] [--crop 96] [OVERRIDE ...]

OVERRIDEs are Hydra overrides of the experiment (e.g. ``model.outlier.width=24``): to price a variant.

Needs no data: the kernel comes from the experiment's degradation config, the batch is random.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from deconvlab.build import build_task
from deconvlab.config import compose_config
from deconvlab.perf import model_to_channels_last

EXPERIMENT = "xu_full_disk7_sat_jpeg90_bsd68"


def train_step(model: nn.Module, batch: torch.Tensor) -> None:
    """Forward, a mean-square loss and backward (what the optimiser step needs)."""
    model.zero_grad(set_to_none=True)
    model(batch).square().mean().backward()


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = compose_config([f"experiment={EXPERIMENT}", *args.overrides])
    contiguous, nhwc = build_task(cfg).model, model_to_channels_last(build_task(cfg).model)
    batch = torch.rand(args.batch, 1, args.crop, args.crop)
    restored = contiguous.deconv(batch).detach()
    cases = {
        "whole network, contiguous": lambda: train_step(contiguous, batch),
        "whole network, channels-last": lambda: train_step(nhwc, batch.contiguous(memory_format=torch.channels_last)),
        "deconvolution CNN alone": lambda: train_step(contiguous.deconv, batch),
        "outlier network alone": lambda: train_step(contiguous.outlier, restored),
    }
    for step in cases.values():  # warm-up: first calls pick kernels and allocate
        step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, step in cases.items():
            times[name].append(timed(step))
    whole = statistics.median(times["whole network, contiguous"])
    print(f"{EXPERIMENT}: batch {args.batch} x 1 x {args.crop} x {args.crop}, {args.threads} threads, "
          f"median of {args.repeats}", *args.overrides)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30s} {median:7.3f} s/step  {median / whole:6.2f} x the contiguous whole")


if __name__ == "__main__":
    main()
