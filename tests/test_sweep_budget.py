"""A sweep file's ``time_budget_s`` and ``stop``: how long a sweep may take, when a trial has done enough."""

from __future__ import annotations

import pytest

from deconvlab.errors import UserError
from deconvlab.sweep.runner import ThresholdStopper
from deconvlab.sweep.spec import load_sweep, validate

BASE = "experiment: quickstart\nmetric: {metric}\nmode: {mode}\nsearch_space:\n  optim.lr: loguniform(1e-4, 1e-2)\n"


def _sweep(tmp_path, extra: str, metric: str = "val/psnr", mode: str = "max"):
    path = tmp_path / "budget.yaml"
    path.write_text(BASE.format(metric=metric, mode=mode) + extra)
    return load_sweep(str(path))


def test_budget_and_stop_are_read(tmp_path):
    spec = _sweep(tmp_path, "time_budget_s: 90\nstop: {val/psnr: 30, training_iteration: 5}\n")
    assert spec.time_budget_s == 90.0 and spec.stop == {"val/psnr": 30.0, "training_iteration": 5.0}
    validate(spec)
    assert _sweep(tmp_path, "").time_budget_s is None


@pytest.mark.parametrize(("extra", "message"), [
    ("time_budget_s: 0\n", "time_budget_s must be a number of seconds > 0"),
    ("time_budget_s: soon\n", "time_budget_s must be"),
    ("stop: {val/psnr: high}\n", "stop.val/psnr must be a number"),
    ("stop: [val/psnr]\n", "stop must be a mapping"),
])
def test_bad_budget_or_stop_is_one_user_error(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        _sweep(tmp_path, extra)


def test_a_stop_key_that_is_never_reported_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(UserError, match="did you mean 'val/psnr'"):
        validate(_sweep(tmp_path, "stop: {val/psnrr: 30}\n"))


def test_thresholds_follow_the_metrics_mode():
    maximise = ThresholdStopper({"val/psnr": 30.0, "training_iteration": 5}, "val/psnr", "max")
    assert not maximise("t", {"val/psnr": 29.9, "training_iteration": 1})
    assert maximise("t", {"val/psnr": 30.0, "training_iteration": 1})
    assert maximise("t", {"val/psnr": 10.0, "training_iteration": 5})
    # A loss threshold is reached from above: Tune's dict stop (>=) would end every trial at its first report.
    minimise = ThresholdStopper({"val/loss": 0.01}, "val/loss", "min")
    assert not minimise("t", {"val/loss": 0.5}) and minimise("t", {"val/loss": 0.009})
    assert not minimise.stop_all()
