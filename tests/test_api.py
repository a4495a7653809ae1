"""The Python API (docs/api.md), ``python -m deconvlab``, and the record every run leaves on disk."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import deconvlab.api as dl
from deconvlab.errors import UserError

UNTRACKED = ["experiment=quickstart", "debug=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def test_importing_the_package_loads_neither_torch_nor_mlflow():
    code = "import sys, deconvlab; print(sorted({'torch', 'mlflow', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "deconvlab", "list", "sweeps"], capture_output=True, text=True)
    assert done.returncode == 0 and "  quickstart" in done.stdout.splitlines()
    done = subprocess.run([sys.executable, "-m", "deconvlab", "train"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: no experiment given")


def test_every_api_function_is_documented():
    assert all(getattr(dl, name).__doc__ for name in dl.__all__), dl.__all__


def test_train_refuses_overrides_without_an_experiment():
    with pytest.raises(UserError, match="no experiment given"):
        dl.train(["trainer.max_epochs=1"])


@pytest.fixture(scope="module")
def untracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return dl.train([*UNTRACKED, f"paths.root_dir={root}"]), root


def test_an_untracked_run_leaves_its_config_overrides_and_log_on_disk(untracked_run):
    result, root = untracked_run
    assert result.run_id is None and result.best_checkpoint
    folder = next((root / "quickstart").iterdir())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["name"] == "quickstart" and config["logger"]["enabled"] is False
    assert yaml.safe_load((folder / "overrides.yaml").read_text())[:2] == UNTRACKED[:2]
    log = (folder / "train.log").read_text().splitlines()
    epochs = [line for line in log if " epoch " in line]
    assert len(epochs) == config["trainer"]["max_epochs"] and "val/psnr=" in epochs[-1]
    assert "best val/psnr" in log[-1]


def test_a_checkpoint_of_an_untracked_run_evaluates_and_loads_through_the_api(untracked_run):
    result, _ = untracked_run
    evaluation = dl.evaluate(result.best_checkpoint, log=False)
    assert evaluation.metrics["val/psnr"] == pytest.approx(result.metrics["best/val/psnr"], abs=1e-3)
    loaded = dl.load_model(result.best_checkpoint)
    assert not loaded.task.model.training and loaded.cfg.name == "quickstart"
