"""Composing Hydra configs from ``conf/``, with errors a user can act on.

One function, :func:`compose_config`, serves ``deconvlab train``, sweep trials and tests, so a trial
gets exactly the config a single run with the same overrides would get.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from deconvlab.errors import UserError, choose_from, did_you_mean, first_line

PRIMARY_CONFIG = "train"
# Groups with a listing command: their error points to it instead of printing dozens of names on one line.
LISTED_GROUPS = {"experiment": "deconvlab list experiments", "model": "deconvlab list models",
                 "data": "deconvlab list data"}


def conf_dir() -> Path:
    """The ``conf/`` folder: ``DECONVLAB_CONF_DIR``, else the checkout this package lives in, else ./conf."""
    candidates = [os.environ.get("DECONVLAB_CONF_DIR"), Path(__file__).resolve().parents[2] / "conf",
                  Path.cwd() / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / f"{PRIMARY_CONFIG}.yaml").is_file():
            return Path(candidate).resolve()
    raise UserError("cannot find the config folder conf/", "DECONVLAB_CONF_DIR",
                    "run from the deconvlab checkout or set DECONVLAB_CONF_DIR to its conf/ folder")


def project_root() -> Path:
    """The checkout holding ``conf/`` and ``sweeps/``."""
    return conf_dir().parent


# `${project_root:}` in configs: paths next to the checkout (e.g. ../shared/data) whatever the cwd.
OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)


def group_options(group: str) -> list[str]:
    """Names available in config group ``group`` (e.g. the experiments)."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir())


def _split_override(override: str) -> tuple[str, str] | None:
    if "=" not in override:
        return None
    key, value = override.split("=", 1)
    return key.lstrip("+~").strip(), value.strip()


def _check_group_choices(overrides: list[str]) -> None:
    groups = set(config_groups())
    for override in overrides:
        parsed = _split_override(override)
        if parsed is None:
            raise UserError(f"override {override!r} is not of the form key=value", override,
                            "write overrides like experiment=quickstart trainer.max_epochs=3")
        key, value = parsed
        # A group takes one option, or a list of them: callbacks=[early_stopping,lr_monitor].
        options = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
        for option in (o.strip() for o in options):
            if key in groups and option not in ("null", "") and option not in group_options(key):
                raise UserError(f"unknown {key} {option!r}", f"conf/{key}/",
                                choose_from(option, group_options(key), LISTED_GROUPS.get(key, "")))


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "")


def _check_override_types(cfg: DictConfig, base: DictConfig, overrides: list[str]) -> None:
    """A value whose type differs from the composed default (e.g. ``trainer.max_epochs=abc``) is an error."""
    for override in overrides:
        key, _ = _split_override(override) or ("", "")
        old = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        new = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if old is None or new is None or isinstance(old, (DictConfig, list)) or type(old) is type(new):
            continue
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            continue
        raise UserError(f"{key}={new!r} has the wrong type", key, f"expected {_type_name(old)} like {old!r}")


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=PRIMARY_CONFIG, overrides=overrides)


def _sibling_keys(key: str, overrides: list[str]) -> list[str]:
    """The keys next to a mistyped ``key`` (``optim.lrr`` -> every ``optim.*``; top level: keys and groups)."""
    group_overrides = [o for o in overrides if (_split_override(o) or ("", ""))[0] in config_groups()]
    try:
        base = _compose(group_overrides)
    except HydraException:
        return []
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(base, parent, default=None) if parent else base
    if not isinstance(node, DictConfig):
        return []
    prefix = f"{parent}." if parent else ""
    return [f"{prefix}{name}" for name in node] + ([] if parent else config_groups())


def _explain(exc: HydraException, overrides: list[str]) -> UserError:
    message = first_line(exc, 1000)
    if "not in struct" in str(exc) or "Could not override" in str(exc) or "Key '" in str(exc):
        key = message.split("'")[1] if "'" in message else message
        full_key = next((k for k, _ in filter(None, map(_split_override, overrides)) if k.endswith(key)), key)
        return UserError(f"unknown config key {full_key!r}", full_key,
                         f"{did_you_mean(full_key, _sibling_keys(full_key, overrides))}check the spelling "
                         "(deconvlab train --cfg job shows the config), or add it with +key=value")
    if "Ambiguous value" in message:  # Hydra's multirun list (a,b) given to a single run
        listed = next((o for o in overrides if "," in o), " ".join(overrides))
        return UserError(f"{listed!r} lists several values: one run takes one value", listed,
                         "add -m to run the grid as a sweep (deconvlab train -m ...), or write a sweep file "
                         "with e.g. optim.lr: grid([1e-3, 1e-4]) and run deconvlab sweep FILE")
    return UserError(f"invalid config: {message}", " ".join(overrides), "fix the override or config file")


def require_experiment(overrides: Sequence[str], where: str, example: str) -> None:
    """Refuse overrides that pick no experiment: conf/train.yaml's bare defaults are not a run anyone means.

    ``experiment=null`` is the explicit way to compose the groups by hand.

    Raises:
        UserError: no ``experiment=`` override, with ``example`` as what to write.
    """
    if not any(o.lstrip("+").startswith("experiment=") for o in overrides):
        raise UserError("no experiment given", where,
                        f"pick one with experiment=NAME, e.g. {example} (deconvlab list experiments shows them; "
                        "experiment=null composes conf/train.yaml by hand)")


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/train.yaml`` with Hydra overrides, validating names, keys and types.

    Raises:
        UserError: unknown group option (listing the valid ones), unknown key, or a wrongly typed value.
    """
    overrides = list(overrides)
    _check_group_choices(overrides)
    try:
        cfg = _compose(overrides)
    except HydraException as exc:
        raise _explain(exc, overrides) from None
    group_overrides = [o for o in overrides if (_split_override(o) or ("", ""))[0] in config_groups()]
    base = _compose(group_overrides) if len(group_overrides) < len(overrides) else cfg
    _check_override_types(cfg, base, overrides)
    # Recorded so a run (and a promoted model) can be recomposed, e.g. with another data split.
    with open_dict(cfg):
        cfg.overrides = overrides
    return cfg
