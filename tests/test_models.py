"""Every registered model: a forward and backward pass on a tiny input (the timm habit)."""

import pytest
import torch

from deconvlab.models import get_model_spec, list_models

SPECS = list_models()


def test_registry_knows_the_baselines_and_rejects_unknown_names():
    names = {s.name for s in SPECS}
    assert {"residual_deblur_cnn", "tiny_encoder_decoder", "tiny_volume_net"} <= names
    with pytest.raises(KeyError, match="registered models"):
        get_model_spec("no_such_model")


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_forward_backward(spec):
    torch.manual_seed(0)
    model = spec.build_tiny()
    x = torch.rand(2, *spec.example_shape, requires_grad=False)
    out = model(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert not grads or any(g is not None and g.abs().sum() > 0 for g in grads)
