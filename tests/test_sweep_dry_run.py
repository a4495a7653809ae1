"""``deconvlab sweep NAME --dry-run``: the plan of a sweep, validated, with nothing started or written."""

from __future__ import annotations

import re

import pytest

from deconvlab.cli import main
from deconvlab.sweep.dry_run import plan_sweep


def test_dry_run_prints_every_trial_of_a_grid_and_starts_nothing(capsys, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["sweep", "camvid_architectures", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 6 = 1 sample x 6 grid points" in out
    commands = re.findall(r"^\s+\d+\s+deconvlab train (.*)$", out, flags=re.M)
    assert [re.search(r"model=(\w+)", c)[1] for c in commands] == ["fcn32s", "fcn16s", "fcn8s", "deconvnet",
                                                                     "farabet", "patchnet"]
    assert all(c.startswith("experiment=fcn8s_camvid") for c in commands)
    assert not ray.is_initialized() and list(tmp_path.iterdir()) == []


def test_dry_run_previews_random_samples_and_the_command_line_overrides():
    plan = plan_sweep("quickstart", ["data.batch_size=8"], limit=4)
    assert plan.total == plan.spec.num_samples and len(plan.trials) == 4
    assert all(set(t) == set(plan.spec.search_space) for t in plan.trials)
    low, high = plan.spec.search_space["optim.lr"].args
    assert all(low <= t["optim.lr"] <= high for t in plan.trials)
    assert plan.trial_overrides(plan.trials[0])[-1] == "data.batch_size=8"


def test_dry_run_shows_the_seeds_of_repeats(tmp_path):
    sweep = tmp_path / "seeds.yaml"
    sweep.write_text("experiment: quickstart\nmetric: val/psnr\nmode: max\nnum_samples: 2\nrepeats: 3\n"
                     "search_space:\n  optim.lr: loguniform(1e-4, 1e-2)\n")
    plan = plan_sweep(str(sweep), ["seed=5"], limit=100)
    assert plan.total == 6 and len(plan.trials) == 6
    assert sorted(t["seed"] for t in plan.trials) == [5, 5, 6, 6, 7, 7]
    # A config's random values are drawn once for all its seeds, as the sweep runs them.
    assert len({t["optim.lr"] for t in plan.trials}) == 2


def test_dry_run_refuses_a_bad_sweep_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: quickstart\nmetric: val/nope\nmode: max\n"
                   "search_space:\n  optim.lr: uniform(0.1, 0.2)\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val/nope" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("name", ["xu_vs_wiener", "quickstart_pbt"])
def test_every_preview_line_composes(name):
    from deconvlab.config import compose_config

    plan = plan_sweep(name, limit=2)
    for sampled in plan.trials:
        compose_config(plan.trial_overrides(sampled))
