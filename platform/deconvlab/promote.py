"""Promotion to the model registry: the best checkpoint of a sweep (or a run) becomes a version, aliases move.

``promote`` packages a run's best checkpoint as an MLflow model (see :mod:`deconvlab.model_io`), registers
it as a new version tagged with its lineage, and moves the alias (``champion`` by default) only when the
new version beats the current holder on the ranking metric; the holder it replaces gets ``previous``.
The decide-and-write step holds the name's registry lock (:mod:`deconvlab.locks`: a row the store's
database holds, so it serialises hosts that share no file system) and re-reads the registry under it, so
promotions racing on one name register each run once and leave exactly one holder of the alias.

A sweep with ``repeats: N`` ran every config with N seeds: promotion picks the config with the best mean
over its seeds and registers the checkpoint of that config's best seed (the seeds share the config, and a
version is one set of weights); the version's tags record the config's mean, 95 % interval and ``n``.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deconvlab import model_io, tracking
from deconvlab.build import checkpoint_model_weights, read_weights, rebuild_task, task_family
from deconvlab.errors import UserError
from deconvlab.locks import registry_lock
from deconvlab.store import (
    TAG,
    best_value,
    checkpoint_artifact,
    client_for,
    find_source_run,
    has_checkpoint,
    run_config,
    sweep_trials_ranked,
)

PREVIOUS_ALIAS = "previous"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOCK_TIMEOUT_S = 120


def config_stat_key(stat: str, metric: str) -> str:
    """A statistic of a trial's config over its seeds, which a sweep with repeats logs on each trial's run
    (``config/mean/val/psnr``, ``config/ci_low/val/psnr``, ...; the statistics are :mod:`deconvlab.sweep`'s)."""
    return f"config/{stat}/{metric}"


# -- what to promote -----------------------------------------------------------------------------------
@dataclass
class ConfigChoice:
    """The config a sweep with repeats promotes: its statistics over seeds and the seed registered.

    Attributes:
        config_id: the trials' ``deconvlab.config_id``.
        mean, n: the mean of the seeds' best metric, and how many seeds have one.
        ci_low, ci_high: the 95 % interval of the mean the sweep logged (NaN when it logged none, or n = 1).
        seed: the seed whose checkpoint is registered.
        seeds: (seed, best metric) of each of the config's seeds, in seed order.
        configs: how many configs were ranked.
    """

    config_id: str
    mean: float
    n: int
    ci_low: float
    ci_high: float
    seed: str
    seeds: list[tuple[str, float]] = field(default_factory=list)
    configs: int = 1


@dataclass
class Candidate:
    """A run chosen for promotion, with the value that ranks it."""

    run: Any
    metric: str
    mode: str
    value: float
    checkpoint: str
    sweep: str | None = None
    sweep_run_id: str | None = None
    trial_id: str | None = None
    config: ConfigChoice | None = None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _check_mode(mode: str) -> str:
    if mode not in ("max", "min"):
        raise UserError(f"mode must be max or min, got {mode!r}", "--mode", "pass --mode max or min")
    return mode


def _from_sweep(client: MlflowClient, parent, metric: str | None, mode: str | None) -> Candidate:
    metric = metric or parent.data.params.get("sweep.metric")
    mode = _check_mode(mode or parent.data.params.get("sweep.mode", "max"))
    ranked = sweep_trials_ranked(client, parent, metric, mode)
    if not ranked:
        raise UserError(f"no trial of sweep run {parent.info.run_id} has a best/{metric} value",
                        f"runs:/{parent.info.run_id}",
                        "rank by the sweep's own metric, or check the sweep finished")
    choice = None
    if int(parent.data.params.get("sweep.repeats", "1")) > 1:
        best, choice = _best_config(client, ranked, metric, mode)
    else:
        best = next((c for c in ranked if has_checkpoint(client, c)), None)
    if best is None:
        raise UserError(f"no trial of sweep run {parent.info.run_id} has a checkpoint",
                        f"runs:/{parent.info.run_id}",
                        "rerun the sweep; trials log checkpoints/checkpoint.ckpt when they validate")
    return Candidate(best, metric, mode, best_value(best, metric), checkpoint_artifact(client, best),
                     parent.data.tags.get(f"{TAG}sweep"), parent.info.run_id,
                     best.data.tags.get(f"{TAG}trial_id"), choice)


def _best_config(client: MlflowClient, ranked: list, metric: str, mode: str) -> tuple[Any, ConfigChoice | None]:
    """The best seed (with a checkpoint) of the config with the best mean over its seeds, and that config.

    ``ranked``: the sweep's trials with a value, best first; they are grouped by ``deconvlab.config_id``.
    """
    groups: dict[str, list] = {}
    for run in ranked:
        groups.setdefault(run.data.tags.get(f"{TAG}config_id", run.info.run_id), []).append(run)
    means = {config: fmean(best_value(r, metric) for r in runs) for config, runs in groups.items()}
    for config in sorted(groups, key=means.get, reverse=(mode == "max")):
        best = next((r for r in groups[config] if has_checkpoint(client, r)), None)
        if best is None:
            continue
        seeds = sorted(((r.data.tags.get(f"{TAG}seed", "?"), best_value(r, metric)) for r in groups[config]),
                       key=lambda s: int(s[0]) if s[0].lstrip("-").isdigit() else math.inf)
        logged = best.data.metrics
        return best, ConfigChoice(config, means[config], len(groups[config]),
                                  logged.get(config_stat_key("ci_low", metric), math.nan),
                                  logged.get(config_stat_key("ci_high", metric), math.nan),
                                  best.data.tags.get(f"{TAG}seed", "?"), seeds, len(groups))
    return None, None


def _from_run(client: MlflowClient, run, metric: str | None, mode: str | None) -> Candidate:
    params = run.data.params
    metric = metric or params.get("task.monitor")
    mode = _check_mode(mode or params.get("task.monitor_mode", "max"))
    value = best_value(run, metric) if metric else None
    if value is None:
        known = sorted(k.removeprefix("best/") for k in run.data.metrics if k.startswith("best/"))
        raise UserError(f"run {run.info.run_id} has no finite best/{metric}", "--metric",
                        f"rank by one of: {', '.join(known) or 'none (the run never validated)'}")
    checkpoint = checkpoint_artifact(client, run)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    return Candidate(run, metric, mode, value, checkpoint, run.data.tags.get(f"{TAG}sweep"), parent_id,
                     run.data.tags.get(f"{TAG}trial_id"))


def select_candidate(client: MlflowClient, source: str, metric: str | None = None,
                     mode: str | None = None) -> Candidate:
    """The run to promote: a sweep's best trial (by sweep name, file or parent run id), or the run given
    (by id or a unique prefix of it)."""
    run = find_source_run(client, source)
    if run.data.tags.get(f"{TAG}role") == "parent":
        return _from_sweep(client, run, metric, mode)
    return _from_run(client, run, metric, mode)


# -- promotion -----------------------------------------------------------------------------------------
@dataclass
class Promotion:
    """What ``promote`` did: the version, whether the alias moved, and why."""

    name: str
    version: str
    alias: str
    moved: bool
    reason: str
    candidate: Candidate
    newly_registered: bool = True
    previous_version: str | None = None


def _lineage(candidate: Candidate, cfg) -> dict[str, str]:
    run = candidate.run
    data = cfg.data
    tags = {
        "source_run_id": candidate.run_id, "checkpoint": candidate.checkpoint,
        "metric": candidate.metric, "mode": candidate.mode, "metric_value": repr(candidate.value),
        "sweep": candidate.sweep or "", "sweep_run_id": candidate.sweep_run_id or "",
        "trial_id": candidate.trial_id or "",
        "git_commit": run.data.tags.get("mlflow.source.git.commit") or tracking.git_commit() or "unknown",
        "dataset": f"{_short(data._target_)}(root={data.get('root')}, split={data.get('split')})",
        "experiment": str(cfg.get("name")), "model": _short(cfg.model._target_),
        "config": " ".join(cfg.get("overrides") or [])[:4000],
        "family": task_family(cfg),
        **_config_tags(candidate.config),
    }
    return {f"{TAG}{k}": v for k, v in tags.items() if v != ""}


def _config_tags(choice: ConfigChoice | None) -> dict[str, str]:
    """A repeats sweep's config statistics as version tags (an interval the sweep did not log is left out)."""
    if choice is None:
        return {}
    numbers = {"metric_mean": choice.mean, "metric_ci_low": choice.ci_low, "metric_ci_high": choice.ci_high}
    return {"config_id": choice.config_id, "seed": choice.seed, "metric_n": str(choice.n),
            **{k: repr(v) for k, v in numbers.items() if math.isfinite(v)}}


def _short(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _package(client: MlflowClient, candidate: Candidate, cfg) -> None:
    """Rebuild the candidate's network from its checkpoint and log it as the run's ``model`` artifact."""
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(candidate.run_id, candidate.checkpoint, folder)
        weights = checkpoint_model_weights(read_weights(path), candidate.checkpoint)
        task = rebuild_task(cfg, weights, f"runs:/{candidate.run_id}")
        target = Path(folder) / model_io.MODEL_ARTIFACT
        model_io.save_model_dir(task, cfg, target, {"source_run_id": candidate.run_id})
        client.log_artifacts(candidate.run_id, str(target), model_io.MODEL_ARTIFACT)


def _version_of_run(client: MlflowClient, name: str, run_id: str):
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(f"{TAG}source_run_id") == run_id:
            return version
    return None


def _register(client: MlflowClient, name: str, candidate: Candidate, cfg) -> tuple[Any, bool]:
    existing = _version_of_run(client, name, candidate.run_id)
    if existing is not None:
        return existing, False
    try:
        client.create_registered_model(name, description="promoted by deconvlab")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{candidate.run.info.artifact_uri.rstrip('/')}/model"
    origin = f"trial {candidate.trial_id} of sweep {candidate.sweep}" if candidate.sweep else "a single run"
    why = f"{candidate.metric} = {candidate.value:.6g} ({candidate.mode}) from {origin}"
    if candidate.config is not None:
        why += f"; {_config_summary(candidate)}"
    version = client.create_model_version(name, source, candidate.run_id, tags=_lineage(candidate, cfg),
                                          description=why)
    return version, True


def _decide(client: MlflowClient, name: str, alias: str, version, candidate: Candidate,
            force: bool) -> tuple[bool, str, str | None]:
    """Whether ``version`` takes ``alias``, why, and the version it takes it from."""
    aliases = client.get_registered_model(name).aliases
    holder_number = aliases.get(alias)
    if holder_number is None:
        return True, f"no version held @{alias} yet", None
    holder_number = str(holder_number)
    if holder_number == str(version.version):
        return False, f"version {version.version} already holds @{alias}", None
    holder = client.get_model_version(name, holder_number)
    held_metric, held_mode = holder.tags.get(f"{TAG}metric"), holder.tags.get(f"{TAG}mode")
    held_value = float(holder.tags.get(f"{TAG}metric_value", "nan"))
    if force:
        why = f"--force: replaces version {holder_number} ({held_metric} = {held_value:.6g})"
        return True, why, holder_number
    if (held_metric, held_mode) != (candidate.metric, candidate.mode) or not math.isfinite(held_value):
        return False, (f"version {holder_number} @{alias} was ranked by {held_metric} ({held_mode}), not by "
                       f"{candidate.metric} ({candidate.mode}): no comparison; --force moves it"), None
    if _better(candidate.value, held_value, candidate.mode):
        return True, (f"{candidate.metric} {candidate.value:.6g} beats version {holder_number}'s "
                      f"{held_value:.6g} ({candidate.mode})"), holder_number
    return False, (f"{candidate.metric} {candidate.value:.6g} does not beat version {holder_number}'s "
                   f"{held_value:.6g} ({candidate.mode}); @{alias} stays (--force moves it anyway)"), None


def previous_alias(alias: str) -> str:
    """The alias the replaced holder keeps: ``previous`` for ``champion``, ``previous-<alias>`` otherwise."""
    return PREVIOUS_ALIAS if alias == "champion" else f"{PREVIOUS_ALIAS}-{alias}"


def _check_names(name: str, alias: str) -> None:
    if not NAME_PATTERN.match(name):
        raise UserError(f"invalid model name {name!r}", "--name",
                        "use letters, digits, '.', '_' or '-' (no '/' or '@'), starting with a letter/digit")
    if not NAME_PATTERN.match(alias) or re.fullmatch(r"[vV]\d+|latest", alias):
        raise UserError(f"invalid alias {alias!r}", "--alias",
                        "use letters, digits, '.', '_' or '-'; 'latest' and v<number> are reserved")


def promote(source: str, name: str, metric: str | None = None, mode: str | None = None,
            alias: str = "champion", force: bool = False, tracking_uri: str | None = None) -> Promotion:
    """Register the best checkpoint of a sweep (or of a run) as a new version of ``name``.

    Everything that can fail on user input (unknown sweep or run, no checkpoint, a model that does not
    rebuild) fails before the registry is touched.

    Args:
        source: a sweep name (its latest run), a sweep's parent run id, or any run id (``runs:/ID`` too).
        name: the registered model name.
        metric, mode: the ranking; default: the sweep's metric, or the run's task monitor.
        alias: the alias to move when the new version is better.
        force: move the alias even if the new version is not better.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).

    Returns:
        What was registered and whether (and why) the alias moved.
    """
    _check_names(name, alias)
    client = client_for(tracking_uri)
    candidate = select_candidate(client, source, metric, mode)
    cfg = run_config(client, candidate.run_id)
    if _version_of_run(client, name, candidate.run_id) is None:
        _package(client, candidate, cfg)  # outside the lock: the slow part, and it writes no registry entry
    with registry_lock(client, name, timeout_s=LOCK_TIMEOUT_S):
        version, new = _register(client, name, candidate, cfg)
        moved, reason, replaced = _decide(client, name, alias, version, candidate, force)
        if moved:
            client.set_registered_model_alias(name, alias, version.version)
            if replaced is not None:
                client.set_registered_model_alias(name, previous_alias(alias), replaced)
    return Promotion(name, str(version.version), alias, moved, reason, candidate, new, replaced)


def _config_summary(c: Candidate) -> str:
    """``config ab12cd34: mean val/psnr = 24.3, 95 % CI [24.1, 24.5], n = 3 seeds``."""
    choice = c.config
    interval = (f", 95 % CI [{choice.ci_low:.6g}, {choice.ci_high:.6g}]" if math.isfinite(choice.ci_low)
                else " (no CI: one seed, or the sweep logged none)")
    return f"config {choice.config_id}: mean {c.metric} = {choice.mean:.6g}{interval}, n = {choice.n} seeds"


def _picked(c: Candidate) -> list[str]:
    """What was picked and why: a trial or run, or a repeats sweep's config and which seed's checkpoint."""
    if c.config is None:
        origin = f"trial {c.trial_id} of sweep {c.sweep} (run {c.run_id})" if c.sweep else f"run {c.run_id}"
        return [f"picked {origin}: best {c.metric} = {c.value:.6g} ({c.mode})"]
    choice = c.config
    seeds = ", ".join(f"seed {seed}: {value:.6g}" for seed, value in choice.seeds)
    return [f"picked {_config_summary(c)} of sweep {c.sweep}: the best mean ({c.mode}) of {choice.configs} configs",
            f"registers seed {choice.seed}'s checkpoint (trial {c.trial_id}, run {c.run_id}): the best of the "
            f"config's seeds with a checkpoint ({seeds}); the seeds share the config, the mean ranks it, and a "
            "version holds one set of weights"]


def describe(promotion: Promotion) -> list[str]:
    """Lines telling a user what ``promote`` did and why."""
    c, p = promotion.candidate, promotion
    lines = [*_picked(c),
             (f"registered {p.name} version {p.version}" if p.newly_registered
              else f"run already registered as {p.name} version {p.version}")]
    if p.moved:
        lines.append(f"@{p.alias} -> version {p.version}: {p.reason}")
        if p.previous_version:
            lines.append(f"@{previous_alias(p.alias)} -> version {p.previous_version}")
    else:
        lines.append(f"@{p.alias} not moved: {p.reason}")
    return lines
