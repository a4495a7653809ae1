"""``deconvlab sweep NAME --dry-run``: what a sweep would run, without starting Ray or writing a run.

The sweep is validated exactly as a real one is (keys, values, models that must build, the metric), then
the first trials are drawn with Ray Tune's own variant generator (the one random and grid search use), so
grid points appear in the order Tune runs them. Random values are drawn with a fixed seed for the preview:
the real sweep draws its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.tune.search.variant_generator import generate_variants

from deconvlab.config import compose_config
from deconvlab.sweep.repeats import param_space
from deconvlab.sweep.spec import SweepSpec, load_sweep, validate

PREVIEW_SEED = 0


@dataclass
class SweepPlan:
    """A validated sweep and the first trials it would run.

    Attributes:
        spec: the sweep (after ``--smoke-test`` when asked).
        overrides: the command line's overrides, applied to every trial.
        trials: the first trials' sampled values (dotted key -> value), in Tune's order.
        total: how many trials the sweep runs.
    """

    spec: SweepSpec
    overrides: list[str]
    trials: list[dict[str, Any]]
    total: int

    def trial_overrides(self, sampled: dict[str, Any]) -> list[str]:
        """The Hydra overrides a trial composes: the sweep's, its sampled values, the command line's."""
        return [*self.spec.trial_overrides(sampled), *self.overrides]


def _first_trials(spec: SweepSpec, base_seed: int, limit: int) -> list[dict[str, Any]]:
    if spec.search["type"] == "optuna":
        return []  # Optuna picks each config from the results before it: nothing to preview
    space = param_space(spec, base_seed)
    random_state = np.random.RandomState(PREVIEW_SEED)

    def variants():
        for _ in range(spec.num_samples):
            for _, resolved in generate_variants(space, constant_grid_search=True, random_state=random_state):
                yield resolved

    return [dict(trial) for trial in itertools.islice(variants(), limit)]


def plan_sweep(name_or_path: str, overrides: Sequence[str] = (), smoke_test: bool = False,
               limit: int = 10) -> SweepPlan:
    """Validate a sweep and draw its first ``limit`` trials, without Ray or the tracking store.

    Raises:
        UserError: whatever a real sweep would refuse before its first trial.
    """
    spec = load_sweep(name_or_path)
    spec = spec.with_smoke_test() if smoke_test else spec
    overrides = list(overrides)
    validate(spec, overrides)
    base = compose_config([*spec.trial_overrides({}), *overrides])
    return SweepPlan(spec, overrides, _first_trials(spec, int(base.seed), limit), spec.trial_count())


def format_plan(plan: SweepPlan) -> list[str]:
    """The plan as lines: the settings, the search space, then one line of overrides per previewed trial."""
    spec = plan.spec
    workers = f" x {spec.workers_per_trial} workers" if spec.workers_per_trial > 1 else ""
    lines = [f"sweep {spec.name} ({spec.path}): experiment {spec.experiment}, {spec.metric} ({spec.mode})",
             f"  trials: {plan.total} = {spec.num_samples} sample{'s' if spec.num_samples > 1 else ''}"
             + (f" x {plan.total // (spec.num_samples * spec.repeats)} grid points"
                if plan.total != spec.num_samples * spec.repeats else "")
             + (f" x {spec.repeats} seeds" if spec.repeats > 1 else ""),
             f"  scheduler: {spec.scheduler}; search: {spec.search}; {spec.concurrency()}",
             f"  resources per trial: {spec.resources}{workers}; max_failures: {spec.max_failures}",
             "  search space:"]
    lines += [f"    {key}: {dist.kind}({', '.join(map(repr, dist.args))})" for key, dist in spec.search_space.items()]
    if not plan.trials:
        lines.append("  trials: chosen by Optuna as results arrive (no preview)")
        return lines
    shown = len(plan.trials)
    random = any(d.kind != "grid" for d in spec.search_space.values())
    which = f"first {shown} of {plan.total}" if shown < plan.total else f"all {plan.total}"
    lines.append(f"  {which} trials" + (" (random values drawn for this preview: the sweep draws its own)"
                                       if random else "") + ":")
    for index, sampled in enumerate(plan.trials):
        shown_values = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in sampled.items()}
        lines.append(f"    {index:>3}  deconvlab train {' '.join(plan.trial_overrides(shown_values))}")
    lines.append("nothing was run: drop --dry-run to start the sweep")
    return lines
