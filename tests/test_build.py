"""The build floor: one data-module builder with one error policy, and the task family read off a config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from deconvlab.build import build_datamodule, build_task, task_family
from deconvlab.errors import MissingDataError, UserError
from deconvlab.predict import PREDICTORS
from deconvlab.tasks import localisation, reconstruction, restoration, segmentation, volumetric
from deconvlab.tasks.base import BaseTask

TASK_MODULES = (localisation, reconstruction, restoration, segmentation, volumetric)


def test_a_missing_data_folder_is_the_data_modules_own_error(compose, tmp_path):
    cfg = compose("experiment=fcn8s_camvid", f"data.root={tmp_path / 'absent'}")
    with pytest.raises(MissingDataError) as info:
        build_datamodule(cfg.data, "validate")
    assert str(tmp_path / "absent") in str(info.value)


def test_any_other_failure_to_load_data_is_one_user_error_naming_data_root(compose):
    data = OmegaConf.to_container(compose("experiment=quickstart").data, resolve=True)
    data["degradation"]["noise_sigma"] = -1.0  # a plain ValueError deep inside the data module
    with pytest.raises(UserError) as info:
        build_datamodule(data, "fit", "the evaluation data")
    assert info.value.what.startswith("cannot load the evaluation data:")
    assert info.value.where == f"data.root={data.get('root')}" and "data.root" in info.value.fix


def test_the_task_family_comes_from_the_task_class_or_the_models_catalogue_entry(compose):
    assert task_family(compose("experiment=quickstart")) == "restoration"
    assert task_family(compose("experiment=deepmedic_p9_ctx3_phantom")) == "volumetric"
    # A task factory: the family of the model it is given (the task it then builds agrees).
    for model, family in (("localiser", "localisation"), ("fcn8s", "segmentation")):
        cfg = compose("experiment=localisation_vs_segmentation_shapes", f"model={model}")
        assert task_family(cfg) == family == build_task(cfg).family


def test_an_unknown_task_is_refused(compose):
    cfg = compose("experiment=quickstart")
    cfg.task._target_ = "deconvlab.tasks.nowhere.Task"
    with pytest.raises(UserError, match="unknown task"):
        task_family(cfg)


def test_every_task_family_has_a_predictor():
    families = {cls.family for cls in _all_subclasses(BaseTask)}
    assert len(families) == len(TASK_MODULES)
    assert families == set(PREDICTORS)
    assert {p.reads for p in PREDICTORS.values()} == {"image", "nifti"}


def _all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_all_subclasses(direct)}}
