"""deconvlab from Python: the CLI's verbs as functions, returning results instead of printing them.

Importing this module loads torch, Lightning, MLflow and Ray Tune (seconds); ``import deconvlab`` alone
does not. Every function raises :class:`deconvlab.errors.UserError` for input a user can fix, with the
one-line message the CLI prints.

Example::

    import deconvlab.api as dl

    run = dl.train(["experiment=quickstart", "trainer.max_epochs=3"])
    print(run.run_id, run.metrics["val/psnr"], run.best_checkpoint)
    sweep = dl.sweep("quickstart", smoke_test=True)
    print(sweep.leaderboard.head())            # one row per trial (per config with repeats), best first
    print(sweep.results.get_best_result())     # Ray Tune's ResultGrid
    model = dl.load_model("models:/deblur@champion")
    restored = model.task.model(blurred_batch)   # a plain nn.Module, in eval mode
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pytorch_lightning import Callback

from deconvlab.compare import Comparison
from deconvlab.compare import compare as _compare
from deconvlab.config import compose_config, require_experiment
from deconvlab.evaluate import Evaluation
from deconvlab.evaluate import evaluate as _evaluate
from deconvlab.model_io import LoadedModel
from deconvlab.model_io import load_model as _load_model
from deconvlab.predict import predict as _predict
from deconvlab.promote import Promotion
from deconvlab.promote import promote as _promote
from deconvlab.sweep.dry_run import SweepPlan, plan_sweep
from deconvlab.sweep.runner import SweepOutcome, run_sweep
from deconvlab.train import TrainResult, rerun_config
from deconvlab.train import train as _train

__all__ = ["compare", "evaluate", "load_model", "plan_sweep", "predict", "promote", "sweep", "train",
           "Comparison", "Evaluation", "LoadedModel", "Promotion", "SweepOutcome", "SweepPlan", "TrainResult"]


def train(overrides: Sequence[str] = (), *, from_run: str | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train one run, as ``deconvlab train OVERRIDES`` does (tracked unless ``logger=none``).

    Args:
        overrides: Hydra overrides; ``experiment=NAME`` is required unless ``from_run`` is given.
        from_run: a tracked run (or sweep trial) id to train again from its logged config; ``overrides``
            apply on top of it.
        callbacks: extra Lightning callbacks, next to the platform's own.

    Returns:
        The run id, final and best metrics, the best checkpoint path.
    """
    overrides = list(overrides)
    if from_run:
        cfg, tags = rerun_config(from_run, overrides)
    else:
        require_experiment(overrides, "deconvlab.api.train", "dl.train(['experiment=quickstart'])")
        cfg, tags = compose_config(overrides), {}
    return _train(cfg, callbacks=callbacks, tags=tags)


def sweep(name_or_path: str, overrides: Sequence[str] = (), *, smoke_test: bool = False,
          address: str | None = None, storage: str | None = None, resume: bool = False,
          quiet: bool = True) -> SweepOutcome:
    """Run a sweep, as ``deconvlab sweep`` does; returns the leaderboard and Ray Tune's ResultGrid.

    Args:
        name_or_path: a sweep under ``sweeps/`` or a sweep YAML file.
        overrides: Hydra overrides for every trial.
        smoke_test: the sweep's ``smoke_test`` block (tiny data, few trials).
        address: a Ray cluster (``auto``, ``HOST:PORT``); None starts a local one.
        storage: Ray's storage path (default ``./ray_results``).
        resume: continue the newest interrupted run of this sweep.
        quiet: no progress lines or leaderboard on stdout (the default from Python).
    """
    return run_sweep(name_or_path, overrides, address=address, smoke_test=smoke_test, storage_path=storage,
                     quiet=quiet, resume=resume)


def evaluate(uri: str, overrides: Sequence[str] = (), *, tracking_uri: str | None = None, trust: bool = False,
             log: bool = True, per_item: str | Path | None = None, config: str | Path | None = None) -> Evaluation:
    """A model's metrics on its validation split or on data chosen by overrides (see ``deconvlab evaluate``)."""
    return _evaluate(uri, overrides, tracking_uri=tracking_uri, trust=trust, log=log, per_item=per_item,
                     config=config)


def compare(model_a: str, model_b: str, overrides: Sequence[str] = (), *, metric: str | None = None,
            tracking_uri: str | None = None, trust: bool = False, log: bool = True) -> Comparison:
    """Two models on the same items: paired difference, 95 % CI, Wilcoxon p (see ``deconvlab compare``)."""
    return _compare(model_a, model_b, overrides, metric=metric, tracking_uri=tracking_uri, trust=trust, log=log)


def load_model(uri: str, *, tracking_uri: str | None = None, trust: bool = False,
               config: str | Path | None = None) -> LoadedModel:
    """Rebuild a model from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID`` or a ``.ckpt``.

    Returns:
        The task (``.task``; its network is ``.task.model``, in eval mode), its resolved config (``.cfg``)
        and where it came from.
    """
    return _load_model(uri, tracking_uri, trust, config)


def promote(source: str, name: str, *, metric: str | None = None, mode: str | None = None,
            alias: str = "champion", force: bool = False, tracking_uri: str | None = None) -> Promotion:
    """Register the best checkpoint of a sweep or run; move ``alias`` if it is better (``deconvlab promote``)."""
    return _promote(source, name, metric=metric, mode=mode, alias=alias, force=force, tracking_uri=tracking_uri)


def predict(uri: str, inputs: Sequence[str | Path], output: str | Path, *, tracking_uri: str | None = None,
            trust: bool = False, say: Callable[[str], None] | None = None, tile: int | None = None) -> list[Path]:
    """Apply a model to files (images, MRI case folders, NIfTI volumes), all or nothing; returns the files
    written (``deconvlab predict``). ``say`` gets the lines on how inputs were read (e.g. ``print``); inputs
    with a side above ``tile`` run in tiles (see ``deconvlab predict --tile``)."""
    return _predict(uri, [str(p) for p in inputs], str(output), tracking_uri=tracking_uri, trust=trust, say=say,
                    tile=tile)
