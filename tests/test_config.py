"""Composing configs: every experiment composes, and bad input gets one actionable line."""

import pytest

from deconvlab.cli import main
from deconvlab.config import compose_config, group_options
from deconvlab.errors import UserError


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_builds_a_task_of_its_models_family_that_logs_its_monitor(experiment):
    """Catches an experiment that pairs a model with another family's task (a segmenter under the
    restoration task), monitors a key its task never logs (checkpoints and sweeps would rank on nothing),
    or whose network has nothing to train (train() would only validate it)."""
    from deconvlab.build import build_task
    from deconvlab.models import list_models

    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name and cfg.task._target_.startswith("deconvlab.tasks.")
    task = build_task(cfg)
    (spec,) = [s for s in list_models() if s.model_class is type(task.model) and s.target == cfg.model._target_]
    assert task.family == spec.family
    assert task.monitor in task.metric_names()
    if spec.name != "wiener":  # the classical baseline may have nothing to learn
        assert sum(p.numel() for p in task.model.parameters() if p.requires_grad) > 0


def test_unknown_experiment_points_to_the_listing_and_the_closest_name():
    with pytest.raises(UserError) as info:
        compose_config(["experiment=does_not_exist"])
    assert "deconvlab list experiments" in info.value.fix and "conf/experiment" in info.value.where
    with pytest.raises(UserError) as info:
        compose_config(["experiment=quickstrat"])
    assert "did you mean 'quickstart'?" in info.value.fix


def test_unknown_key_and_wrong_type_are_user_errors():
    with pytest.raises(UserError, match="unknown config key 'trainer.max_epoch'"):
        compose_config(["trainer.max_epoch=3"])
    with pytest.raises(UserError, match="wrong type"):
        compose_config(["trainer.max_epochs=abc"])
    # An int where a float is expected is fine, as is a new key added with '+'.
    cfg = compose_config(["optim.lr=1", "+extra.note=hello"])
    assert cfg.optim.lr == 1 and cfg.extra.note == "hello"


@pytest.mark.parametrize("argv", [
    ["train", "experiment=nope"], ["train", "model=nope"], ["train", "trainer.nope=1"],
    ["train", "trainer.max_epochs=many"], ["train", "not-an-override"],
])
def test_cli_bad_input_is_one_line_exit_2_and_no_run(argv, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    experiments = MlflowClient(tracking_uri).search_experiments()
    assert not MlflowClient(tracking_uri).search_runs([e.experiment_id for e in experiments])


def test_cli_lists_kinds_one_name_per_line(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "experiments:" and "  quickstart" in out
    assert {"models:", "data:", "sweeps:"} <= set(out)


def test_cli_prints_composed_config(capsys):
    assert main(["train", "--cfg", "job", "experiment=quickstart", "trainer.max_epochs=7"]) == 0
    out = capsys.readouterr().out
    assert "name: quickstart" in out and "max_epochs: 7" in out


def test_cli_quiet_turns_progress_bars_off(capsys):
    assert main(["train", "--quiet", "--cfg", "job", "experiment=quickstart"]) == 0
    assert "enable_progress_bar: false" in capsys.readouterr().out
