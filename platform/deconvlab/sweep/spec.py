"""Sweep files: parsing, search-space distributions, and validation before any trial starts.

A sweep file looks like::

    experiment: quickstart              # the base experiment (conf/experiment/<name>.yaml)
    overrides: [trainer.max_epochs=6]   # more Hydra overrides for every trial
    metric: val/psnr
    mode: max
    search_space:                       # dotted Hydra keys -> distributions
      optim.lr: loguniform(1e-4, 1e-2)
      model.width: choice([16, 32])
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    search: {type: random}              # random | grid | optuna
    num_samples: 6                      # sampled configs
    repeats: 1                          # seeds per config (seed, seed+1, ...): num_samples x repeats trials
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}
    workers_per_trial: 1
    time_budget_s: 3600                 # optional: the whole sweep stops after this many seconds
    stop: {val/psnr: 30}                # optional: a trial stops once a reported value reaches its threshold
    smoke_test: {num_samples: 3, overrides: [debug=smoke], search_space: {model.width: choice([16])}}

``stop`` thresholds on the sweep's metric are reached in its ``mode``'s direction (``>=`` for max, ``<=`` for
min); any other reported key (``training_iteration``, ``time_total_s``, ...) stops at ``>=``.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from ray import tune

from deconvlab.build import build_task
from deconvlab.config import compose_config, config_groups, project_root
from deconvlab.console import progress
from deconvlab.errors import UserError, choose_from, first_line

DISTRIBUTIONS = ("choice", "grid", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint")
SCHEDULERS = ("fifo", "asha", "pbt")
SEARCHERS = ("random", "grid", "optuna")
# The config key a sweep with ``repeats: N`` sets per trial: the base config's seed + the repeat's index.
SEED_KEY = "seed"
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Distribution:
    """One search dimension, e.g. ``loguniform(1e-4, 1e-2)``."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune sampler (``grid`` becomes ``tune.grid_search``)."""
        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def values_for_validation(self) -> list[Any]:
        """Representative values, used to check that a trial's overrides compose."""
        if self.kind in ("choice", "grid"):
            return list(self.args[0])
        return [self.args[0]]


def parse_distribution(key: str, text: Any) -> Distribution:
    """``"loguniform(1e-4, 1e-2)"`` -> Distribution; a UserError naming the key otherwise."""
    match = _CALL.match(str(text))
    if not match:
        raise UserError(f"search space value {text!r} is not a distribution", f"search_space.{key}",
                        f"write one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind, raw_args = match.groups()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"unknown distribution {kind!r}", f"search_space.{key}",
                        f"use one of: {', '.join(DISTRIBUTIONS)}")
    try:
        args = ast.literal_eval(f"({raw_args},)") if raw_args.strip() else ()
    except (ValueError, SyntaxError):
        raise UserError(f"cannot read the arguments of {text!r}", f"search_space.{key}",
                        "arguments must be Python literals, e.g. choice([16, 32]) or uniform(0.1, 0.5)") from None
    _check_arguments(key, kind, args)
    return Distribution(kind, tuple(args))


def _check_arguments(key: str, kind: str, args: tuple[Any, ...]) -> None:
    where = f"search_space.{key}"
    if kind in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise UserError(f"{kind} needs one non-empty list", where, f"e.g. {kind}([0.25, 0.5])")
        return
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    expected = 3 if kind.startswith("q") else 2
    if len(args) != expected or not numeric:
        example = "1e-4, 1e-2, 1e-4" if expected == 3 else "1e-4, 1e-2"
        raise UserError(f"{kind} needs {expected} numbers", where, f"e.g. {kind}({example})")
    low, high = args[0], args[1]
    if not low < high:
        raise UserError(f"{kind} needs low < high, got {low} and {high}", where, "swap or fix the bounds")
    if "log" in kind and low <= 0:
        raise UserError(f"{kind} needs positive bounds, got {low}", where, "use uniform for ranges through 0")


@dataclass
class SweepSpec:
    """A validated sweep file. See the module docstring for the format."""

    name: str
    path: str
    experiment: str
    metric: str
    mode: str
    search_space: dict[str, Distribution]
    overrides: list[str] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search: dict[str, Any] = field(default_factory=lambda: {"type": "random"})
    num_samples: int = 1
    max_concurrent_trials: int = 0
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    workers_per_trial: int = 1
    max_failures: int = 0
    repeats: int = 1
    time_budget_s: float | None = None
    stop: dict[str, float] = field(default_factory=dict)
    smoke_test: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def trial_overrides(self, sampled: dict[str, Any]) -> list[str]:
        """The Hydra overrides of one trial: experiment, sweep overrides, then the sampled values."""
        return [f"experiment={self.experiment}", *self.overrides,
                *(f"{key}={_override_value(value)}" for key, value in sampled.items())]

    def trial_count(self) -> int:
        """How many trials the sweep runs: samples x grid points x seeds (a grid is run whole per sample)."""
        grid_points = math.prod(len(d.args[0]) for d in self.search_space.values() if d.kind == "grid")
        return self.num_samples * grid_points * self.repeats

    def concurrency(self) -> str:
        """``2 at a time`` or ``as many at a time as the cluster fits`` (max_concurrent_trials: 0)."""
        return f"{self.max_concurrent_trials} at a time" if self.max_concurrent_trials else \
            "as many at a time as the cluster fits"

    def with_smoke_test(self) -> SweepSpec:
        """The same sweep made tiny: its ``smoke_test`` block's overrides and sample count."""
        smoke = dict(self.smoke_test)
        spec = SweepSpec(**{**asdict(self), "search_space": self.search_space})
        spec.overrides = [*self.overrides, *smoke.get("overrides", ["debug=smoke"])]
        spec.num_samples = int(smoke.get("num_samples", min(self.num_samples, 3)))
        spec.repeats = int(smoke.get("repeats", self.repeats))
        if "scheduler" in smoke:
            spec.scheduler = {**self.scheduler, **smoke["scheduler"]}
        # A smoke test may narrow dimensions (e.g. small kernels only), never add new ones.
        for key, text in (smoke.get("search_space") or {}).items():
            if key not in spec.search_space:
                raise UserError(f"smoke_test.search_space key {key!r} is not in search_space",
                                f"{self.path}: smoke_test", "only narrow existing dimensions in the smoke test")
            spec.search_space = {**spec.search_space, key: parse_distribution(key, text)}
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for Ray to ship to trials and for MLflow params)."""
        data = asdict(self)
        data["search_space"] = {k: {"kind": d.kind, "args": list(d.args)} for k, d in self.search_space.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        space = {k: Distribution(v["kind"], tuple(v["args"])) for k, v in data["search_space"].items()}
        return cls(**{**data, "search_space": space})


def _override_value(value: Any) -> str:
    """A sampled value as Hydra override text (lists and strings quoted the way Hydra parses them)."""
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w.\-/]+", value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def trial_config(sweep: dict[str, Any], sampled: dict[str, Any], output_dir: str,
                 extra: list[str]) -> DictConfig:
    """The composed config of one trial: what the trial trains, and what the driver logs for its child run.

    Args:
        sweep: the sweep spec as a dict (:meth:`SweepSpec.to_dict`, what Ray ships to trials).
        sampled: the trial's values: dotted Hydra keys -> values.
        output_dir: the trial's scratch folder (``paths.output_dir``).
        extra: Hydra overrides given on the command line, for every trial.
    """
    spec = SweepSpec.from_dict(sweep)
    # A repeat's seed goes last: a `seed=` on the command line is the base its repeats count from
    # (:func:`.repeats.repeat_seeds`), and must not give every repeat the same seed.
    sampled = dict(sampled)
    seed = [f"{SEED_KEY}={sampled.pop(SEED_KEY)}"] if spec.repeats > 1 and SEED_KEY in sampled else []
    overrides = [*spec.trial_overrides(sampled), *extra, *seed, "logger=none", f"paths.output_dir={output_dir}"]
    return compose_config(overrides)


def sweeps_dir() -> Path:
    return project_root() / "sweeps"


def resolve_sweep_path(name_or_path: str) -> Path:
    """``quickstart`` or ``quickstart.yaml`` -> sweeps/quickstart.yaml; a path to a YAML file is taken as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    name = candidate.name.removesuffix(".yaml").removesuffix(".yml") if candidate.parent == Path() else name_or_path
    named = sweeps_dir() / f"{name}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
    raise UserError(f"unknown sweep {name_or_path!r}", str(sweeps_dir()),
                    f"{choose_from(name, known, 'deconvlab list sweeps')} or give a path to a sweep YAML")


REQUIRED = ("experiment", "metric", "mode", "search_space")
# What Ray Tune adds to every reported result: valid stop keys besides the task's metrics.
TUNE_RESULT_KEYS = ("training_iteration", "time_total_s", "time_this_iter_s", "epoch")
KNOWN_KEYS = {*REQUIRED, "overrides", "scheduler", "search", "num_samples", "repeats", "max_concurrent_trials",
              "resources", "workers_per_trial", "max_failures", "smoke_test", "description", "time_budget_s", "stop"}


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as exc:
        raise UserError(f"not a text file ({exc.reason} at byte {exc.start})", str(path),
                        "a sweep file is UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"malformed YAML: {getattr(exc, 'problem', exc)}", where, "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError("a sweep file must be a mapping of keys", str(path),
                        f"start from {sweeps_dir()}/quickstart.yaml")
    return data


def _check_keys(data: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"missing key(s) {', '.join(missing)}", str(path), f"a sweep file needs {', '.join(REQUIRED)}")
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)}", str(path),
                        f"valid keys: {', '.join(sorted(KNOWN_KEYS))}")
    _check_types(data, path)
    _check_types(data.get("smoke_test") or {}, path, "smoke_test.")
    if data["mode"] not in ("min", "max"):
        raise UserError(f"mode must be min or max, got {data['mode']!r}", f"{path}: mode", "set mode: max or mode: min")
    kind = (data.get("scheduler") or {}).get("type", "fifo")
    if kind not in SCHEDULERS:
        raise UserError(f"unknown scheduler {kind!r}", f"{path}: scheduler.type", f"use one of {', '.join(SCHEDULERS)}")
    kind = (data.get("search") or {}).get("type", "random")
    if kind not in SEARCHERS:
        raise UserError(f"unknown search {kind!r}", f"{path}: search.type", f"use one of {', '.join(SEARCHERS)}")
    if not isinstance(data["search_space"], dict) or not data["search_space"]:
        raise UserError("search_space must map config keys to distributions", f"{path}: search_space",
                        "e.g. search_space: {optim.lr: loguniform(1e-4, 1e-2)}")


# Keys holding a whole number, with their smallest valid value (max_failures=-1: retry without limit).
INTEGER_KEYS = {"num_samples": 1, "repeats": 1, "max_concurrent_trials": 0, "workers_per_trial": 1,
                "max_failures": -1}
MAPPING_KEYS = ("scheduler", "search", "resources", "smoke_test", "search_space", "stop")


def _check_types(data: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Each key holds the kind of value it needs (a mapping, a list of overrides, a count, amounts)."""
    for key in MAPPING_KEYS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise UserError(f"{prefix}{key} must be a mapping, got {data[key]!r}", f"{path}: {prefix}{key}",
                            f"write it as {key}: {{name: value, ...}}")
    for key, low in INTEGER_KEYS.items():
        value = data.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{prefix}{key} must be a whole number >= {low}, got {value!r}",
                            f"{path}: {prefix}{key}", f"e.g. {key}: {max(low, 1)}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{prefix}overrides must be a list of key=value strings, got {overrides!r}",
                        f"{path}: {prefix}overrides", "e.g. overrides: [trainer.max_epochs=6]")
    budget = data.get("time_budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise UserError(f"{prefix}time_budget_s must be a number of seconds > 0, got {budget!r}",
                        f"{path}: {prefix}time_budget_s", "e.g. time_budget_s: 3600 (the sweep stops after an hour)")
    for key, threshold in (data.get("stop") or {}).items():
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise UserError(f"{prefix}stop.{key} must be a number, got {threshold!r}", f"{path}: {prefix}stop",
                            "e.g. stop: {val/psnr: 30, training_iteration: 20}")
    for kind, amount in (data.get("resources") or {}).items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise UserError(f"resources.{kind} must be a number >= 0, got {amount!r}", f"{path}: resources",
                            "e.g. resources: {cpu: 1, gpu: 0}")


def load_sweep(name_or_path: str) -> SweepSpec:
    """Read and check a sweep file (syntax, keys, distributions); config keys are checked by :func:`validate`."""
    path = resolve_sweep_path(name_or_path)
    data = _load_yaml(path)
    _check_keys(data, path)
    space = {str(k): parse_distribution(str(k), v) for k, v in data["search_space"].items()}
    resources = {"cpu": 1, "gpu": 0, **(data.get("resources") or {})}
    return SweepSpec(
        name=path.stem, path=str(path), experiment=str(data["experiment"]), metric=str(data["metric"]),
        mode=data["mode"], search_space=space, overrides=[str(o) for o in data.get("overrides") or []],
        scheduler={"type": "fifo", **(data.get("scheduler") or {})},
        search={"type": "random", **(data.get("search") or {})}, num_samples=int(data.get("num_samples", 1)),
        max_concurrent_trials=int(data.get("max_concurrent_trials", 0)),
        resources={k: float(v) for k, v in resources.items()},
        workers_per_trial=int(data.get("workers_per_trial", 1)), max_failures=int(data.get("max_failures", 0)),
        repeats=int(data.get("repeats", 1)),
        time_budget_s=None if data.get("time_budget_s") is None else float(data["time_budget_s"]),
        stop={str(k): float(v) for k, v in (data.get("stop") or {}).items()},
        smoke_test=dict(data.get("smoke_test") or {}), raw=data)


def check_overrides_leave_samples(spec: SweepSpec, overrides: Sequence[str]) -> None:
    """Refuse a command-line override of a key the search space samples: it comes after the sampled value
    in every trial's overrides, so it would silently replace it.

    ``+key=``, ``++key=`` and ``~key`` override ``key`` too, and so does a value for a key above a sampled
    one (``data.degradation={...}`` when ``data.degradation.noise_sigma`` is sampled). A config group
    choice (``model=other`` when ``model.width`` is sampled) is allowed: it picks the config the sampled
    value lands in, the sampled value still applies, and :func:`validate` checks each value composes.

    Raises:
        UserError: naming the first overridden key.
    """
    groups = set(config_groups())
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()
        for sampled in spec.search_space:
            if key == sampled or (sampled.startswith(f"{key}.") and key not in groups):
                held = "" if key == sampled else f" (it holds {sampled})"
                raise UserError(f"{key} is sampled by the sweep's search space{held}: the override {override!r} "
                                "would override every trial's sampled value", spec.path,
                                "drop the override or edit search_space")


def validate(spec: SweepSpec, extra_overrides: list[str] = ()) -> None:
    """Check against the real config, before anything starts: keys exist, values compose, metric is reported.

    Raises:
        UserError: a search key that is not in the config, a value that does not compose, a metric
        that the experiment's task never reports, or an override of a sampled key.
    """
    check_overrides_leave_samples(spec, extra_overrides)
    if spec.repeats > 1 and SEED_KEY in spec.search_space:
        raise UserError(f"repeats: {spec.repeats} sets the seed of every trial, and search_space samples it too",
                        f"{spec.path}: repeats", f"remove search_space.{SEED_KEY}, or set repeats: 1")
    base = compose_config([*spec.trial_overrides({}), *extra_overrides])
    for key in spec.search_space:
        if OmegaConf.select(base, key, default="__missing__") == "__missing__":
            raise UserError(f"search key {key!r} is not in the config of experiment {spec.experiment!r}",
                            f"{spec.path}: search_space.{key}",
                            "use a dotted key that `deconvlab train --cfg job` shows")
    groups = set(config_groups())
    checks = [(key, value) for key, dist in spec.search_space.items() for value in dist.values_for_validation()]
    for key, value in progress(checks, f"validating {len(checks)} search-space values"):
        cfg = compose_config([*spec.trial_overrides({key: value}), *extra_overrides])
        # Switching a whole group (model=...) under an experiment's settings is what breaks builds;
        # single values are checked by the trial itself (their validity can depend on each other).
        if key in groups:
            _check_model_builds(cfg, f"{spec.path}: search_space.{key}={value}")
    reported = task_metric_names(base)
    if spec.metric not in reported:
        raise UserError(f"metric {spec.metric!r} is never reported by this experiment", f"{spec.path}: metric",
                        f"choose one of: {', '.join(sorted(reported))}")
    for key in spec.stop:
        if key not in reported and key not in TUNE_RESULT_KEYS:
            raise UserError(f"stop key {key!r} is never reported, so it would never stop a trial",
                            f"{spec.path}: stop", choose_from(key, [*reported, *TUNE_RESULT_KEYS]))


def _check_model_builds(cfg, where: str) -> None:
    """Instantiate the trial's model: a value that composes but cannot build (e.g. a model switched under
    an experiment that sets keys the new model does not take) must fail here, not in every trial."""
    try:
        instantiate(cfg.model)
    except InstantiationException as exc:
        cause = first_line(exc.__cause__ or exc, 1000)
        raise UserError(f"the model of this trial cannot be built: {cause}", where,
                        "change the search space or the base experiment so every value builds") from None


def task_metric_names(cfg) -> set[str]:
    """The metric names the configured task reports (builds the task; no data is touched)."""
    return build_task(cfg).metric_names()
