"""A tiny model registry, so tests and the CLI can enumerate every model.

Models are built from Hydra ``_target_`` configs like everything else; the registry only records, per
model, which task it serves and a tiny example input so that a single parametrised test can run a
forward and backward pass over all of them (the timm habit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    Attributes:
        name: registry name (the class name in snake case unless given).
        builder: the class or factory function.
        task: the task family it serves: restoration, segmentation, volumetric, reconstruction, ...
        example_shape: shape of one example input without the batch dimension.
        tiny_kwargs: constructor arguments that make a small, fast instance for tests.
    """

    name: str
    builder: Callable[..., nn.Module]
    task: str
    example_shape: tuple[int, ...]
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)

    def build_tiny(self) -> nn.Module:
        return self.builder(**self.tiny_kwargs)


_REGISTRY: dict[str, ModelSpec] = {}


def _snake_case(name: str) -> str:
    out = [name[0].lower()]
    for prev, ch in zip(name, name[1:], strict=False):
        if ch.isupper() and (prev.islower() or prev.isdigit()):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def register_model(
    task: str,
    example_shape: tuple[int, ...],
    tiny_kwargs: dict[str, Any] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator that records a model in the registry.

    Args:
        task: the task family the model serves.
        example_shape: one input's shape without batch, e.g. ``(1, 32, 32)``.
        tiny_kwargs: constructor arguments for a small instance used by tests.
        name: registry name; defaults to the snake-cased class or function name.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or _snake_case(builder.__name__)
        if key in _REGISTRY and _REGISTRY[key].builder is not builder:
            raise ValueError(f"model name {key!r} is registered twice")
        _REGISTRY[key] = ModelSpec(key, builder, task, tuple(example_shape), dict(tiny_kwargs or {}))
        return builder

    return decorate


def list_models(task: str | None = None) -> list[ModelSpec]:
    """All registered models (importing every model module first), optionally for one task."""
    _import_all_model_modules()
    return sorted((s for s in _REGISTRY.values() if task in (None, s.task)), key=lambda s: s.name)


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; a KeyError that lists the valid names otherwise."""
    _import_all_model_modules()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _import_all_model_modules() -> None:
    import importlib
    import pkgutil

    import deconvlab.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")
