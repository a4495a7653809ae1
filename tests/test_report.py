"""Model cost (MACs by hand), Pareto fronts, the sweep views and the self-contained HTML report."""

from __future__ import annotations

import base64
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import run_smoke_sweep
from deconvlab import cost, tracking
from deconvlab.cli import main
from deconvlab.config import compose_config
from deconvlab.sweep.leaderboard import pareto_front
from deconvlab.sweep.records import DriverLog
from deconvlab.sweep.report import load_report, write_report
from deconvlab.sweep.views import log_sweep_views


class SmallNet(nn.Module):
    """Conv, strided conv, transposed conv, a functional conv and a linear head: every counted kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1)
        self.kernel = nn.Parameter(torch.randn(2, 2, 5, 5))
        self.head = nn.Linear(2 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.conv2d(self.up(x), self.kernel, padding=2)
        return self.head(x.flatten(1))


def test_macs_match_a_hand_count_for_a_small_conv_net():
    # Per output element a convolution does (in_channels / groups) * kernel MACs; a transposed
    # convolution spreads every input element over (out_channels / groups) * kernel outputs.
    conv1 = 16 * 16 * 4 * (1 * 3 * 3)
    conv2 = 8 * 8 * 8 * (4 // 2 * 3 * 3)
    up = 8 * 8 * 8 * (2 * 4 * 4)
    functional = 16 * 16 * 2 * (2 * 5 * 5)
    head = 2 * 16 * 16 * 10
    net = SmallNet()
    measured = cost.model_cost(net, torch.rand(3, 1, 16, 16), repeats=2)
    assert measured.macs == conv1 + conv2 + up + functional + head
    # MACs per labelled output pixel: the linear head's output [1, 10] labels one item, not 16 x 16 pixels.
    assert measured.output_shape == (1, 10)
    assert measured.macs_per_pixel == conv1 + conv2 + up + functional + head
    assert measured.params == (4 * 9 + 4) + (8 * 2 * 9 + 8) + (8 * 2 * 16 + 2) + 2 * 2 * 25 + (512 * 10 + 10)
    assert measured.input_shape == (1, 1, 16, 16)  # a batch of one, whatever the example's batch was
    assert measured.latency_ms > 0


def test_latency_grows_with_the_work_done():
    small = nn.Conv2d(1, 1, 3, padding=1)
    big = nn.Sequential(*[nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
    fast = cost.measure_latency_ms(small, torch.rand(1, 1, 16, 16), repeats=3)
    slow = cost.measure_latency_ms(big, torch.rand(1, 32, 64, 64), repeats=3)  # ~8000x the MACs
    assert slow > 5 * fast


def test_pareto_front_keeps_exactly_the_undominated_trials():
    costs = [1.0, 2.0, 3.0, 2.0, 5.0, 4.0, math.nan]
    scores = [10.0, 12.0, 11.0, 12.0, 15.0, 15.0, 20.0]
    # (3, 11) is beaten by (2, 12); (5, 15) by (4, 15); the two (2, 12) tie and both stay; NaN never counts.
    assert pareto_front(costs, scores, "max") == [True, True, False, True, False, True, False]
    # Minimising (a loss): the cheapest is best at 10, (2, 12) and (4, 15) are worse and costlier.
    assert pareto_front(costs, scores, "min") == [True, False, False, False, False, False, False]


def _hand_macs_per_pixel(width: int, depth: int) -> int:
    # ResidualDeblurCNN: 3x3 convs 1 -> w, (depth - 2) x w -> w, w -> 1.
    return 9 * width + 9 * width * width * (depth - 2) + 9 * width


def _hand_params(width: int, depth: int) -> int:
    return (9 * width + width) + (depth - 2) * (9 * width * width + width) + (9 * width + 1)


def _png(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (12, 30), dtype=np.uint8)


TRIALS = {"t_00000": (4, 3, 5e-4, 24.1), "t_00001": (8, 3, 2e-3, 24.6), "t_00002": (6, 4, 1e-3, 24.4)}
SPACE = {"model.width": "choice([4, 6, 8],)", "model.depth": "randint(3, 5)",
         "optim.lr": "loguniform(0.0003, 0.005)"}


def _log_trial(client: MlflowClient, experiment_id: str, parent: str, trial: str) -> None:
    width, depth, lr, best = TRIALS[trial]
    tags = {"mlflow.parentRunId": parent, "deconvlab.trial_id": trial, "deconvlab.epochs": "2"}
    run = client.create_run(experiment_id, run_name=f"mini-{trial}", tags=tags).info.run_id
    cfg = compose_config(["experiment=quickstart", f"model.width={width}", f"model.depth={depth}",
                          f"optim.lr={lr}", "data.max_eval_size=32"])
    tracking.log_config(client, run, cfg)
    tracking.log_params(client, run, {"sampled.model.width": str(width), "sampled.model.depth": str(depth),
                                      "sampled.optim.lr": str(lr)})
    for epoch, value in ((1, best - 0.2), (2, best)):
        client.log_metric(run, "val/psnr", value, step=epoch)
    client.log_metric(run, "best/val/psnr", best)
    client.log_metric(run, "model/num_params", float(_hand_params(width, depth)))
    for epoch in (0, 1):
        tracking.log_images(client, run, {"triptych": _png(epoch)}, f"samples/epoch_{epoch:03d}")
    client.set_terminated(run, "FINISHED")


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    """A sweep's parent and three child runs laid out as the sweep driver logs them (no Ray), then the
    driver's end-of-sweep views. One store for the module: creating an MLflow SQLite store takes seconds.
    """
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DECONVLAB_ARTIFACT_ROOT", str(root / "mlartifacts"))
        client = MlflowClient(uri)
        tags = {"deconvlab.role": "parent", "deconvlab.sweep": "mini"}
        with tracking.tracked_run("sweep-mini", "mini-1", uri, tags) as (_, parent):
            tracking.log_params(client, parent, {"sweep.name": "mini", "sweep.metric": "val/psnr",
                                                 "sweep.mode": "max",
                                                 **{f"search_space.{k}": v for k, v in SPACE.items()}})
            experiment_id = client.get_run(parent).info.experiment_id
            for trial in TRIALS:
                _log_trial(client, experiment_id, parent, trial)
            table = log_sweep_views(client, parent)
        yield client, parent, table


def test_trial_costs_build_each_distinct_model_once(tracked_sweep, monkeypatch):
    """Trials that differ only in optimiser settings share one measurement (a sweep's end builds each model
    once, not once per trial); a different model is measured on its own."""
    client, parent, _ = tracked_sweep
    experiment_id = client.get_run(parent).info.experiment_id
    runs = []
    for width, lr in ((4, 1e-3), (4, 3e-3), (6, 1e-3)):
        run = client.create_run(experiment_id).info.run_id
        tracking.log_config(client, run, compose_config(["experiment=quickstart", f"model.width={width}",
                                                         "model.depth=3", f"optim.lr={lr}"]))
        runs.append(run)
    built = []
    real_build = cost.build_task
    monkeypatch.setattr(cost, "build_task", lambda cfg: built.append(cfg.model.width) or real_build(cfg))
    costs = cost.trial_costs(client, runs, log=False)
    assert sorted(built) == [4, 6]
    assert costs[runs[0]] == costs[runs[1]] and costs[runs[0]].params == _hand_params(4, 3)
    assert costs[runs[2]].params == _hand_params(6, 3)


def test_with_the_driver_log_the_views_read_no_config_or_curve_back(tracked_sweep, tmp_path, monkeypatch):
    client, parent, table = tracked_sweep
    logged = DriverLog()
    for run_id in table["mlflow_run"]:
        logged.add_run(run_id)
        logged.configs[run_id] = open(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read()
        for point in client.get_metric_history(run_id, "val/psnr"):
            logged.add_point(run_id, "val/psnr", point.step, point.value)

    def no_reading_back(*args, **kwargs):
        raise AssertionError("read back from the store what the driver logged")

    monkeypatch.setattr(MlflowClient, "get_metric_history", no_reading_back)
    monkeypatch.setattr(cost, "run_config", no_reading_back)
    runs = list(table["mlflow_run"])
    costs = cost.trial_costs(client, runs, log=False, configs=logged.configs)  # log=False: the module's store
    assert [costs[r].params for r in runs] == list(table["params"])  # stays as the other tests expect it
    report = load_report(client, client.get_run(parent), logged=logged)
    assert "curves.png" in report.plots and report.table["trial"].tolist() == table["trial"].tolist()


def test_sweep_views_log_costs_plots_and_best_samples(tracked_sweep):
    client, parent, table = tracked_sweep
    assert table["trial"].tolist() == ["t_00001", "t_00002", "t_00000"]  # ranked by best val/psnr
    for _, row in table.iterrows():
        width, depth, _, _ = TRIALS[row["trial"]]
        metrics = client.get_run(row["mlflow_run"]).data.metrics
        assert metrics["cost/macs_per_pixel"] == _hand_macs_per_pixel(width, depth) == row["MACs/px"]
        assert metrics["cost/params"] == _hand_params(width, depth) == row["params"]
        assert metrics["cost/latency_ms"] > 0 and row["latency ms"] == metrics["cost/latency_ms"]
        summary = client.download_artifacts(row["mlflow_run"], "model_summary.txt")
        assert f"parameters:     {_hand_params(width, depth):,}" in open(summary).read()
        assert "ResidualDeblurCNN" in open(summary).read()
    files = {a.path for a in client.list_artifacts(parent, "leaderboard")} | \
        {a.path for a in client.list_artifacts(parent)}
    assert {"leaderboard/parallel_coordinates.png", "leaderboard/pareto.png", "report.html"} <= files
    # One seed per config: one row per trial with n = 1 and no statistics over seeds; runs that logged no
    # training compute (from before it was logged) are left out of the compute plot, here all of them.
    assert table["n"].tolist() == [1, 1, 1] and "mean" not in table.columns and "config" not in table.columns
    assert not {"leaderboard/metric_vs_compute.png", "leaderboard/curves_by_config.png",
                "leaderboard/trials.csv"} & files
    best_samples = {a.path for a in client.list_artifacts(parent, "best_trial/samples/epoch_001")}
    assert best_samples == {"best_trial/samples/epoch_001/triptych.png"}


def test_report_is_one_self_contained_page(tracked_sweep, tmp_path, capsys):
    _, parent, table = tracked_sweep
    out = tmp_path / "site" / "report.html"
    assert main(["report", "mini", "-o", str(out)]) == 0  # by sweep name: its latest parent run
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    # Nothing fetched from anywhere: no scripts, stylesheets or remote sources.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 + 2  # curves, parallel coordinates, Pareto front; best trial's 2 epochs
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in images)
    assert len(re.findall(r"<img", page)) == len(images)
    # The leaderboard's rows, in rank order, with the hand-counted MACs per pixel.
    board = page[page.index('<table id="leaderboard">'):]
    board = board[:board.index("</table>")]
    assert [board.index(t) for t in ("t_00001", "t_00002", "t_00000")] == \
        sorted(board.index(t) for t in TRIALS)
    for width, depth, _, _ in TRIALS.values():
        assert f"<td>{_hand_macs_per_pixel(width, depth):.4g}</td>" in board
    # The best trial's resolved config, as YAML.
    assert "_target_: deconvlab.models.simple.ResidualDeblurCNN" in page and "width: 8\n" in page
    # The same sweep by its parent run id, or by any of its trials' run ids.
    assert write_report(parent, tmp_path / "again.html").read_text().count("<img") == len(images)
    trial = table.iloc[-1]["mlflow_run"]
    assert f"<td>parent run</td><td>{parent}</td>" in write_report(trial, tmp_path / "trial.html").read_text()


def test_report_of_an_unknown_sweep_is_a_user_error(tracked_sweep, tmp_path, capsys):
    assert main(["report", "nope", "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'nope'" in err and "mini" in err  # names the sweeps there are
    assert main(["report", "0" * 32, "-o", str(tmp_path / "r.html")]) == 2
    assert f"no run {'0' * 32}" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_smoke_sweep_logs_costs_and_its_report_is_self_contained(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    outcome = run_smoke_sweep("quickstart", tmp_path / "ray")
    client = MlflowClient(uri)
    for run_id in outcome.leaderboard["mlflow_run"]:
        run = client.get_run(run_id)
        width, depth = int(run.data.params["model.width"]), int(run.data.params["model.depth"])
        assert run.data.metrics["cost/macs_per_pixel"] == _hand_macs_per_pixel(width, depth)
    with open(client.download_artifacts(outcome.parent_run_id, "leaderboard/leaderboard.csv", str(tmp_path))) as f:
        header = f.readline()
    assert "MACs/px" in header and "latency ms" in header
    out = tmp_path / "report.html"
    assert main(["report", "quickstart", "-o", str(out)]) == 0
    page = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I) and "<script" not in page
    board = page[page.index('<table id="leaderboard">'):]
    board = board[:board.index("</table>")]
    assert board.count("<tr") == 1 + len(outcome.leaderboard)
    assert all(trial in board for trial in outcome.leaderboard["trial"])
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) > 3  # three plots and the best trial's samples
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)


def test_leaderboard_cells_format_numbers_but_keep_ids_that_python_would_parse_as_floats():
    from deconvlab.sweep.report import _cell

    assert _cell("0.000123456") == "0.0001235" and _cell("7") == "7" and _cell(2.5) == "2.5"
    assert _cell("1e-3") == "0.001" and _cell(float("nan")) == ""
    # float("12e45_00001") is 12e4500001 = inf: a Ray trial id must stay as written.
    assert _cell("12e45_00001") == "12e45_00001" and _cell("<b>") == "&lt;b&gt;"
