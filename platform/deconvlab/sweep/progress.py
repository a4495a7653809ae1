"""The sweep's default terminal output: one line per trial start and end, not Ray Tune's boxes.

Ray Tune's own reporter prints a configuration box when a trial starts, a result box with every reported key
when it ends and a status table every few seconds: a 6-trial sweep fills ~250 lines and the leaderboard
scrolls away. This callback prints what a user follows a sweep by (which trial, its sampled values, how far
it got, its metric, the best so far); ``deconvlab sweep --verbose`` brings Tune's reporter back.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from ray.tune import Callback


def _short_trial(trial) -> str:
    """``7c0ca_00003``: the part of a Tune trial id that the leaderboard shows too."""
    return str(trial.trial_id)


def _values(config: dict) -> str:
    parts = []
    for key, value in sorted(config.items()):
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


class TrialProgressLines(Callback):
    """Print ``[mm:ss] trial ID started: key=value ...`` and ``... finished after E/N epochs: metric V``.

    Args:
        metric: the sweep's ranking metric.
        mode: ``max`` or ``min``.
        max_epochs: the epochs a trial runs when no scheduler stops it.
        stream: where to print (stdout by default).
    """

    def __init__(self, metric: str, mode: str, max_epochs: int, stream: TextIO | None = None) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.best_value = math.nan
        self.best_trial: str | None = None
        self.trial_best: dict[str, float] = {}  # trial id -> its best reported value, as the leaderboard ranks

    def _print(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", file=self.stream, flush=True)

    def _better(self, value: float, than: float) -> bool:
        if math.isnan(value):
            return False
        if math.isnan(than):
            return True
        return value > than if self.mode == "max" else value < than

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value = float(result.get(self.metric, math.nan))
        if self._better(value, self.trial_best.get(trial.trial_id, math.nan)):
            self.trial_best[trial.trial_id] = value

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"trial {_short_trial(trial)} started: {_values(trial.config)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("training_iteration", 0))
        value = self.trial_best.get(trial.trial_id, math.nan)
        how = "finished" if epochs >= self.max_epochs else "stopped early"
        note = ""
        if self._better(value, self.best_value):
            self.best_value, self.best_trial = value, _short_trial(trial)
            note = " (best so far)"
        self._print(f"trial {_short_trial(trial)} {how} after {epochs}/{self.max_epochs} epochs: "
                    f"best {self.metric} {value:.4g}{note}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = trial.get_error() if hasattr(trial, "get_error") else None
        last = str(error).strip().splitlines()[-1][:160] if error and str(error).strip() else "see its child run"
        self._print(f"trial {_short_trial(trial)} failed: {last}")
