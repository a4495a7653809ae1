"""``deconvlab runs`` and ``models``: one table per experiment with its ranking metric first and the other
metrics sorted, the same on every call; it fits the terminal (``--wide`` shows every column); ``--json``;
ids shortened only as far as they stay unique; ``--experiment`` takes a sweep's name as it was run; and the
direct SQLite reader gives the same rows as MLflow's client.
"""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.cli import main
from deconvlab.errors import UserError
from deconvlab.runs import MlflowReader, SqliteReader, list_versions, open_reader, sqlite_file
from test_run_ids import make_run  # noqa: F401 - the fixture

QS_METRICS = {"best/val/psnr": 24.5, "best/val/aaa": 1.0, "val/psnr": 24.4, "val/ssim": 0.77, "val/loss": 0.03,
              "val/psnr_input": 23.6, "val/psnr_pooled": 24.1, "train/loss": 0.5, "cost/params": 1e4}


@pytest.fixture
def store(make_run, tracking_uri) -> str:  # noqa: F811
    """A restoration experiment, a segmentation one and a sweep; two ids share their first 9 characters."""
    monitor = {"task.monitor": "val/psnr", "task.monitor_mode": "max"}
    make_run("0bd148dc1" + "0" * 23, "quickstart", "quickstart", params=monitor, metrics=QS_METRICS)
    make_run("0bd148dc2" + "1" * 23, "quickstart", "quickstart-longer-name-than-fits-a-column", params=monitor,
             metrics={k: v + 1 for k, v in QS_METRICS.items()})
    make_run("a3920881" + "2" * 24, "fcn32s_shapes", "fcn32s_shapes",
             params={"task.monitor": "val/miou", "task.monitor_mode": "max"},
             metrics={"best/val/miou": 0.21, "val/miou": 0.2, "val/pixel_acc": 0.86, "val/class_acc": 0.25})
    parent = make_run("270a9500" + "3" * 24, "sweep-deblur", "deblur", tags={"deconvlab.role": "parent"},
                      params={"sweep.metric": "val/ssim", "sweep.mode": "max"}, metrics={"best/val/ssim": 0.8})
    make_run("77e1f38a" + "4" * 24, "sweep-deblur", "deblur-00000", tags={"mlflow.parentRunId": parent},
             params=monitor, metrics={"best/val/ssim": 0.8, "best/val/psnr": 25.0, "val/psnr": 25.0})
    return tracking_uri


def _table(capsys, *args: str, columns: int = 100, monkeypatch=None) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["runs", *args]) == 0
    return capsys.readouterr().out


def _headers(out: str) -> dict[str, list[str]]:
    """Each experiment's header row, by experiment (the line after its title)."""
    lines = out.splitlines()
    return {line.split(":")[0]: lines[i + 1].split() for i, line in enumerate(lines) if "ranked by" in line}


def test_ranking_metric_first_then_sorted_and_the_same_on_every_call(store, capsys, monkeypatch):
    outs = [_table(capsys, "--wide", monkeypatch=monkeypatch) for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    headers = _headers(outs[0])
    assert headers["quickstart"] == ["run", "name", "status", "started", "best/val/psnr", "best/val/aaa",
                                     "val/loss", "val/psnr", "val/psnr_input", "val/psnr_pooled", "val/ssim"]
    assert headers["fcn32s_shapes"][4:] == ["best/val/miou", "val/class_acc", "val/miou", "val/pixel_acc"]
    assert headers["sweep-deblur"][4] == "best/val/ssim"  # a sweep ranks by its own metric
    assert "train/loss" not in outs[0] and "cost/params" not in outs[0]
    # newest experiment first; each experiment's metric columns only
    assert list(headers) == ["sweep-deblur", "fcn32s_shapes", "quickstart"]


def test_the_table_fits_100_columns_and_wide_shows_every_column(store, capsys, monkeypatch):
    narrow = _table(capsys, monkeypatch=monkeypatch)
    assert max(len(line) for line in narrow.splitlines()) <= 100
    assert _headers(narrow)["quickstart"][4] == "best/val/psnr"  # the ranking metric survives the cut
    assert "val/ssim" not in _headers(narrow)["quickstart"] and "--wide" in narrow
    assert "quickstart-longer-name-th…" not in narrow and "…" in narrow  # a long name is cut, not wrapped
    wide = _table(capsys, "--wide", monkeypatch=monkeypatch)
    assert max(len(line) for line in wide.splitlines()) > 100
    assert "quickstart-longer-name-than-fits-a-column" in wide


def test_ids_are_the_shortest_unique_prefix_of_at_least_8(store, capsys, monkeypatch):
    out = _table(capsys, monkeypatch=monkeypatch)
    assert re.search(r"^0bd148dc1 ", out, re.M) and re.search(r"^0bd148dc2 ", out, re.M)
    assert re.search(r"^a39208812 ", out, re.M)  # one width for the column


def test_json_rows_carry_full_ids_experiment_and_every_metric(store, capsys):
    assert main(["runs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["experiment"] for r in rows] == ["sweep-deblur"] * 2 + ["fcn32s_shapes"] + ["quickstart"] * 2
    first = rows[-1]
    assert first["run_id"] == "0bd148dc1" + "0" * 23 and first["short_id"] == "0bd148dc1"
    assert first["metrics"]["cost/params"] == 1e4 and first["ranking_metric"] == "best/val/psnr"
    trial, parent = rows[0], rows[1]  # newest first: the trial started after its parent
    assert trial["parent_run_id"] == parent["run_id"] and parent["role"] == "parent"


def test_experiment_by_sweep_name_or_file_and_did_you_mean(store, capsys, monkeypatch):
    for name in ("deblur", "sweeps/deblur.yaml", "sweep-deblur", "DEBLUR"):
        assert list(_headers(_table(capsys, "--experiment", name, monkeypatch=monkeypatch))) == ["sweep-deblur"]
    assert main(["runs", "--experiment", "deblr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'deblur'?" in err and "sweep-deblur" in err


def test_the_sqlite_reader_reads_what_mlflow_reads(store):
    path = sqlite_file(store)
    assert isinstance(open_reader(None), SqliteReader)
    direct, through_mlflow = SqliteReader(path), MlflowReader(store)
    assert direct.experiments() == through_mlflow.experiments()
    experiments = direct.experiments()
    assert direct.runs(experiments, 3) == through_mlflow.runs(experiments, 3)
    assert direct.runs(experiments, 50) == through_mlflow.runs(experiments, 50)
    client = MlflowClient(store)
    client.create_registered_model("deblur")
    for run in ("77e1f38a" + "4" * 24, "0bd148dc1" + "0" * 23):
        client.create_model_version("deblur", f"runs:/{run}/model", run, tags={"deconvlab.metric": "val/psnr"})
    client.set_registered_model_alias("deblur", "champion", "1")
    client.create_registered_model("deblur.promotion-lock")  # a promotion lock: never listed

    def key(version):
        return version["name"], version["version"]

    assert sorted(direct.versions(), key=key) == sorted(through_mlflow.versions(), key=key)
    rows = list_versions()
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [("deblur", 1, ["champion"]), ("deblur", 2, [])]
    with pytest.raises(UserError, match="did you mean 'deblur'"):
        list_versions(name="debler")


def test_models_table_fits_the_terminal(store, capsys, monkeypatch):
    client = MlflowClient(store)
    client.create_registered_model("quickstart-deblur")
    client.create_model_version("quickstart-deblur", "runs:/x/model", "0bd148dc1" + "0" * 23,
                                tags={"deconvlab.metric": "val/psnr", "deconvlab.metric_value": "24.5",
                                      "deconvlab.dataset": "Shapes(root=/a/very/long/path/to/data, split=val)",
                                      "deconvlab.family": "restoration"})
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "quickstart-deblur" in out and "24.5" in out and "0bd148dc" in out


def test_an_empty_or_missing_store_lists_nothing_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert main(["runs"]) == 0
    assert "no runs" in capsys.readouterr().out
    assert not (tmp_path / "none.db").exists()


def test_listing_a_local_store_does_not_import_mlflow(store):
    import subprocess
    import sys

    code = ("import sys; from deconvlab.cli import main; main(['runs']); main(['models']); "
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
