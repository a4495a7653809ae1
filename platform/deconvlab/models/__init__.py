"""Plain ``nn.Module``s, one file per model family. See :mod:`deconvlab.models.registry`."""

from deconvlab.models.registry import ModelSpec, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "get_model_spec", "list_models", "register_model"]
