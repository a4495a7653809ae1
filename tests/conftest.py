"""Shared fixtures: tiny composed configs, an isolated MLflow store per test, quiet libraries."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Quiet and offline before any of these libraries is imported by a test module.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Settings that make any experiment a few seconds on CPU.
TINY_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # Two cores are shared by tests and other work: one intra-op thread keeps timings stable.
    torch.set_num_threads(1)


def use_store_under(mp: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow (a fresh SQLite store), artifacts and run outputs at ``root``; the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("DECONVLAB_ARTIFACT_ROOT", str(root / "mlartifacts"))
    mp.setenv("DECONVLAB_OUTPUT_ROOT", str(root / "outputs"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store (and artifact root and output dir) under tmp_path."""
    return use_store_under(monkeypatch, tmp_path)


@pytest.fixture
def compose(tracking_uri: str) -> Callable[..., DictConfig]:  # noqa: F821
    """compose(*overrides, tiny=True) -> a config with tiny trainer settings and a tmp MLflow store."""
    from deconvlab.config import compose_config

    def _compose(*overrides: str, tiny: bool = True):
        return compose_config([*(TINY_TRAINER if tiny else []), *overrides])

    return _compose


def fit_untracked(cfg: DictConfig, seed: int = 0):  # noqa: F821
    """Fit the task of ``cfg`` on its data with a bare Lightning trainer (no logger, checkpoints or bar), for
    the tests that a model learns on a small setting; returns ``(data, task, trainer)``."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from deconvlab.build import build_task

    pl.seed_everything(seed, verbose=False)
    data, task = instantiate(cfg.data), build_task(cfg)
    trainer = pl.Trainer(max_epochs=cfg.trainer.max_epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return data, task, trainer


def start_local_ray() -> None:
    """A 2-CPU local Ray for tests; reuses one a previous test (or run_sweep) left running in this process.

    ``address="local"``: a cluster someone else started on this machine (``ray start``) is never joined.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             ignore_reinit_error=True)


def run_smoke_sweep(name: str, storage: Path):
    """``deconvlab sweep NAME --smoke-test`` on a local Ray that is shut down afterwards; its outcome."""
    import ray

    from deconvlab.sweep.runner import run_sweep

    start_local_ray()
    try:
        return run_sweep(name, smoke_test=True, storage_path=str(storage), quiet=True)
    finally:
        ray.shutdown()


def write_phantom_case(folder: Path, seed: int = 0, size: int = 20, affine=None) -> None:
    """A synthetic MRI phantom written as a BraTS case folder (NIfTI), with a scanner-like intensity range."""
    import nibabel as nib
    import numpy as np

    from deconvlab.data.phantom import make_phantom

    image, label = make_phantom(size, seed)
    folder.mkdir(parents=True)
    brain = np.any(image != 0, axis=0)
    affine = np.eye(4) if affine is None else affine
    for name, data in (("flair", image[0] * 120 + 400), ("t1c", image[1] * 80 + 250),
                       ("otmulticlass", label), ("brainmask", brain.astype(np.uint8))):
        dtype = np.float32 if data.dtype.kind == "f" else np.uint8
        nib.save(nib.Nifti1Image(np.asarray(data, dtype), affine), str(folder / f"{name}.nii.gz"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep Ray's exit hooks from printing a traceback after the summary.

    Seen with Ray 2.60 after tests/test_scaleout.py's node-loss test (a cluster_utils worker node killed and
    replaced mid-sweep): at interpreter exit one ``Node``'s atexit hook calls ``kill_all_processes`` on an
    object without ``all_processes`` (Ray registers the hook in ``Node.__init__`` before it sets the
    attribute, and guards other uses with ``getattr``) and prints ``AttributeError`` after pytest's summary.
    The processes are gone by then (every test shuts its cluster down); only the message is spared.
    """
    import sys

    node = sys.modules.get("ray._private.node")
    if node is None:
        return
    kill = node.Node.kill_all_processes

    def kill_if_started(self, *args, **kwargs):
        if hasattr(self, "all_processes"):
            return kill(self, *args, **kwargs)
        return None

    node.Node.kill_all_processes = kill_if_started
