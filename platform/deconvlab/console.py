"""What deconvlab prints: its own lines, not the stack's tips, banners and deprecation notices.

Lightning, MLflow, Ray and torch each print a few lines per run that say nothing about the run (a tip to
install a cloud logger, "GPU available: False", a deprecation inside Lightning's own code, database
migrations). A sweep prints them once per trial, so the leaderboard scrolls away under them. By default
they are filtered; ``deconvlab --verbose`` (or ``--debug``) keeps everything.

The filters are process-wide (logging levels and warning filters), so :func:`quiet_third_party` is called
by the CLI before a command runs and again inside every sweep trial, which runs in a Ray worker process of
its own.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
# Progress bars for long preparation steps; `--quiet` turns them off (set_progress(False)).
_progress_enabled = True

# Loggers whose INFO lines are chatter: "GPU available", the litlogger tip, "`Trainer.fit` stopped",
# "Creating initial MLflow database tables". Their warnings and errors still show.
CHATTY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                  "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "pytorch_lightning.accelerators", "mlflow.store.db.utils", "alembic.runtime.migration",
                  "mlflow.tracking.fluent", "mlflow.models.model")
# Warnings raised inside the stack's own code about the stack's own code: nothing a user can act on.
STACK_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",          # Lightning's _pytree on torch >= 2.10
    r".*weights_only.*",                               # Lightning/Ray loading their own checkpoints
    r".*Experiment state snapshotting.*",              # Ray Tune: the local experiment folder is fine here
    r".*does not have many workers which may be a bottleneck.*",  # small data sets load in the main process
    r".*The '(val|train)_dataloader' does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Found keys that are not in the model state dict.*",
    r".*torch.distributed.reduce_op.*",
)
# Banners logged as warnings: Ray's "Token authentication is enabled for this Ray cluster" on every local
# start (the token is what infra/ sets up on purpose; errors about it still show).
BANNER_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def quiet_third_party(verbose: bool = False) -> None:
    """Filter the stack's chatter in this process (unless ``verbose``): INFO of chatty loggers, the
    stack's deprecation and future warnings, startup banners."""
    if verbose:
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in STACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in BANNER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal: colour and live tables only then."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())



def set_progress(enabled: bool) -> None:
    """Turn progress bars of long preparation steps on or off for this process (``--quiet``: off)."""
    global _progress_enabled
    _progress_enabled = enabled


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items``, with a progress bar on stderr while they are consumed (decoding volumes, scanning masks,
    validating a sweep, measuring costs, checking data).

    The bar shows only on an interactive terminal and not under ``--quiet``: logs, CI and sweep trials (Ray
    workers have no terminal) get nothing. It is transient: it disappears when done, the output stays clean.
    """
    if not (_progress_enabled and is_terminal(sys.stderr)):
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, total=total, console=Console(stderr=True), transient=True)
