"""Sweeps with ``repeats: N``: seeds per config, statistics over seeds, grouped views and promotion.

The statistics are checked against scipy and hand-made groups; the views against a sweep logged by hand
(no Ray); and one tiny sweep of 2 configs x 2 seeds runs end to end through ``deconvlab sweep``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import textwrap

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from conftest import start_local_ray, use_store_under
from deconvlab import tracking
from deconvlab.cli import main
from deconvlab.config import compose_config
from deconvlab.sweep.leaderboard import build_leaderboard, seed_stats, tied_with_best, worse_than_best
from deconvlab.sweep.plots import best_so_far_vs_compute
from deconvlab.sweep.repeats import SeedRepeater, config_id, param_space, search_settings
from deconvlab.sweep.report import write_report
from deconvlab.sweep.spec import load_sweep
from deconvlab.sweep.views import log_sweep_views

STATS = ["n", "mean", "std", "ci_low", "ci_high", "tied_with_best"]


# -- statistics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_ci_is_the_student_t_interval_of_the_mean(n):
    values = np.random.default_rng(n).normal(24.0, 0.3, n)
    s = seed_stats(values)
    low, high = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert s.n == n and s.mean == pytest.approx(values.mean()) and s.std == pytest.approx(values.std(ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_one_seed_has_no_spread_and_missing_values_do_not_count():
    one = seed_stats([24.0])
    assert (one.n, one.mean) == (1, 24.0) and all(math.isnan(v) for v in (one.std, one.ci_low, one.ci_high))
    # A seed that never validated (NaN) is left out of n, the mean and the interval.
    assert seed_stats([1.0, float("nan"), 3.0]) == seed_stats([1.0, 3.0])
    assert seed_stats([]).n == 0 and math.isnan(seed_stats([float("nan")]).mean)


def test_welch_one_sided_test_at_5_percent_tells_configs_apart():
    # Equal variances (1) and n = 3 on both sides: t = difference / sqrt(2/3), 4 degrees of freedom.
    # t(0.95, 4) = 2.132 one-sided, t(0.975, 4) = 2.776 two-sided.
    best = [1.0, 2.0, 3.0]
    assert not worse_than_best(best, [0.0, 1.0, 2.0], "max")  # t = 1.22: not distinguishable
    assert worse_than_best(best, [-1.0, 0.0, 1.0], "max")  # t = 2.45: one-sided only
    assert worse_than_best(best, [-2.0, -1.0, 0.0], "max")  # t = 3.67
    # The direction follows the mode: lower is better for "min".
    assert worse_than_best([-1.0, 0.0, 1.0], best, "min") and not worse_than_best(best, [-1.0, 0.0, 1.0], "min")
    # A config better than the "best" is not worse than it (one-sided), whatever the difference.
    assert not worse_than_best(best, [9.0, 10.0, 11.0], "max")


def test_tied_with_best_on_hand_made_groups():
    best, close, far = [10.0, 10.2, 10.1], [10.05, 10.15, 9.95], [5.0, 5.1, 4.9]
    assert tied_with_best([close, best, far], "max") == [True, True, False]
    # Lower is better: the same groups, negated, tie the same way.
    assert tied_with_best([[-v for v in g] for g in (close, best, far)], "min") == [True, True, False]
    # One seed cannot be told apart from anything; no value at all is never tied.
    assert tied_with_best([best, [5.0], [float("nan")], []], "max") == [True, True, False, False]
    # Deterministic trials (no spread): any difference counts, an equal mean ties.
    assert tied_with_best([[2.0, 2.0], [1.0, 1.0], [2.0, 2.0]], "max") == [True, False, True]


def _trials(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """A trial table as build_trials makes it: (trial, config, seed, best value) per row, ranked."""
    table = pd.DataFrame([{"trial": t, "config": c, "status": "finished", "epochs": 2, "best val/psnr": v,
                           "params": 10, "model.width": c, "seed": str(s), "mlflow_run": f"run-{t}"}
                          for t, c, s, v in rows])
    table = table.sort_values("best val/psnr", ascending=False)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def test_leaderboard_groups_the_seeds_of_a_config():
    trials = _trials([("t0", "a", 0, 24.0), ("t1", "a", 1, 24.2), ("t2", "b", 0, 24.6), ("t3", "b", 1, 24.8),
                      ("t4", "c", 0, 24.9), ("t5", "c", 1, float("nan"))])
    table = build_leaderboard(trials, "val/psnr", "max", repeats=2)
    assert table["config"].tolist() == ["c", "b", "a"]  # by mean: c's one value, then b, then a
    assert list(table.columns[:11]) == ["rank", "config", *STATS, "seeds", "trial", "best val/psnr"]
    b = table.set_index("config").loc["b"]
    assert (b["n"], b["mean"], b["seeds"], b["trial"], b["mlflow_run"]) == (2, pytest.approx(24.7), "0 1", "t3",
                                                                           "run-t3")
    assert (b["ci_low"], b["ci_high"]) == tuple(pytest.approx(v) for v in stats.t.interval(
        0.95, 1, loc=24.7, scale=stats.sem([24.6, 24.8])))
    c = table.set_index("config").loc["c"]
    assert c["n"] == 1 and math.isnan(c["ci_low"]) and math.isnan(c["std"])
    # The best mean is c's single seed: nothing can be told apart from one value, so every config ties.
    assert table["tied_with_best"].tolist() == [True, True, True]
    assert "seed" not in table.columns
    # One seed per config: the trial rows as they were, plus n.
    single = build_leaderboard(trials.drop(columns=["seed"]), "val/psnr", "max", repeats=1)
    assert single.columns.tolist() == ["rank", "trial", "status", "epochs", "best val/psnr", "n", "params",
                                       "model.width", "mlflow_run"]
    assert single["n"].tolist() == [1, 1, 1, 1, 1, 0]


def test_best_so_far_pairs_metric_and_compute_by_epoch():
    metric = [(1, 20.0), (2, 22.0), (3, 21.0), (4, 23.0)]
    compute = [(1, 1e6), (2, 2e6), (3, 3e6)]  # epoch 4 logged no compute: left out
    assert best_so_far_vs_compute(metric, compute, "max") == [(1e6, 20.0), (2e6, 22.0), (3e6, 22.0)]
    assert best_so_far_vs_compute(metric, compute, "min") == [(1e6, 20.0), (2e6, 20.0), (3e6, 20.0)]
    assert best_so_far_vs_compute(metric, [], "max") == []


# -- how repeats reach Ray Tune ----------------------------------------------------------------------------
def _spec(tmp_path, search: str, repeats: int = 2):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        experiment: quickstart
        metric: val/psnr
        mode: max
        search_space:
          optim.lr: loguniform(1e-4, 1e-2)
        search: {{type: {search}}}
        num_samples: 3
        repeats: {repeats}
        max_concurrent_trials: 2
    """))
    return load_sweep(str(path))


def test_optuna_sees_each_config_once_with_the_mean_over_its_seeds(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    spec = _spec(tmp_path, "optuna")
    optuna = OptunaSearch(metric="val/psnr", mode="max")
    settings = search_settings(spec, optuna, base_seed=7)
    repeater = settings["search_alg"]
    assert isinstance(repeater, SeedRepeater) and settings["num_samples"] == 6  # 3 configs x 2 seeds
    assert repeater.set_search_properties("val/psnr", "max", param_space(spec, 7))
    configs = [repeater.suggest(f"t{i}") for i in range(4)]
    assert [c["seed"] for c in configs] == [7, 8, 7, 8] and not any("__trial_index__" in c for c in configs)
    assert configs[0]["optim.lr"] == configs[1]["optim.lr"] != configs[2]["optim.lr"]
    assert config_id(configs[0]) == config_id(configs[1]) != config_id(configs[2])
    repeater.on_trial_complete("t0", {"val/psnr": 20.0})
    assert not optuna._ot_study.trials[0].state.is_finished()  # waits for the config's other seed
    repeater.on_trial_complete("t1", {"val/psnr": 22.0})
    assert optuna._ot_study.trials[0].value == 21.0


def test_random_search_repeats_a_config_by_a_seed_grid(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    spec = _spec(tmp_path, "random")
    space = param_space(spec, base_seed=3)
    assert space["seed"] == {"grid_search": [3, 4]}
    settings = search_settings(spec, None, base_seed=3)
    generator = settings["search_alg"]
    assert isinstance(generator, BasicVariantGenerator) and settings["num_samples"] == 3
    assert settings["max_concurrent_trials"] is None and generator.max_concurrent == 2
    # One seed: nothing changes (Tune builds its own generator).
    plain = _spec(tmp_path, "random", repeats=1)
    assert "seed" not in param_space(plain, 3)
    assert search_settings(plain, None, 3) == {"search_alg": None, "num_samples": 3, "max_concurrent_trials": 2}


# -- the views of a sweep logged by hand (no Ray) -----------------------------------------------------------
# (config, width, seed, best val/psnr, logs compute): b beats a by t = 4.24 (Welch, 2 dof, one-sided p = 0.026).
TRIALS = {"t_0": ("a", 4, 0, 24.0, True), "t_1": ("a", 4, 1, 24.2, True),
          "t_2": ("b", 8, 0, 24.6, True), "t_3": ("b", 8, 1, 24.8, False)}


def _log_trial(client: MlflowClient, experiment_id: str, parent: str, trial: str) -> None:
    config, width, seed, best, compute = TRIALS[trial]
    tags = {"mlflow.parentRunId": parent, "deconvlab.trial_id": trial, "deconvlab.epochs": "2",
            "deconvlab.config_id": config, "deconvlab.seed": str(seed), "deconvlab.repeat": str(seed)}
    run = client.create_run(experiment_id, run_name=f"rep-{trial}-seed{seed}", tags=tags).info.run_id
    tracking.log_config(client, run, compose_config(["experiment=quickstart", f"model.width={width}",
                                                     "model.depth=3", f"seed={seed}", "data.max_eval_size=32"]))
    tracking.log_params(client, run, {"sampled.model.width": str(width), "sampled.seed": str(seed)})
    for epoch, value in ((1, best - 0.5), (2, best)):
        client.log_metric(run, "val/psnr", value, step=epoch)
        if compute:  # t_3 is a run from before trials logged their compute: left out of that plot
            client.log_metric(run, "compute/train_macs", 1e6 * width * epoch, step=epoch)
    client.log_metric(run, "best/val/psnr", best)
    client.set_terminated(run, "FINISHED")


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("repeats")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store_under(mp, root)
        client = MlflowClient(uri)
        tags = {"deconvlab.role": "parent", "deconvlab.sweep": "rep"}
        with tracking.tracked_run("sweep-rep", "rep-1", uri, tags) as (_, parent):
            tracking.log_params(client, parent, {"sweep.name": "rep", "sweep.metric": "val/psnr", "sweep.mode": "max",
                                                 "sweep.repeats": "2", "search_space.model.width": "grid(([4, 8],))"})
            experiment_id = client.get_run(parent).info.experiment_id
            for trial in TRIALS:
                _log_trial(client, experiment_id, parent, trial)
            table = log_sweep_views(client, parent)
        yield client, parent, table, root


def test_views_of_a_repeats_sweep_group_by_config(logged_sweep, tmp_path):
    client, parent, table, _ = logged_sweep
    assert table["config"].tolist() == ["b", "a"] and table["tied_with_best"].tolist() == [True, False]
    assert table["n"].tolist() == [2, 2] and table["trial"].tolist() == ["t_3", "t_1"]  # each config's best seed
    files = {a.path for a in client.list_artifacts(parent, "leaderboard")}
    assert {f"leaderboard/{f}" for f in ("leaderboard.csv", "trials.csv", "curves_by_config.png",
                                         "metric_vs_compute.png", "curves.png")} <= files
    csv = pd.read_csv(client.download_artifacts(parent, "leaderboard/leaderboard.csv", str(tmp_path)))
    assert set(STATS) <= set(csv.columns) and len(csv) == 2
    assert len(pd.read_csv(client.download_artifacts(parent, "leaderboard/trials.csv", str(tmp_path)))) == 4
    # Every trial's run carries its config's statistics (what promote reads; sortable in the MLflow UI).
    for trial, (config, *_) in TRIALS.items():
        run = client.search_runs([client.get_run(parent).info.experiment_id],
                                 f"tags.`deconvlab.trial_id` = '{trial}'")[0]
        row = table.set_index("config").loc[config]
        assert run.data.metrics["config/mean/val/psnr"] == pytest.approx(row["mean"])
        assert run.data.metrics["config/ci_low/val/psnr"] == pytest.approx(row["ci_low"])
        assert run.data.metrics["config/n/val/psnr"] == 2
        assert run.data.metrics["config/tied_with_best/val/psnr"] == float(config == "b")


def test_report_of_a_repeats_sweep_shows_stats_trials_and_the_new_plots(logged_sweep, tmp_path):
    _, parent, _, _ = logged_sweep
    page = write_report(parent, tmp_path / "report.html").read_text()
    board = page[page.index('<table id="leaderboard">'):]
    board = board[:board.index("</table>")]
    assert all(f"<th>{c}</th>" in board for c in STATS) and board.count("<tr") == 3
    assert '<tr class="best">' in board and "Welch" in page and '<table id="trials">' in page
    assert "per epoch by config" in page and "best-so-far val/psnr vs training compute" in page
    images = re.findall(r'src="data:image/png;base64,', page)
    assert len(images) == 5  # curves, curves by config, metric vs compute, parallel coordinates, Pareto


# -- end to end: deconvlab sweep with repeats: 2, then promote -----------------------------------------------
TINY_SWEEP = """
    experiment: quickstart
    overrides: [trainer.max_epochs=2, trainer.limit_train_batches=2, trainer.limit_val_batches=1,
                data.batch_size=4, data.patch_size=24, data.samples_per_epoch=16, data.max_eval_size=16,
                trainer.enable_progress_bar=false]
    metric: val/psnr
    mode: max
    search_space:
      model.width: grid([4, 8])
    search: {type: grid}
    num_samples: 1
    repeats: 2
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}
"""


@pytest.fixture(scope="module")
def repeats_sweep(tmp_path_factory):
    """``deconvlab sweep tiny.yaml seed=7``: 2 configs x 2 seeds (7 and 8), through the command line."""
    import ray

    root = tmp_path_factory.mktemp("repeats_sweep")
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_SWEEP))
    start_local_ray()
    try:
        with pytest.MonkeyPatch.context() as mp:
            uri = use_store_under(mp, root)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(["sweep", str(path), "seed=7", "--storage", str(root / "ray")])
            yield code, out.getvalue(), MlflowClient(uri), uri, root
    finally:
        ray.shutdown()


def test_a_repeats_sweep_ends_with_a_leaderboard_grouped_by_config(repeats_sweep):
    code, out, client, _, root = repeats_sweep
    assert code == 0, out
    parent = client.search_runs([client.get_experiment_by_name("sweep-tiny").experiment_id],
                                "tags.`deconvlab.role` = 'parent'")[0]
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.repeats"] == "2"
    assert "leaderboard of sweep tiny" in out and "Welch's t-test" in out
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "leaderboard/leaderboard.csv", str(root)))
    assert set(STATS) <= set(csv.columns) and len(csv) == 2
    assert sorted(csv["model.width"]) == [4, 8] and csv["n"].tolist() == [2, 2]
    assert csv["seeds"].tolist() == ["7 8", "7 8"]  # the base seed from the command line, then +1
    assert (csv["ci_low"] < csv["mean"]).all() and (csv["mean"] < csv["ci_high"]).all()
    assert csv["tied_with_best"].iloc[0] and csv["tied_with_best"].dtype == bool
    assert parent.data.tags["deconvlab.best_run_id"] == csv["mlflow_run"].iloc[0]
    # Each trial: its seed in its config, params, tags and name; the two seeds of a config share its id.
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    by_config: dict[str, list[str]] = {}
    for child in children:
        seed = child.data.tags["deconvlab.seed"]
        assert child.data.params["seed"] == child.data.params["sampled.seed"] == seed
        assert child.data.tags["deconvlab.repeat"] == str(int(seed) - 7)
        assert child.info.run_name.endswith(f"-seed{seed}")
        by_config.setdefault(child.data.tags["deconvlab.config_id"], []).append(seed)
    assert sorted(map(sorted, by_config.values())) == [["7", "8"], ["7", "8"]]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "leaderboard")}
    assert {"leaderboard/curves_by_config.png", "leaderboard/trials.csv"} <= files


def test_promote_registers_the_best_seed_of_the_config_with_the_best_mean(repeats_sweep, capsys):
    _, _, client, uri, root = repeats_sweep
    parent = client.search_runs([client.get_experiment_by_name("sweep-tiny").experiment_id],
                                "tags.`deconvlab.role` = 'parent'")[0]
    assert main(["promote", "tiny", "--name", "tiny-repeats", "--tracking-uri", uri]) == 0
    said = capsys.readouterr().out
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "leaderboard/leaderboard.csv", str(root)))
    best = csv.iloc[0]
    version = client.get_model_version("tiny-repeats", "1")
    assert version.run_id == best["mlflow_run"] == parent.data.tags["deconvlab.best_run_id"]
    tags = version.tags
    assert float(tags["deconvlab.metric_mean"]) == pytest.approx(best["mean"])
    assert float(tags["deconvlab.metric_ci_low"]) == pytest.approx(best["ci_low"])
    assert float(tags["deconvlab.metric_ci_high"]) == pytest.approx(best["ci_high"])
    assert tags["deconvlab.metric_n"] == "2" and tags["deconvlab.config_id"] == best["config"]
    seed = client.get_run(best["mlflow_run"]).data.tags["deconvlab.seed"]
    assert tags["deconvlab.seed"] == seed
    assert f"picked config {best['config']}: mean val/psnr" in said and "n = 2 seeds" in said
    assert f"registers seed {seed}'s checkpoint" in said and "the best of the config's seeds" in said
