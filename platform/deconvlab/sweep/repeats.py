"""Repeats: every sampled config of a sweep runs with ``repeats: N`` seeds, and its trials share a config id.

The seeds of a config are the base config's ``seed`` (``conf/train.yaml``, or ``seed=`` on the command
line) plus 0, 1, ..., N - 1; each trial's Tune config carries its ``seed``, so the trial composes it like
any sampled value and its child run logs it (``sampled.seed``). How the repeats reach Ray Tune depends on
who picks the configs:

- ``search: {type: optuna}``: Optuna learns from results, so it must see a config once and be told the mean
  over its seeds. :class:`SeedRepeater` wraps it in Ray Tune's ``Repeater``, which asks the searcher for a
  config once, hands it out N times and reports the mean of the N trials' final metric back to it.
- ``search: {type: random | grid}``: Tune's ``BasicVariantGenerator`` is not a ``Searcher``, so ``Repeater``
  cannot wrap it, and nothing learns from the results. ``seed`` becomes one more grid dimension, with
  ``constant_grid_search`` so that a config's random values are drawn once and shared by its seeds.

Trials of one config share ``deconvlab.config_id`` (a digest of their Tune config without the seed), which
is how the leaderboard groups them; :class:`RepeatsSweepCallback` tags every child run with it, its seed and
its repeat index, and puts the seed in the run's name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator, Repeater, Searcher
from ray.tune.search.repeater import TRIAL_INDEX

from deconvlab.sweep.child_runs import MLflowSweepCallback
from deconvlab.sweep.records import CONFIG_TAG
from deconvlab.sweep.spec import SEED_KEY, SweepSpec

SEED_TAG = "deconvlab.seed"
REPEAT_TAG = "deconvlab.repeat"


def repeat_seeds(base_seed: int, repeats: int) -> list[int]:
    """The seeds of a config's repeats: ``base_seed``, ``base_seed + 1``, ..."""
    return [base_seed + i for i in range(repeats)]


def config_id(config: dict[str, Any]) -> str:
    """A short digest of a trial's sampled values without its seed: equal for the repeats of one config."""
    values = {k: v for k, v in config.items() if k not in (SEED_KEY, TRIAL_INDEX)}
    text = json.dumps(values, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


class SeedRepeater(Repeater):
    """Ray Tune's ``Repeater`` that writes the repeat's ``seed`` into the config instead of its index.

    Args:
        searcher: the searcher that picks configs (Optuna); it sees each config once and, when all its
            repeats are done, the mean of their final ``metric``.
        repeats: trials per config.
        base_seed: the seed of the first repeat.
    """

    def __init__(self, searcher: Searcher, repeats: int, base_seed: int) -> None:
        super().__init__(searcher, repeat=repeats, set_index=True)
        self.base_seed = base_seed

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            index = config.pop(TRIAL_INDEX)
            config[SEED_KEY] = self.base_seed + index
        return config


def param_space(spec: SweepSpec, base_seed: int) -> dict[str, Any]:
    """Tune's search space: the sweep's dimensions, and with repeats under random/grid search a seed grid."""
    space = {k: d.to_tune() for k, d in spec.search_space.items()}
    if spec.repeats > 1 and spec.search["type"] != "optuna":
        space[SEED_KEY] = tune.grid_search(repeat_seeds(base_seed, spec.repeats))
    return space


def search_settings(spec: SweepSpec, searcher: Searcher | None, base_seed: int) -> dict[str, Any]:
    """``search_alg``, ``num_samples`` and ``max_concurrent_trials`` of the TuneConfig, repeats included.

    ``num_samples`` in a sweep file counts configs; with Repeater, Tune's counts trials (configs x repeats).
    """
    limit = spec.max_concurrent_trials or None
    if spec.repeats <= 1:
        return {"search_alg": searcher, "num_samples": spec.num_samples, "max_concurrent_trials": limit}
    if searcher is not None:
        return {"search_alg": SeedRepeater(searcher, spec.repeats, base_seed),
                "num_samples": spec.num_samples * spec.repeats, "max_concurrent_trials": limit}
    # Tune ignores max_concurrent_trials for a generator it did not build: the generator takes the limit.
    generator = BasicVariantGenerator(constant_grid_search=True, max_concurrent=spec.max_concurrent_trials)
    return {"search_alg": generator, "num_samples": spec.num_samples, "max_concurrent_trials": None}


class RepeatsSweepCallback(MLflowSweepCallback):
    """The sweep's MLflow callback, which also tags each child run with its config id, seed and repeat.

    Args:
        *args, **kwargs: those of :class:`~.child_runs.MLflowSweepCallback`.
        base_seed: the seed of a config's first repeat (the repeat index is ``seed - base_seed``).
    """

    def __init__(self, *args: Any, base_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base_seed = base_seed

    def child_tags(self, trial) -> dict[str, str]:
        """The base tags plus the trial's configuration id and, in a repeated sweep, its seed and repeat."""
        tags = {**super().child_tags(trial), CONFIG_TAG: config_id(trial.config)}
        seed = trial.config.get(SEED_KEY)
        if seed is not None and int(self.sweep.get("repeats", 1)) > 1:
            tags.update({SEED_TAG: str(seed), REPEAT_TAG: str(int(seed) - self.base_seed)})
        return tags

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        # The tags ride with the run's creation (child_tags); a resumed run found by search already has them.
        super().on_trial_start(iteration, trials, trial, **info)
        seed = trial.config.get(SEED_KEY)
        if seed is not None and int(self.sweep.get("repeats", 1)) > 1:
            self.client.update_run(self._run_for(trial), name=f"{self.sweep['name']}-{trial.trial_id}-seed{seed}")
