"""What a model costs: parameters, multiply-accumulates per labelled output pixel, and measured latency.

MACs are counted by torch's own ``FlopCounterMode`` (torch.utils.flop_counter) while the model runs on one
input: every convolution, transposed convolution and matrix product dispatched to ATen is counted, also
those called functionally (``F.conv2d`` with a computed kernel, as Xu's separable layers do), which
module hooks would miss. FFTs are not counted, so a Wiener filter's cost shows as 0 MACs and only its
latency tells the truth.

``cost/macs_per_pixel`` is MACs per LABELLED OUTPUT pixel (or voxel): one forward pass divided by the
spatial size of its output (docs/metrics.md, "per labelled output pixel"). A dense net (segmentation,
restoration, reconstruction) labels every output pixel, so this is MACs / (H x W) of its output; a
voxel-centred patch net's forward labels its centre voxel(s) (output ``[B, K]`` or ``[B, K, 1, 1, 1]``:
one), so its figure is the whole forward pass; a classification + localisation net (``[B, K + 4]``)
labels one image. Models of different layouts thus compare at the cost of the answer they give.

The sweep driver logs these for every trial (``cost/*`` metrics of the child run) so the leaderboard
and the report can put each trial's metric beside its cost.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from deconvlab.build import build_datamodule, build_task
from deconvlab.console import progress
from deconvlab.errors import UserError
from deconvlab.macs import count_macs
from deconvlab.models import list_models
from deconvlab.store import run_config

COST_ERROR_TAG = "deconvlab.cost_error"


@dataclass(frozen=True)
class ModelCost:
    """The cost of one model on one input.

    Attributes:
        params: number of parameters (trainable or not).
        macs: multiply-accumulates of one forward pass on the input (batch of one).
        pixels: the output pixels (voxels) that forward pass labels (:func:`labelled_pixels`).
        latency_ms: median wall time of one forward pass, in milliseconds.
        input_shape: the input's shape, batch included.
        output_shape: the output's shape, batch included.
    """

    params: int
    macs: int
    pixels: int
    latency_ms: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] = ()

    @property
    def macs_per_pixel(self) -> float:
        """MACs per labelled output pixel."""
        return self.macs / self.pixels

    @property
    def latency_us_per_pixel(self) -> float:
        """Latency of a forward pass (batch of one) per labelled output pixel, in microseconds."""
        return self.latency_ms * 1000.0 / self.pixels

    def as_metrics(self) -> dict[str, float]:
        """The ``cost/*`` metrics logged to a run (``macs_per_pixel``: per labelled output pixel)."""
        return {"cost/params": float(self.params), "cost/macs_per_pixel": self.macs_per_pixel,
                "cost/latency_ms": self.latency_ms, "cost/latency_us_per_pixel": self.latency_us_per_pixel}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-accumulates of one forward pass of ``model`` on ``example``
    (:func:`deconvlab.macs.count_macs`), and the output of a forward pass."""
    macs = count_macs(model, example)
    with torch.no_grad():
        return macs, model(example)


def labelled_pixels(output: torch.Tensor) -> int:
    """The pixels (voxels) one item's output labels: its spatial size after the batch and class/channel
    axes (``[B, K, H, W]``: H*W); one for an output without spatial axes (``[B, K]``: a patch net's
    centre voxel, a classifier's or localiser's image)."""
    return int(math.prod(output.shape[2:])) if output.dim() > 2 else 1


def spatial_pixels(example: torch.Tensor) -> int:
    """H*W (or D*H*W) of a batch-first, channels-second input; the features of a flat [B, F] input."""
    return int(math.prod(example.shape[2:])) if example.dim() > 2 else int(example.shape[-1])


def measure_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of a forward pass under ``no_grad``, after ``warmup`` untimed passes."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(example)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return float(sorted(times)[len(times) // 2])


def model_cost(model: nn.Module, example: torch.Tensor, repeats: int = 5) -> ModelCost:
    """Parameters, MACs and latency of ``model`` (put in eval mode) on a batch of one ``example``, and the
    output pixels that forward pass labels."""
    model.eval()
    example = example[:1]
    macs, output = forward_macs(model, example)
    latency = measure_latency_ms(model, example, repeats)
    return ModelCost(count_params(model), macs, labelled_pixels(output), latency, tuple(example.shape),
                     tuple(output.shape))


# -- an input for a configured model ---------------------------------------------------------------------
def _redirect(node: Any, old: str, new: str) -> Any:
    """Replace ``old`` (the trial's output dir) by ``new`` in every string of a config container."""
    if isinstance(node, dict):
        return {k: _redirect(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_redirect(v, old, new) for v in node]
    return node.replace(old, new, 1) if isinstance(node, str) and old and node.startswith(old) else node


def example_from_data(cfg: DictConfig, task) -> torch.Tensor:
    """The first validation input of the configured data (the size the model is really used at).

    Anything the data module writes (plans, caches under the trial's output dir) goes to a throwaway
    folder instead of the trial's, which may not exist where the driver runs.
    """
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    with tempfile.TemporaryDirectory() as scratch:
        data_cfg = _redirect(data_cfg, str(cfg.paths.get("output_dir", "")), scratch)
        datamodule = build_datamodule(data_cfg, "validate")
        batch = next(iter(datamodule.val_dataloader()))
    return task.input_of(batch)[:1]


def example_from_registry(model: nn.Module) -> torch.Tensor:
    """A random input of the shape the model registry records for this model's class."""
    spec = next((s for s in list_models() if s.model_class is type(model)), None)
    if spec is None:
        raise LookupError(f"{type(model).__name__} is not in the model registry and its data did not load")
    return torch.rand(1, *spec.example_shape)


def example_for(cfg: DictConfig, task) -> tuple[torch.Tensor, bool]:
    """One input for the configured model: its data's first validation input, or (when the data cannot be
    loaded where this runs) a random one of the registry's example shape.

    Returns:
        ``(input, from_data)``.
    """
    try:
        return example_from_data(cfg, task), True
    except (OSError, UserError, ValueError, StopIteration):
        return example_from_registry(task.model), False


def config_cost(cfg: DictConfig, repeats: int = 5, example: torch.Tensor | None = None) -> ModelCost:
    """Build the configured model (as ``train`` does) and measure its cost on one input.

    Args:
        cfg: a composed (resolved) run config, e.g. a trial's ``config.yaml``.
        repeats: timed forward passes for the latency median.
        example: the input to use; by default :func:`example_for` picks one.
    """
    task = build_task(cfg)
    if example is None:
        example, _ = example_for(cfg, task)
    return model_cost(task.model, example, repeats)


# -- a sweep's trials ------------------------------------------------------------------------------------
def _measure_trial(cfg: DictConfig, examples: dict[str, torch.Tensor],
                   measured: dict[tuple[str, str, str], tuple[ModelCost, nn.Module]]) -> tuple[ModelCost, nn.Module]:
    # Trials of one sweep usually share their data config: load its first input once.
    key = OmegaConf.to_yaml(cfg.data, resolve=True)
    # ... and most share their model with other trials (they differ in optimiser settings or seed): build and
    # time each (model, task, data) once; one per trial took 0.35-1 s, most of a 200-trial sweep's end.
    model_key = (OmegaConf.to_yaml(cfg.model, resolve=True),
                 OmegaConf.to_yaml(cfg.task, resolve=True) if "task" in cfg else "", key)
    if model_key not in measured:
        task = build_task(cfg)
        if key in examples:
            example = examples[key]
        else:
            example, from_data = example_for(cfg, task)
            if from_data:
                examples[key] = example
        measured[model_key] = (model_cost(task.model, example), task.model)
    return measured[model_key]


# A trial's measured cost and the model it was measured on, or why it could not be measured.
Measurement = tuple[ModelCost, nn.Module] | Exception


def measure_trials(client: MlflowClient, run_ids: list[str],
                   configs: Mapping[str, str] | None = None) -> dict[str, Measurement]:
    """Measure every trial's model from its logged ``config.yaml`` (nothing is logged).

    A trial whose model cannot be built here gets the exception: costs are a view of a finished sweep, never
    a reason to fail it.

    Args:
        configs: the ``config.yaml`` texts the caller has (the sweep driver logged them): those runs' files
            are not downloaded again.
    """
    measurements: dict[str, Measurement] = {}
    examples: dict[str, torch.Tensor] = {}
    measured: dict[tuple[str, str, str], tuple[ModelCost, nn.Module]] = {}
    torch.manual_seed(0)
    for run_id in progress(run_ids, f"measuring the cost of {len(run_ids)} trials"):
        try:
            known = (configs or {}).get(run_id)
            cfg = OmegaConf.create(known) if known is not None else run_config(client, run_id)
            measurements[run_id] = _measure_trial(cfg, examples, measured)
        except Exception as exc:  # noqa: BLE001 - any model/config error: record it, keep the sweep
            measurements[run_id] = exc
    return measurements


def log_trial_costs(client: MlflowClient, measurements: Mapping[str, Measurement]) -> None:
    """Log each trial's ``cost/*`` metrics and ``model_summary.txt``, or the tag that says why it has none."""
    for run_id, measured in measurements.items():
        if isinstance(measured, Exception):
            client.set_tag(run_id, COST_ERROR_TAG, f"{type(measured).__name__}: {measured}"[:500])
        else:
            log_cost(client, run_id, *measured)


def costs_of(measurements: Mapping[str, Measurement]) -> dict[str, ModelCost | None]:
    """Each trial's cost, None where it could not be measured."""
    return {run_id: None if isinstance(m, Exception) else m[0] for run_id, m in measurements.items()}


def trial_costs(client: MlflowClient, run_ids: list[str], log: bool = True,
                configs: Mapping[str, str] | None = None) -> dict[str, ModelCost | None]:
    """Measure every trial's model (:func:`measure_trials`) and, with ``log``, log the costs to the trials'
    runs (:func:`log_trial_costs`)."""
    measurements = measure_trials(client, run_ids, configs)
    if log:
        log_trial_costs(client, measurements)
    return costs_of(measurements)


def summary(cost: ModelCost, model: nn.Module | None = None) -> str:
    """The model summary a run keeps: the cost in words, then the module tree."""
    lines = [f"parameters:     {cost.params:,}",
             f"MACs per pixel: {cost.macs_per_pixel:,.1f} per labelled output pixel "
             f"({cost.macs:,} MACs on an input of shape {list(cost.input_shape)}, labelling "
             f"{cost.pixels:,} pixels of an output of shape {list(cost.output_shape)})",
             f"latency:        {cost.latency_ms:.3f} ms (median of timed forward passes, batch of one, "
             f"{torch.get_num_threads()} CPU threads)"]
    return "\n".join(lines + (["", repr(model)] if model is not None else [])) + "\n"


def log_cost(client: MlflowClient, run_id: str, cost: ModelCost, model: nn.Module | None = None) -> None:
    """Log ``cost/*`` metrics and ``model_summary.txt`` to a run."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in cost.as_metrics().items()])
    client.log_text(run_id, summary(cost, model), "model_summary.txt")
