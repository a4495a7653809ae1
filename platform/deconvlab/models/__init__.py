"""Plain ``nn.Module``s, one file per model family, and the catalogue that lists them.

Every model module is imported here, before the catalogue's look-ups are re-exported: whichever of
``deconvlab.models``' modules is imported first, Python runs this file first, so :func:`list_models`
always sees every model (see :mod:`deconvlab.models.catalogue`).
"""

from deconvlab.models import (  # noqa: F401  (imported to register their models)
    autoencoder,
    deconvnet,
    farabet,
    fcn,
    localisation,
    mri,
    patchnet,
    simple,
    wiener,
    xu,
)
from deconvlab.models.catalogue import ModelSpec, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "get_model_spec", "list_models", "register_model"]
