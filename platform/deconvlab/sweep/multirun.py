"""``deconvlab train -m key=a,b other=x,y``: Hydra's multirun, run as a grid sweep.

Hydra's ``-m`` runs one job per point of the grid of comma-separated values. Here the grid becomes a sweep
file (written to ``<paths.root_dir>/multirun/STAMP/multirun-EXPERIMENT.yaml``, so it can be read, edited and
run again with ``deconvlab sweep FILE``) and runs as any sweep does: Ray Tune trials, one MLflow parent run
with a child run per grid point, a leaderboard ranked by the task's monitor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import OverrideParseException

from deconvlab.config import compose_config, require_experiment
from deconvlab.errors import UserError, first_line

MULTIRUN_FOLDER = "multirun"


def _parsed(overrides: Sequence[str]):
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise UserError(f"cannot read the overrides: {first_line(exc)}", " ".join(overrides),
                        "write key=value, or key=a,b for the values of a multirun") from None


def multirun_spec(overrides: Sequence[str]) -> tuple[dict, str]:
    """The sweep file's content for a multirun (every comma list a ``grid`` dimension, the rest overrides),
    and the run's ``paths.root_dir``.

    Raises:
        UserError: no experiment, no comma list, or a comma list on a ``+key`` (trials set sampled keys
            without ``+``: add the key to the config, or set it without a list).
    """
    overrides = list(overrides)
    require_experiment(overrides, "deconvlab train -m", "deconvlab train -m experiment=quickstart optim.lr=1e-3,3e-3")
    space, fixed, experiment = {}, [], None
    for override in _parsed(overrides):
        if override.key_or_group == "experiment":
            if override.is_sweep_override():
                raise UserError("a multirun sweeps one experiment", override.input_line,
                                "run one -m per experiment, or sweep model=... under one experiment")
            experiment = override.value()
        elif override.is_sweep_override():
            if override.type != OverrideType.CHANGE:
                raise UserError(f"{override.input_line!r}: a multirun dimension must be a key the config has",
                                override.input_line, "drop the + (or ~), or add the key with a single value")
            space[override.key_or_group] = f"grid({list(override.sweep_iterator())!r})"
        else:
            fixed.append(override.input_line)
    if not space:
        raise UserError("-m needs at least one comma list to sweep", " ".join(overrides),
                        "e.g. deconvlab train -m experiment=quickstart optim.lr=1e-3,3e-3 model.width=16,32")
    cfg = compose_config([f"experiment={experiment}", *fixed])
    spec = {"description": f"deconvlab train -m {' '.join(overrides)}", "experiment": experiment,
            "overrides": fixed, "metric": str(cfg.task.monitor), "mode": str(cfg.task.monitor_mode),
            "search_space": space, "scheduler": {"type": "fifo"}, "search": {"type": "random"}, "num_samples": 1}
    return spec, str(cfg.paths.root_dir)


def write_multirun_sweep(overrides: Sequence[str], root: str | Path | None = None) -> Path:
    """Write the multirun's sweep file under ``<root>/multirun/STAMP/`` (default root: the config's
    ``paths.root_dir``) and return its path."""
    spec, config_root = multirun_spec(overrides)
    folder = Path(root or config_root) / MULTIRUN_FOLDER / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"multirun-{spec['experiment']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
