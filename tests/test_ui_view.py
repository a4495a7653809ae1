"""The MLflow UI link of a sweep (deconvlab.sweep.ui_view): the view it writes as an experiment tag, its URLs,
and that the installed MLflow UI bundle still reads every field of it (tests/test_browser.py opens it)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.tracking import MlflowClient

from deconvlab.errors import UserError
from deconvlab.sweep.records import TRIAL_TAG
from deconvlab.sweep.ui_view import (
    CHART_MODE_PARAM,
    SHARE_KEY_PARAM,
    SHARED_VIEW_TAG,
    WORKFLOW_PARAM,
    SweepLinks,
    SweepView,
    describe_links,
    experiments_url,
    local_ui_url,
    publish_sweep_view,
    sweep_links,
    ui_url_for,
    view_state,
)

UI = "http://127.0.0.1:5000"
BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


def fake_sweep(client: MlflowClient, mode: str = "max", trials: int = 3, name: str = "demo") -> str:
    """A sweep as the driver records it: the parent's sweep params, trials with sampled params, the metric per
    epoch, best/<metric> and the cost metrics. Returns the parent run id."""
    experiment = client.get_experiment_by_name(f"sweep-{name}")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"sweep-{name}")
    parent = client.create_run(experiment_id, run_name=f"{name}-20250101-120000",
                               tags={"deconvlab.role": "parent", "deconvlab.sweep": name}).info.run_id
    client.log_batch(parent, params=[Param("sweep.metric", "val/psnr"), Param("sweep.mode", mode),
                                     Param("search_space.optim.lr", "loguniform(0.0007, 0.003)"),
                                     Param("search_space.model.depth", "randint(5, 9)")])
    now = int(time.time() * 1000)
    for i in range(trials):
        run = client.create_run(experiment_id, run_name=f"trial_{i}",
                                tags={"mlflow.parentRunId": parent, TRIAL_TAG: f"t{i}"}).info.run_id
        curve = [Metric("val/psnr", 20.0 + i + epoch, now, epoch) for epoch in range(1, 4)]
        client.log_batch(run, metrics=[*curve, Metric("best/val/psnr", 23.0 + i, now, 0),
                                       Metric("cost/macs_per_pixel", 100.0 * (i + 1), now, 0),
                                       Metric("model/num_params", 1000.0, now, 0)],
                         params=[Param("sampled.optim.lr", lr := str(0.001 * (i + 1))), Param("optim.lr", lr),
                                 Param("sampled.model.depth", str(5 + i)), Param("model.depth", str(5 + i))])
        client.set_terminated(run)
    client.set_terminated(parent)
    return parent


def shared_views(client: MlflowClient, experiment_id: str) -> dict[str, dict]:
    """The experiment's shared views: key -> the saved-view envelope, its state parsed."""
    tags = client.get_experiment(experiment_id).tags
    views = {k.removeprefix(SHARED_VIEW_TAG): json.loads(v) for k, v in tags.items() if k.startswith(SHARED_VIEW_TAG)}
    return {k: {**v, "state": json.loads(v["state"])} for k, v in views.items()}


def test_a_sweeps_view_shows_its_trials_best_first_with_the_sampled_values_the_cost_and_the_charts(tracking_uri):
    client = MlflowClient(tracking_uri)
    parent = fake_sweep(client)
    experiment_id = client.get_run(parent).info.experiment_id
    links = publish_sweep_view(client, parent, UI)

    query = parse_qs(urlsplit(links.table).fragment.split("?", 1)[1])
    assert links.table.startswith(f"{UI}/#/experiments/{experiment_id}/runs?")
    assert query[WORKFLOW_PARAM[0]] == [WORKFLOW_PARAM[1]] and CHART_MODE_PARAM[0] not in query
    assert parse_qs(urlsplit(links.charts).fragment.split("?", 1)[1])[CHART_MODE_PARAM[0]] == [CHART_MODE_PARAM[1]]
    (key, view), = shared_views(client, experiment_id).items()
    assert query[SHARE_KEY_PARAM] == [key] and view["name"] == "demo-20250101-120000"
    assert isinstance(view["createdAt"], int)

    state = view["state"]
    # Only this sweep's trials (their own rows: the UI drops runsExpanded from a shared view), best first.
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    assert state["orderByKey"] == "metrics.`best/val/psnr`" and state["orderByAsc"] is False
    assert state["selectedColumns"] == ["metrics.`best/val/psnr`", "params.`sampled.model.depth`",
                                        "params.`sampled.optim.lr`", "metrics.`val/psnr`",
                                        "metrics.`cost/macs_per_pixel`", "metrics.`model/num_params`"]
    assert state["columnOrder"][:4] == ["attributes.`Run Name`", *state["selectedColumns"][:3]]
    line, parallel = state["compareRunCharts"]
    assert (line["type"], line["metricKey"], line["xAxisKey"]) == ("LINE", "val/psnr", "step")
    assert parallel["type"] == "PARALLEL" and parallel["selectedMetrics"] == ["best/val/psnr"]
    assert parallel["selectedParams"] == ["sampled.model.depth", "sampled.optim.lr"]
    section, = state["compareRunSections"]
    assert line["metricSectionId"] == parallel["metricSectionId"] == section["uuid"]
    assert state["runsHiddenMode"] == "SHOW_ALL"


def test_a_min_sweep_sorts_ascending_and_publishing_again_rewrites_the_same_view(tracking_uri):
    client = MlflowClient(tracking_uri)
    first = fake_sweep(client, mode="min")
    second = fake_sweep(client, mode="min")
    experiment_id = client.get_run(first).info.experiment_id
    for parent in (first, second, first):
        publish_sweep_view(client, parent, UI)
    views = shared_views(client, experiment_id)
    assert len(views) == 2  # one per sweep run, not one per call
    assert all(v["state"]["orderByAsc"] is True for v in views.values())
    assert {v["state"]["searchFilter"].split("'")[1] for v in views.values()} == {first, second}


def test_trials_without_best_or_sampled_values_fall_back_to_the_metric_and_the_config_params(tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("sweep-old")
    parent = client.create_run(experiment_id, tags={"deconvlab.role": "parent"}).info.run_id
    client.log_batch(parent, params=[Param("sweep.metric", "val/loss"), Param("sweep.mode", "min"),
                                     Param("search_space.optim.lr", "choice([0.1, 0.01])")])
    trial = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_batch(trial, metrics=[Metric("val/loss", 0.5, 0, 1)], params=[Param("optim.lr", "0.1")])
    publish_sweep_view(client, parent, UI)
    (_, view), = shared_views(client, experiment_id).items()
    assert view["state"]["orderByKey"] == "metrics.`val/loss`"
    assert view["state"]["selectedColumns"] == ["metrics.`val/loss`", "params.`optim.lr`"]


def test_sweep_links_take_a_sweep_name_or_a_trials_run_id_and_refuse_anything_else(tracking_uri):
    client = MlflowClient(tracking_uri)
    parent = fake_sweep(client)
    trial = client.search_runs([client.get_run(parent).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{parent}'")[0].info.run_id
    assert sweep_links("demo", tracking_uri, UI) == sweep_links(trial, tracking_uri, UI)
    assert f"viewStateShareKey=deconvlab-{parent}" in sweep_links("demo", tracking_uri, UI).table
    with pytest.raises(UserError, match="no sweep 'nope'"):
        sweep_links("nope", tracking_uri, UI)


def test_a_refused_tag_still_gives_the_model_training_page(tracking_uri, monkeypatch):
    client = MlflowClient(tracking_uri)
    parent = fake_sweep(client)

    def refuse(*args, **kwargs):
        raise MlflowException("Permission denied for endpoint /api/2.0/mlflow/experiments/set-experiment-tag",
                              error_code=PERMISSION_DENIED)

    monkeypatch.setattr(client, "set_experiment_tag", refuse)
    links = publish_sweep_view(client, parent, UI)
    assert "workflowType=machine_learning" in links.table and SHARE_KEY_PARAM not in links.table


def test_ui_urls_and_the_printed_lines():
    assert ui_url_for("sqlite:///mlflow.db") == "http://127.0.0.1:5000"
    assert ui_url_for("https://mlflow.team.example/") == "https://mlflow.team.example"
    assert local_ui_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert local_ui_url("::1", 5000) == "http://[::1]:5000"
    assert experiments_url(UI) == f"{UI}/#/experiments?workflowType=machine_learning"
    lines = describe_links(SweepLinks("T", "C"), "deconvlab ui")
    assert lines[0].endswith("run deconvlab ui, then open") and lines[1].strip() == "T" and lines[2].endswith(" C")
    assert describe_links(SweepLinks("T", "C"))[0].endswith(": open")


# -- the installed UI reads what the view writes -------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> str:
    files = sorted(BUNDLE.glob("*.js"))
    if not files:
        pytest.fail(f"no MLflow UI bundle under {BUNDLE}")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def string_arrays_with(text: str, word: str) -> list[list[str]]:
    """Every array literal of plain strings in the minified bundle that holds ``word``."""
    return [json.loads(m[0]) for m in re.finditer(r'\[(?:"[A-Za-z]+",)*"[A-Za-z]+"\]', text) if f'"{word}"' in m[0]]


def test_the_installed_ui_reads_every_field_the_view_writes(bundle):
    # The shared view: the tag prefix, the URL parameter, and the saved-view envelope's fields.
    assert f'"{SHARED_VIEW_TAG}"' in bundle and f'"{SHARE_KEY_PARAM}"' in bundle
    assert re.search(r'typeof \w+\.name\W.{0,60}typeof \w+\.createdAt\W.{0,60}typeof \w+\.state\W', bundle)
    # The fields the shared-view reader picks: the search facets and the UI state (less those it omits).
    facets = next(a for a in string_arrays_with(bundle, "orderByKey") if "searchFilter" in a)
    ui_fields = next(a for a in string_arrays_with(bundle, "selectedColumns") if "compareRunCharts" in a)
    omitted = {w for a in string_arrays_with(bundle, "runsExpanded") if "selectedColumns" not in a for w in a}
    written = set(view_state(fake_view()))
    assert written <= set(facets) | set(ui_fields), written - set(facets) - set(ui_fields)
    assert not written & omitted, written & omitted
    # The values: the page's modes, chart types, run visibility, and the ids of the columns every run has.
    for literal in ("workflowType", "machine_learning", "compareRunsMode", "CHART", "LINE", "PARALLEL", "SHOW_ALL",
                    "Run Name", "runDateAndNestInfo", "duration"):
        assert f'"{literal}"' in bundle, literal
    # Column ids are "<kind>.`<key>`" (the UI's makeCanonicalSortKey).
    assert re.search(r'\((\w),(\w)\)=>\1\+"\.`"\+\2\+"`"', bundle)
    # The chart and section fields the view sets are fields the UI's chart code uses.
    state = view_state(fake_view())
    chart_fields = {k for chart in state["compareRunCharts"] for k in chart} | set(state["compareRunSections"][0])
    missing = [f for f in chart_fields if not re.search(rf'[.{{,]{f}[:=,}})]', bundle)]
    assert not missing, missing


def fake_view() -> SweepView:
    return SweepView("p" * 32, "1", "demo", "val/psnr", "max", "best/val/psnr", ("sampled.optim.lr",),
                     ("cost/latency_ms",), 2)


def test_ui_with_an_unknown_sweep_is_one_line_and_starts_nothing(capsys, tracking_uri):
    from deconvlab.cli import main

    assert main(["ui", "no_such_sweep_anywhere"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "MLflow UI on" not in captured.out
