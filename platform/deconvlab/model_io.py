"""A trained model as files, and back: an MLflow model directory that never needs unpickling.

A promoted model is saved as a standard MLflow model (``MLmodel`` with a signature and an input example
of batch 2) whose payload is the *resolved config* and the network's ``state_dict``. Loading rebuilds the
network through deconvlab's own config and model classes and reads the weights with
``torch.load(weights_only=True)``, so a model URI can never run code hidden in a pickle. The same
directory carries a ``python_function`` flavour whose loader is this module, so MLflow tools
(``mlflow.pyfunc.load_model``, ``mlflow models serve``) use the same safe path. The model carries the
deconvlab package's source (``code/deconvlab``, which MLflow puts first on ``sys.path`` when it loads) and
pins only what loading imports (``requirements.txt``), so it loads in a fresh environment without deconvlab.
MLflow's loaders run that shipped code, as they run any pyfunc model's; :func:`load_model` never imports it
(it rebuilds with the installed deconvlab), so a model from an untrusted source is safe only through it.

Model URIs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME`` (latest version),
``runs:/RUN_ID`` (a run's own best checkpoint and ``config.yaml``; a unique prefix of >= 6 characters of
the id will do) and the path of a local Lightning
checkpoint (``.ckpt``, as ``deconvlab train`` writes under ``<output_dir>/checkpoints/``). A checkpoint's
hyperparameters do not say which network or data it was trained with, so its config comes from a
``config.yaml`` given explicitly, else one next to it or in its run folder (``<output_dir>/config.yaml``,
``<output_dir>/.hydra/config.yaml``), else the tracked run whose ``paths.output_dir`` is that folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deconvlab.build import (
    TRUST_FIX,
    build_datamodule,
    build_task,
    checkpoint_model_weights,
    read_weights,
    rebuild_task,
)
from deconvlab.errors import UserError, first_line
from deconvlab.store import (
    CONFIG_FILE,
    checkpoint_artifact,
    client_for,
    find_version,
    get_run,
    looks_like_run_id,
    resolve_run_id,
    run_config,
)

FLAVOR = "deconvlab"
FORMAT_VERSION = 1
MODEL_ARTIFACT = "model"
PAYLOAD_DIR = "deconvlab_model"
WEIGHTS_FILE = "weights.pt"
# Input examples are stored as JSON inside the model: larger images are cropped to this side.
EXAMPLE_MAX_SIDE = 64


@dataclass
class LoadedModel:
    """A model rebuilt from a URI, ready to evaluate or predict.

    Attributes:
        uri: the URI it was loaded from.
        cfg: the resolved config it was trained with.
        task: the task (LightningModule) holding the network, in eval mode.
        family: the task family (restoration, segmentation, volumetric, reconstruction, localisation).
        run_id: the MLflow run that trained it.
        name, version: the registered model and version, for ``models:/`` URIs.
        input_shape: the signature's input shape (-1 = any size), when the model has one.
    """

    uri: str
    cfg: DictConfig
    task: Any
    family: str
    run_id: str | None = None
    name: str | None = None
    version: str | None = None
    input_shape: tuple[int, ...] | None = None

    @property
    def network(self) -> torch.nn.Module:
        return self.task.model


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise logger ``name`` to ``level`` for a while: library banners would interleave with our output."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


# -- saving --------------------------------------------------------------------------------------------
def example_input(task: Any, cfg: DictConfig) -> torch.Tensor:
    """A real input batch of 2 from the validation split (crops to a common size, at most 64 a side).

    Batch 2, not 1: MLflow's tooling bakes an example's batch size into some flavours (see STACK-NOTES).
    """
    samples: list[torch.Tensor] = []
    datamodule = build_datamodule(cfg.data, "validate", "the run's validation data for the model's input example")
    for batch in datamodule.val_dataloader():
        samples.extend(task.input_of(batch).unbind(0))
        if len(samples) >= 2:
            break
    if not samples:
        raise UserError("the validation split is empty", "data", "check data.root and data.split")
    samples = (samples * 2)[:2]
    sides = [min(min(s.shape[d] for s in samples), EXAMPLE_MAX_SIDE) for d in range(1, samples[0].ndim)]
    crop = (slice(None), *(slice(0, n) for n in sides))
    return torch.stack([s[crop] for s in samples]).float()


def _forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network(x)


def _keeps_any_size(network: torch.nn.Module, example: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether the network maps any spatial size to the same size (probed on the example at half size)."""
    half = example[(slice(None), slice(None), *(slice(0, max(1, n // 2)) for n in example.shape[2:]))]
    try:
        return output.shape[2:] == example.shape[2:] and _forward(network, half).shape[2:] == half.shape[2:]
    except (RuntimeError, ValueError):  # a fixed-size network (e.g. fully connected)
        return False


def _tensor_schema(shape: list[int]) -> Schema:
    return Schema([TensorSpec(np.dtype(np.float32), tuple(shape))])


def build_signature(network: torch.nn.Module, example: torch.Tensor) -> ModelSignature:
    """The tensor signature: any batch; any spatial size if the network keeps sizes, else the example's."""
    output = _forward(network, example)
    in_shape, out_shape = [-1, *example.shape[1:]], [-1, *output.shape[1:]]
    if _keeps_any_size(network, example, output):
        in_shape[2:] = out_shape[2:] = [-1] * (example.ndim - 2)
    return ModelSignature(inputs=_tensor_schema(in_shape), outputs=_tensor_schema(out_shape))


# What loading and predicting imports at module level (model_io, build, every task and model module, and the
# deconvlab modules they import), by distribution: a saved model's requirements.txt. deconvlab itself travels
# as code with the model. tests/test_servable.py holds this list to those imports.
SERVING_DISTRIBUTIONS = ("torch", "pytorch-lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy", "scipy",
                         "pillow", "pyyaml", "mlflow")
# The package folder, copied into the model as code/deconvlab.
PACKAGE_DIR = Path(__file__).resolve().parent


def pip_requirements() -> list[str]:
    """:data:`SERVING_DISTRIBUTIONS` pinned to the installed versions, without local labels (``+cpu``).

    Given explicitly: MLflow would otherwise spend seconds inferring them on every save. Without the local
    label, ``torch==2.13.0`` installs from whichever index an environment is set up with (CPU or CUDA).
    """
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in SERVING_DISTRIBUTIONS]


def save_model_dir(task: Any, cfg: DictConfig, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``task``'s network as an MLflow model directory at ``path`` (which must not exist).

    Returns:
        ``path``.
    """
    example = example_input(task, cfg)
    signature = build_signature(task.model.eval(), example)
    with tempfile.TemporaryDirectory() as folder:
        payload = Path(folder) / PAYLOAD_DIR
        payload.mkdir()
        (payload / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        # Plain tensors only: loadable with weights_only=True.
        torch.save({k: v.detach().cpu() for k, v in task.model.state_dict().items()}, payload / WEIGHTS_FILE)
        mlflow_model = Model()
        mlflow_model.add_flavor(FLAVOR, format_version=FORMAT_VERSION, family=task.family,
                                data=f"data/{PAYLOAD_DIR}", config=CONFIG_FILE, weights=WEIGHTS_FILE)
        with quiet_logger("mlflow"):
            mlflow.pyfunc.save_model(str(path), loader_module=__name__, data_path=str(payload),
                                     code_paths=[str(PACKAGE_DIR)], mlflow_model=mlflow_model, signature=signature,
                                     input_example=example.numpy(), pip_requirements=pip_requirements(),
                                     metadata=dict(metadata or {}))
    return path


# -- loading -------------------------------------------------------------------------------------------
def load_payload(payload: Path, trust: bool = False) -> tuple[DictConfig, Any]:
    """Config and task from a payload folder (``config.yaml`` + ``weights.pt``)."""
    config_path, weights_path = payload / CONFIG_FILE, payload / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"the model folder lacks {CONFIG_FILE} or {WEIGHTS_FILE}", str(payload),
                        "promote the run again")
    cfg = OmegaConf.create(config_path.read_text())
    weights = read_weights(weights_path, trust)
    return cfg, rebuild_task(cfg, weights, str(weights_path))


class _PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` returns for a deconvlab model: numpy in, network output out."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def predict(self, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return _forward(self.task.model, torch.as_tensor(np.asarray(model_input, np.float32))).numpy()


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    """MLflow's ``python_function`` loader hook: the same safe rebuild as :func:`load_model`."""
    return _PyfuncModel(load_payload(Path(data_path))[1])


MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?/?$")
# The run part may be a unique prefix of the id (resolved by deconvlab.store.resolve_run_id).
RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/.*)?$")
URI_FIX = ("use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID (deconvlab models and deconvlab runs "
           "list them) or the path of a .ckpt file")
CHECKPOINT_SUFFIX = ".ckpt"


def load_model(uri: str, tracking_uri: str | None = None, trust: bool = False,
               config: str | Path | None = None) -> LoadedModel:
    """Rebuild the model behind ``uri`` (see the module docstring for the forms).

    Args:
        uri: the model URI, or the path of a local Lightning checkpoint.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).
        trust: allow unpickling (checkpoints with Python objects, models saved by other flavours).
        config: for a local checkpoint only: the resolved ``config.yaml`` it was trained with (default:
            found next to it, or through the tracked run that wrote it).

    Raises:
        UserError: a malformed URI, an unknown name, alias, version or run, a run without checkpoint,
            a missing checkpoint file or one whose config cannot be found.
    """
    if config is not None and (MODELS_URI.match(uri) or RUNS_URI.match(uri)):
        raise UserError("--config is for a local checkpoint file only", str(config),
                        "drop it: models:/ and runs:/ URIs carry their own config")
    client = client_for(tracking_uri)
    if match := MODELS_URI.match(uri):
        return _load_version(client, uri, match, trust)
    if match := RUNS_URI.match(uri):
        return _load_run(client, match, trust)
    if Path(uri).suffix == CHECKPOINT_SUFFIX or Path(uri).is_file():
        return _load_checkpoint(client, uri, trust, config)
    if looks_like_run_id(uri):
        raise _bare_run_id(client, uri)
    raise UserError(f"unsupported model URI {uri!r}", uri, URI_FIX)


def _bare_run_id(client, text: str) -> UserError:
    """The error for a run id (or prefix) given without ``runs:/``: it names the URI meant.

    A hint rather than a guess: a model is named by a URI everywhere else (MLflow's own tools included),
    so the user learns the form once, and a bare word is never silently read as a run.
    """
    try:
        run_id = resolve_run_id(client, text)
    except UserError as exc:
        if exc.what.startswith("no run id starts with"):
            return UserError(f"unsupported model URI {text!r}, and no run id starts with {text}", text, URI_FIX)
        raise
    return UserError(f"{text!r} is not a model URI", text, f"did you mean runs:/{run_id}?")


def _load_version(client, uri: str, match: re.Match, trust: bool) -> LoadedModel:
    version = find_version(client, match["name"], alias=match["alias"], version=match["version"])
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=folder,
                                                         tracking_uri=client.tracking_uri))
        meta = Model.load(str(local / "MLmodel")) if (local / "MLmodel").is_file() else None
        if meta is not None and FLAVOR in meta.flavors:
            cfg, task = load_payload(local / meta.flavors[FLAVOR]["data"], trust)
        elif trust:
            cfg, task = _load_foreign(client, version, local)
        else:
            flavors = ", ".join(meta.flavors) if meta else "no MLmodel"
            raise UserError(f"version {version.version} of {version.name} is not a deconvlab model "
                            f"({flavors}); loading it would unpickle code", uri, TRUST_FIX)
    shape = _signature_input_shape(meta)
    return LoadedModel(uri, cfg, task, task.family, version.run_id, version.name, str(version.version),
                       shape)


def _load_foreign(client, version, local: Path) -> tuple[DictConfig, Any]:
    """A version saved by another flavour (mlflow.pytorch pickles): only with --trust."""
    # Imported here: mlflow.pytorch brings its Lightning autologging, torch._dynamo and TensorBoard (3-4 s),
    # which only this rare path needs.
    import mlflow.pytorch

    cfg = run_config(client, version.run_id)
    task = build_task(cfg)
    task.model = mlflow.pytorch.load_model(str(local))
    return cfg, task.eval()


def _signature_input_shape(meta) -> tuple[int, ...] | None:
    schema = meta.get_input_schema() if meta is not None else None
    if schema is None or not schema.is_tensor_spec():
        return None
    return tuple(schema.inputs[0].shape)


def _load_run(client, match: re.Match, trust: bool) -> LoadedModel:
    """A run's best checkpoint; ``runs:/PREFIX`` is read as ``runs:/<full id>`` (which the result names)."""
    run = get_run(client, match["run"])
    run_id = run.info.run_id
    uri = f"runs:/{run_id}{match.string[match.end('run'):]}"
    artifact = checkpoint_artifact(client, run)
    cfg = run_config(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, artifact, folder)
        weights = checkpoint_model_weights(read_weights(path, trust), f"{uri} ({artifact})")
    task = rebuild_task(cfg, weights, uri)
    return LoadedModel(uri, cfg, task, task.family, run_id)


# -- a local checkpoint ----------------------------------------------------------------------------------
CONFIG_FIX = ("pass --config FILE: the run's config.yaml (an artifact of its MLflow run, or "
              "deconvlab train <its overrides> --cfg job --resolve > FILE)")


def _load_checkpoint(client, uri: str, trust: bool, config: str | Path | None) -> LoadedModel:
    """A Lightning checkpoint on disk, rebuilt from the config it was trained with."""
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"no checkpoint file {path}", uri, "check the path (deconvlab train prints it)")
    cfg, run_id = _checkpoint_config(client, path, config)
    weights = checkpoint_model_weights(read_weights(path, trust), uri)
    task = rebuild_task(cfg, weights, uri)
    return LoadedModel(uri, cfg, task, task.family, run_id)


def _checkpoint_config(client, path: Path, config: str | Path | None) -> tuple[DictConfig, str | None]:
    """The checkpoint's config and the run that wrote it (None for an untracked run or a ``--config`` file).

    Every run writes its resolved ``config.yaml`` into its output folder, tracked or not; a tracked run's
    id is still looked up, so evaluations of its checkpoint keep their lineage."""
    if config is not None:
        return _read_config(Path(config)), None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    run_id = _run_with_output_dir(client, run_dir)
    for candidate in (path.parent / CONFIG_FILE, run_dir / CONFIG_FILE, run_dir / ".hydra" / CONFIG_FILE):
        if candidate.is_file():
            return _read_config(candidate), run_id
    if run_id is None:
        raise UserError(f"no {CONFIG_FILE} for checkpoint {path.name}: none next to it or in {run_dir}, and no "
                        f"tracked run with paths.output_dir={run_dir}", str(path), CONFIG_FIX)
    return run_config(client, run_id), run_id


def _read_config(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"no config file {path}", str(path), CONFIG_FIX)
    try:
        cfg = OmegaConf.create(path.read_text())
        OmegaConf.resolve(cfg)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise UserError(f"cannot read config {path.name}: {first_line(exc)}", str(path), CONFIG_FIX) from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "task" not in cfg:
        raise UserError(f"{path.name} is not a deconvlab run config (no model or task section)", str(path),
                        CONFIG_FIX)
    return cfg


def _run_with_output_dir(client, run_dir: Path) -> str | None:
    """The tracked run whose logged ``paths.output_dir`` is ``run_dir`` (relative paths as seen from here).

    ``deconvlab train`` logs every config key as a param; the output folder's last part is a timestamp to
    the microsecond, so matching on the last two parts and then on the resolved path is unambiguous.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    pattern = f"%{run_dir.parent.name}/{run_dir.name}".replace("'", "")
    runs = client.search_runs(experiments, f"params.`paths.output_dir` LIKE '{pattern}'")
    target = run_dir.resolve()
    same = [r for r in runs if Path(r.data.params["paths.output_dir"]).resolve() == target]
    chosen = same or runs
    return chosen[0].info.run_id if len(chosen) == 1 else None
