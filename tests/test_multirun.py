"""``deconvlab train -m``: Hydra's multirun grid, run as a sweep from a sweep file it writes."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import start_local_ray
from deconvlab.cli import main
from deconvlab.errors import UserError
from deconvlab.sweep.multirun import multirun_spec, write_multirun_sweep
from deconvlab.sweep.spec import load_sweep

SMOKE = ["experiment=quickstart", "debug=smoke"]


def test_comma_lists_become_typed_grid_dimensions_and_the_rest_stays_overrides(tmp_path):
    spec, _ = multirun_spec([*SMOKE, "optim.lr=1e-3,3e-3", "model=residual_deblur_cnn,residual_deblur_cnn"])
    assert spec["experiment"] == "quickstart" and spec["overrides"] == ["debug=smoke"]
    assert spec["metric"] == "val/psnr" and spec["mode"] == "max"
    path = write_multirun_sweep([*SMOKE, "optim.lr=1e-3,3e-3", "model.width=8,16"], tmp_path)
    assert path.parent.parent == tmp_path / "multirun"
    loaded = load_sweep(str(path))
    assert loaded.search_space["optim.lr"].args == ([0.001, 0.003],)
    assert loaded.search_space["model.width"].args == ([8, 16],) and loaded.trial_count() == 4
    assert yaml.safe_load(path.read_text())["description"].startswith("deconvlab train -m experiment=quickstart")


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.max_epochs=2"], "no experiment given"),
    ([*SMOKE], "at least one comma list"),
    (["experiment=quickstart,fcn8s_shapes"], "one experiment"),
    ([*SMOKE, "+extra=1,2"], "drop the +"),
])
def test_multiruns_that_cannot_be_a_sweep_are_one_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        multirun_spec(overrides)


def test_dry_run_of_a_multirun_prints_the_grid_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-m", "--dry-run", *SMOKE, "optim.lr=1e-3,3e-3", "model.width=8,16"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\s+\d+\s+deconvlab train ", out, flags=re.M)) == 4
    assert list(tmp_path.iterdir()) == []


def test_dry_run_without_multirun_is_refused(capsys):
    assert main(["train", "--dry-run", *SMOKE]) == 2
    assert "add -m" in capsys.readouterr().err


@pytest.mark.slow
def test_a_multirun_runs_its_grid_as_one_sweep(capsys, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    start_local_ray()
    try:
        assert main(["train", "-m", *SMOKE, "optim.lr=1e-3,3e-3", "--quiet"]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "multirun: the grid is sweep file" in out and "in experiment sweep-multirun-quickstart" in out
    assert len(list((tmp_path / "outputs" / "multirun").glob("*/multirun-quickstart.yaml"))) == 1
