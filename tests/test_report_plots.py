"""The report's pictures read well: log-axis ticks that do not run together, a legend that hides nothing,
"(log)" axes taken from the search space, and autoencoder samples that span the digit classes."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deconvlab.data.mnist import MNISTDataModule
from deconvlab.sweep.leaderboard import with_costs
from deconvlab.sweep.plots import parallel_coordinates_figure, pareto_figure, readable_log_axis, short_number
from deconvlab.sweep.report import log_scaled_keys
from deconvlab.tasks.reconstruction import ReconstructionTask, spread_over_classes


def _drawn(fig: Figure):
    """Draw ``fig`` with Agg and return its renderer (text extents are known only after a draw)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _shown_tick_labels(ax) -> list:
    """The x tick labels that are drawn: visible, not empty, inside the axis' view."""
    lo, hi = sorted(ax.get_xlim())
    return [label for label in ax.xaxis.get_ticklabels(which="both")
            if label.get_visible() and label.get_text() and lo <= label.get_position()[0] <= hi]


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)]


# The quickstart sweep's costs: MACs/px spans 1.2 decades, the span where matplotlib labelled minor ticks.
QUICKSTART = pd.DataFrame({
    "trial": ["ce2bc_00003", "ce2bc_00001", "ce2bc_00000", "ce2bc_00002", "ce2bc_00004"],
    "best val/psnr": [24.64, 24.63, 24.60, 24.47, 24.20],
    "params": [37601, 19105, 9585, 2625, 37601],
    "MACs/px": [37440.0, 19008.0, 9504.0, 2592.0, 37440.0],
    "latency ms": [1.158, 0.6831, 0.6252, 0.2841, 1.2],
})


def test_pareto_log_axes_show_a_few_readable_labels_that_do_not_overlap():
    fig = pareto_figure(QUICKSTART, "best val/psnr", "max")
    renderer = _drawn(fig)
    log_axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert len(log_axes) == 2  # MACs/px and params span more than a decade; latency does not
    for ax in log_axes:
        labels = _shown_tick_labels(ax)
        assert 2 <= len(labels) <= 8, [t.get_text() for t in labels]
        assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_visible() and t.get_text()]
        assert not _overlaps([t.get_window_extent(renderer) for t in labels]), [t.get_text() for t in labels]
        assert all("times" not in t.get_text() and "^" not in t.get_text() for t in labels)


@pytest.mark.parametrize("lo, hi", [(2592, 37440), (3000, 9000 * 10), (0.05, 3.0), (1e6, 4e12), (11, 120)])
def test_readable_log_axis_never_crowds_its_labels(lo, hi):
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.scatter([lo, hi], [0, 1])
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, lo, hi)
    renderer = _drawn(fig)
    labels = _shown_tick_labels(ax)
    assert len(labels) >= 2
    assert not _overlaps([t.get_window_extent(renderer) for t in labels]), [t.get_text() for t in labels]


def test_short_numbers():
    assert [short_number(v) for v in (2000, 50_000, 1e6, 3e9, 0.05, 20)] == ["2k", "50k", "1M", "3G", "0.05", "20"]


def test_the_pareto_legend_covers_no_point_and_no_trial_label():
    # Maximising: the costly weak trial 00004 sits in the lower right, where the legend used to go.
    fig = pareto_figure(QUICKSTART, "best val/psnr", "max")
    renderer = _drawn(fig)
    legend = fig.legends[0].get_window_extent(renderer) if fig.legends else None
    assert legend is not None, "the Pareto front has a legend"
    labels = [text for ax in fig.axes for text in ax.texts]
    assert len(labels) == 3 * len(QUICKSTART)
    assert not [t.get_text() for t in labels if t.get_window_extent(renderer).overlaps(legend)]
    # Outside every plotting area, so no point can be under it either.
    assert not [ax for ax in fig.axes if ax.get_window_extent(renderer).overlaps(legend)]


def _axis_names(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


SPACE = {"search_space.optim.lr": "loguniform(0.0003, 0.003)", "search_space.model.code_size": "grid(([2, 16, 32],))",
         "search_space.model": "grid((['autoencoder_fc', 'autoencoder_conv'],))",
         "search_space.model.width": "qloguniform(4, 64, 4)", "search_space.model.depth": "randint(3, 5)"}


def test_log_scaled_hyperparameters_are_those_the_search_space_samples_on_a_log_scale():
    assert log_scaled_keys({**SPACE, "sweep.metric": "val/mse"}) == {"optim.lr", "model.width"}


@pytest.mark.parametrize("lrs", [[1.1e-3, 1.6e-3, 2.0e-3], [3.1e-4, 9e-4, 2.9e-3]])
def test_the_log_marker_comes_from_the_search_space_not_from_the_samples(lrs):
    # Two reports of one sweep file: the learning rates spread over less than or more than a decade,
    # the code sizes {2, 16, 32} over 16x. lr is log in both; code size (a grid of numbers) in neither.
    table = pd.DataFrame({"trial": ["a", "b", "c"], "optim.lr": [str(v) for v in lrs],
                          "model.code_size": ["2", "16", "32"], "best val/mse": [0.02, 0.03, 0.05]})
    log_scaled = log_scaled_keys(SPACE)
    fig = parallel_coordinates_figure(table, ["model.code_size", "optim.lr"], "best val/mse", "min", log_scaled)
    assert _axis_names(fig) == ["model.code_size", "optim.lr\n(log)", "best val/mse"]
    # Code size on a linear axis: 16 sits at (16 - 2) / (32 - 2) of the way up.
    lines = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 3]
    heights = sorted(float(line.get_ydata()[0]) for line in lines)
    assert heights == pytest.approx([0.0, 14 / 30, 1.0])


def test_the_ends_of_an_axis_are_labelled_apart():
    table = pd.DataFrame({"trial": ["a", "b"], "optim.lr": ["0.001", "0.002"], "best val/psnr": [24.6021, 24.6374]})
    fig = parallel_coordinates_figure(table, ["optim.lr"], "best val/psnr", "max", {"optim.lr"})
    assert {"24.6", "24.64"} <= {t.get_text() for t in fig.axes[0].texts}  # not "24.6" twice


def test_spread_over_classes_takes_the_first_of_each_class_then_fills_up():
    labels = [0] * 50 + [1] * 50 + [2] * 50
    assert spread_over_classes(labels, 8) == [0, 50, 100, 1, 2, 3, 4, 5]
    assert spread_over_classes([3, 3, 1, 2, 1], 2) == [2, 3]  # sorted by class, first of each
    assert spread_over_classes([], 8) == []


class TinyAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.Sigmoid(), nn.Unflatten(1, (1, 28, 28)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_autoencoder_samples_span_the_classes_of_a_class_sorted_validation_split(tmp_path):
    data = MNISTDataModule(max_samples=400, batch_size=32)
    data.setup("validate")
    labels = data.eval_set.labels.tolist()
    assert labels == sorted(labels) and len(set(labels[:8])) == 1  # the trap: the first 8 are all zeros
    task = ReconstructionTask(TinyAutoencoder(), num_samples=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(task, datamodule=data, verbose=False)
    assert len(set(task.sample_labels)) >= 5 and task.sample_labels == list(range(8))
    grid = task.rendered_samples["reconstructions"]
    assert grid.shape[1] >= 8 * 28  # eight digits side by side (originals above, reconstructions below)


def test_reading_a_sweep_back_loads_neither_torch_nor_ray():
    # `deconvlab report` imports the report module; torch, Lightning, Ray and scipy.stats took ~4 of its ~6 s
    # and it needs none of them (a sweep with repeats imports scipy.stats when it computes its statistics).
    code = ("import sys, deconvlab.sweep.report, deconvlab.sweep.plots; "
            "print(sorted(m for m in ('torch', 'ray', 'pytorch_lightning', 'scipy.stats', 'deconvlab.cost') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Cost:
    def __init__(self, macs: float) -> None:
        self.macs = macs

    def as_metrics(self) -> dict[str, float]:
        return {"cost/macs_per_pixel": self.macs, "cost/latency_ms": self.macs / 1000}


def test_costs_of_a_sweep_from_before_they_were_logged_are_measured_only_when_asked():
    table = pd.DataFrame({"trial": ["a", "b"], "best val/psnr": [24.0, 23.0], "params": [10, 20],
                          "optim.lr": ["0.001", "0.002"], "mlflow_run": ["r1", "r2"]})
    asked: list[list[str]] = []

    def measure(client, run_ids):
        asked.append(run_ids)
        return {"r1": _Cost(900.0), "r2": None}  # r2 could not be measured

    assert with_costs(None, table, None) is table  # no measurer: no cost columns, no Pareto plot
    measured = with_costs(None, table, measure)
    assert asked == [["r1", "r2"]]
    assert list(measured.columns) == ["trial", "best val/psnr", "params", "MACs/px", "latency ms", "optim.lr",
                                      "mlflow_run"]
    assert measured["MACs/px"].iloc[0] == 900.0 and math.isnan(measured["MACs/px"].iloc[1])
    assert with_costs(None, measured, measure) is measured and len(asked) == 1  # logged costs: not again


def test_costs_just_measured_replace_the_ones_whose_writes_are_still_under_way():
    # The end of a sweep writes the costs on a thread while it reads the trials back: what it reads may hold
    # some trials' costs and not others'; the costs it measured are the table's.
    partly_written = pd.DataFrame({"trial": ["a", "b"], "best val/psnr": [24.0, 23.0], "params": [10, 20],
                                   "MACs/px": [900.0, float("nan")], "latency ms": [0.9, float("nan")],
                                   "mlflow_run": ["r1", "r2"]})
    known = {"r1": _Cost(900.0), "r2": _Cost(400.0)}
    table = with_costs(None, partly_written, None, known)
    assert table["MACs/px"].tolist() == [900.0, 400.0] and table["latency ms"].tolist() == [0.9, 0.4]
    assert math.isnan(with_costs(None, partly_written, None, {"r1": known["r1"]})["MACs/px"].iloc[1])
