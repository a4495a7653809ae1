"""The model catalogue: one entry per conf/model file, and a forward and backward pass over every entry
(the timm habit)."""

import importlib
import pkgutil

import pytest
import torch

import deconvlab.tasks
from deconvlab.cli import main
from deconvlab.config import compose_config, group_options
from deconvlab.models import get_model_spec, list_models, register_model
from deconvlab.tasks.base import BaseTask

SPECS = list_models()
CONF_MODELS = group_options("model")


def _task_classes() -> list[type[BaseTask]]:
    """Every task class of deconvlab.tasks (each module imported, then BaseTask's subclasses walked)."""
    for info in pkgutil.iter_modules(deconvlab.tasks.__path__):
        importlib.import_module(f"deconvlab.tasks.{info.name}")
    found, todo = [], [BaseTask]
    while todo:
        subclasses = [c for c in todo.pop().__subclasses__() if c.__module__.startswith("deconvlab.tasks.")]
        found += subclasses
        todo += subclasses
    return found


def test_catalogue_and_conf_model_files_name_the_same_models():
    assert [s.name for s in SPECS] == CONF_MODELS  # both sorted: every entry has a file and vice versa
    assert len(CONF_MODELS) >= 23
    with pytest.raises(KeyError, match="catalogue models"):
        get_model_spec("no_such_model")


def test_a_name_registered_twice_or_a_builder_that_hides_its_class_is_refused():
    with pytest.raises(ValueError, match="'fcn8s' is registered twice"):
        register_model("fcn8s", "segmentation", (3, 8, 8))(torch.nn.Identity)

    def unannotated(num_classes):
        return torch.nn.Identity()

    with pytest.raises(TypeError, match="return annotation"):
        register_model("unannotated", "segmentation", (3, 8, 8))(unannotated)
    assert "unannotated" not in [s.name for s in list_models()]


@pytest.mark.parametrize("name", CONF_MODELS)
def test_conf_model_file_is_built_by_its_catalogue_entry(name):
    # What `model=NAME` builds is the catalogue entry NAME's builder, so the list and the way a model is
    # built cannot drift apart.
    spec = get_model_spec(name)
    assert compose_config([f"model={name}"]).model._target_ == spec.target


def test_cli_lists_the_catalogue_name_family_and_builder(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "models:"
    assert [line.split() for line in out[1:]] == [[s.name, s.family, s.target] for s in SPECS]


def test_catalogue_families_are_the_task_classes_families():
    classes = _task_classes()
    assert {c.__name__ for c in classes} >= {"RestorationTask", "SegmentationTask", "VolumetricSegmentationTask",
                                            "ReconstructionTask", "LocalisationTask"}
    families = {c.family for c in classes}
    assert families == {"restoration", "segmentation", "volumetric", "reconstruction", "localisation"}
    assert {s.family for s in SPECS} == families  # every family has a model, every model a family
    assert {s.name for s in list_models("volumetric")} >= {"deepmedic", "deepmedic_p7", "tiny_volume_net"}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_forward_backward(spec):
    torch.manual_seed(0)
    model = spec.build_tiny()
    assert type(model) is spec.model_class
    x = torch.rand(2, *spec.example_shape, requires_grad=False)
    out = model(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert not grads or any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_source_listing_is_the_imported_catalogue():
    """`deconvlab list models` reads the decorators' literals instead of importing torch: the same entries."""
    from deconvlab.model_list import listed_models

    assert [(m.name, m.family, m.target) for m in listed_models()] == \
        sorted((s.name, s.family, s.target) for s in list_models())
