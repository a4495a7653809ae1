"""The model catalogue: one entry per ``conf/model/NAME.yaml``, registered under that NAME.

An entry's builder (a class, or a function for each configuration of a class that has several, as
timm does) is what the conf file's ``_target_`` names, so the list of models and the way they are built
cannot disagree (``tests/test_models.py`` checks both directions). Each entry also records its task
family, in the vocabulary of the task classes' ``family`` attribute, and a tiny example input so that
one parametrised test runs a forward and backward pass over every model.

This module imports no model module (they import :func:`register_model` from here); importing
:mod:`deconvlab.models`, which Python does before any of its submodules, registers all of them.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry.

    Attributes:
        name: the entry's name, the stem of its ``conf/model`` file.
        builder: the class or function that builds the model (the conf file's ``_target_``).
        family: the task family it serves: restoration, segmentation, volumetric, reconstruction,
            localisation (the ``family`` of a :mod:`deconvlab.tasks` class).
        model_class: the ``nn.Module`` class the builder returns.
        example_shape: shape of one example input without the batch dimension.
        tiny_kwargs: builder arguments that make a small, fast instance for tests.
    """

    name: str
    builder: Builder
    family: str
    model_class: type[nn.Module]
    example_shape: tuple[int, ...]
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The builder's import path, as a conf file's ``_target_`` spells it."""
        return f"{self.builder.__module__}.{self.builder.__qualname__}"

    def build_tiny(self) -> nn.Module:
        return self.builder(**self.tiny_kwargs)


_CATALOGUE: dict[str, ModelSpec] = {}


def _built_class(builder: Builder) -> type[nn.Module]:
    """The class a builder makes: itself, or a builder function's return annotation."""
    if isinstance(builder, type):
        return builder
    built = typing.get_type_hints(builder).get("return")
    if not (isinstance(built, type) and issubclass(built, nn.Module)):
        raise TypeError(f"model builder {builder.__qualname__} needs a return annotation naming the "
                        f"nn.Module class it builds, got {built!r}")
    return built


def register_model(
    name: str,
    family: str,
    example_shape: tuple[int, ...],
    tiny_kwargs: dict[str, Any] | None = None,
) -> Callable[[Builder], Builder]:
    """Class/function decorator that adds a model builder to the catalogue.

    Args:
        name: the entry's name: the stem of the ``conf/model`` file whose ``_target_`` is this builder.
        family: the task family the model serves (a task class's ``family``).
        example_shape: one input's shape without batch, e.g. ``(1, 32, 32)``.
        tiny_kwargs: builder arguments for a small instance used by tests.

    Returns:
        The decorator; it returns the builder unchanged.
    """

    def decorate(builder: Builder) -> Builder:
        if name in _CATALOGUE and _CATALOGUE[name].builder is not builder:
            raise ValueError(f"model name {name!r} is registered twice: {_CATALOGUE[name].target} and "
                             f"{builder.__module__}.{builder.__qualname__}")
        _CATALOGUE[name] = ModelSpec(name, builder, family, _built_class(builder), tuple(example_shape),
                                     dict(tiny_kwargs or {}))
        return builder

    return decorate


def list_models(family: str | None = None) -> list[ModelSpec]:
    """Every catalogue entry, sorted by name, optionally only those of one task family."""
    return sorted((s for s in _CATALOGUE.values() if family in (None, s.family)), key=lambda s: s.name)


def get_model_spec(name: str) -> ModelSpec:
    """The entry registered under ``name``.

    Raises:
        KeyError: no such entry; the message lists the valid names.
    """
    if name not in _CATALOGUE:
        raise KeyError(f"unknown model {name!r}; catalogue models (conf/model): {', '.join(sorted(_CATALOGUE))}")
    return _CATALOGUE[name]
