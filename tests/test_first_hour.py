"""What a new user runs in the first hour (issue 26): errors that point the right way, help that helps,
and output that is the platform's own, with the summary last."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from deconvlab.cli import main
from deconvlab.errors import MissingDataError, did_you_mean

REPO = Path(__file__).resolve().parents[1]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits on its own errors and on --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_train_without_an_experiment_points_to_the_list_and_trains_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    line = _one_line_error(*_cli(capsys, "train")[::2])
    assert "experiment=NAME" in line and "deconvlab list experiments" in line
    assert list(tmp_path.iterdir()) == []  # no outputs/, no tracking store: nothing ran


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["train", "experiment=quickstar", "--cfg", "job"], "did you mean 'quickstart'?"),
    (["train", "experiment=quickstart", "optim.lrr=1e-3", "--cfg", "job"], "did you mean 'optim.lr'?"),
    (["train", "experimnt=quickstart", "--cfg", "job"], "did you mean 'experiment'?"),
    (["train", "experiment=quickstart", "model=residual_deblur_cn", "--cfg", "job"],
     "did you mean 'residual_deblur_cnn'?"),
    (["trian", "experiment=quickstart"], "did you mean 'train'?"),
    (["list", "modls"], "did you mean 'models'?"),
    (["sweep", "quickstrt"], "did you mean 'quickstart'?"),
])
def test_mistyped_names_get_a_did_you_mean(capsys, argv, suggestion):
    line = _one_line_error(*_cli(capsys, *argv)[::2])
    assert suggestion in line
    assert "choose from" not in line  # not argparse's list of every choice


def test_an_unknown_experiment_is_not_answered_with_every_name_on_one_line(capsys):
    line = _one_line_error(*_cli(capsys, "train", "experiment=zzz_nothing_like_it", "--cfg", "job")[::2])
    assert "deconvlab list experiments" in line and "quickstart" not in line


def test_did_you_mean_ignores_case_and_a_yaml_suffix():
    assert did_you_mean("QuickStart.yaml", ["quickstart", "xu_rank"]) == "did you mean 'quickstart'? "
    assert did_you_mean("completely-different", ["quickstart"]) == ""


def test_a_sweep_named_with_its_file_name_is_found():
    from deconvlab.sweep.spec import resolve_sweep_path

    assert resolve_sweep_path("quickstart_pbt.yaml") == REPO / "sweeps" / "quickstart_pbt.yaml"


def test_help_as_a_command_and_dashed_config_keys_get_pointers(capsys):
    code, out, _ = _cli(capsys, "help")
    assert code == 0 and "train" in out and "sweep" in out
    code, out, _ = _cli(capsys, "help", "train")
    assert code == 0 and "deconvlab list experiments" in out
    line = _one_line_error(*_cli(capsys, "train", "--experiment", "quickstart")[::2])
    assert "(deconvlab train)" in line and "experiment=VALUE" in line


def test_comma_lists_without_multirun_point_to_it(capsys):
    line = _one_line_error(*_cli(capsys, "train", "experiment=quickstart", "optim.lr=1e-3,1e-4", "--cfg", "job")[::2])
    assert "optim.lr=1e-3,1e-4" in line and "add -m" in line and "Ambiguous" not in line


def test_cfg_all_is_accepted(capsys):
    code, out, _ = _cli(capsys, "train", "--cfg", "all", "experiment=quickstart")
    assert code == 0 and "name: quickstart" in out


@pytest.mark.parametrize(("command", "default"), [("ui", "default: 5000"), ("report", "default: report.html")])
def test_help_states_defaults(capsys, command, default):
    code, out, _ = _cli(capsys, command, "--help")
    assert code == 0 and default in " ".join(out.split())


def test_an_empty_data_folder_names_the_data_dir_variable(capsys, tmp_path):
    line = _one_line_error(*_cli(capsys, "train", "experiment=quickstart", f"data.root={tmp_path}",
                                 f"paths.root_dir={tmp_path / 'out'}", "logger=none")[::2])
    assert "DECONVLAB_DATA_DIR" in line
    # Other missing files (a case's modality) are not about the data folder: no hint there.
    assert "DECONVLAB_DATA_DIR" not in MissingDataError("missing file flair.nii.gz", "/data/case0/x").one_line()


def test_evaluate_names_test_split_metrics_after_the_split():
    from deconvlab.evaluate import split_key

    assert split_key("val/psnr", "test") == "test/psnr"
    assert split_key("val/psnr", "val") == "val/psnr"
    assert split_key("val/dice_whole", "validation") == "val/dice_whole"


def _trial(trial_id: str, config: dict, iterations: int):
    return SimpleNamespace(trial_id=trial_id, config=config, last_result={"training_iteration": iterations})


def test_sweep_progress_prints_one_line_per_trial_event_with_the_best_so_far():
    from deconvlab.sweep.progress import TrialProgressLines

    stream = io.StringIO()
    progress = TrialProgressLines("val/psnr", "max", max_epochs=4, stream=stream)
    a, b = _trial("a_00000", {"optim.lr": 0.00123456, "model.width": 16}, 4), _trial("a_00001", {}, 1)
    progress.on_trial_start(0, [], a)
    for value in (20.0, 22.5, 21.0):  # its best (22.5), not its last (21.0), is what the leaderboard ranks
        progress.on_trial_result(0, [], a, {"val/psnr": value})
    progress.on_trial_complete(0, [], a)
    progress.on_trial_result(0, [], b, {"val/psnr": 19.0})
    progress.on_trial_complete(0, [], b)
    lines = stream.getvalue().splitlines()
    assert re.match(r"\[00:00\] trial a_00000 started: model.width=16 optim.lr=0.00123$", lines[0])
    assert lines[1].endswith("trial a_00000 finished after 4/4 epochs: best val/psnr 22.5 (best so far)")
    assert lines[2].endswith("trial a_00001 stopped early after 1/4 epochs: best val/psnr 19")


def _deconvlab(tmp_path: Path, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "DECONVLAB_ARTIFACT_ROOT": str(tmp_path / "mlartifacts")}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "deconvlab.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


STACK_CHATTER = ("litlogger", "_pytree", "GPU available", "Creating initial MLflow database tables")


def test_train_prints_its_result_not_the_stacks_chatter_unless_verbose(tmp_path):
    quick = ["train", "experiment=quickstart", "debug=smoke", "--quiet"]
    quiet = _deconvlab(tmp_path, *quick)
    assert quiet.returncode == 0, quiet.stderr
    output = quiet.stdout + quiet.stderr
    assert not [noise for noise in STACK_CHATTER if noise in output], output
    assert quiet.stdout.strip().splitlines()[-1].startswith("best checkpoint: ")
    verbose = _deconvlab(tmp_path, *quick, "--verbose")  # the filter is what hides them: they are there
    assert "litlogger" in verbose.stdout + verbose.stderr


def test_a_smoke_sweep_prints_one_line_per_trial_and_ends_with_its_summary(tmp_path):
    done = _deconvlab(tmp_path, "sweep", "quickstart", "--smoke-test", "--storage", str(tmp_path / "ray"))
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in (*STACK_CHATTER, "Experiment state snapshotting", "Token authentication", "weights_only",
                  "Checkpoint successfully created", "Trial status", "\x1b["):
        assert noise not in output, noise
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("sweep quickstart: 4 trials (ASHA, random search), 2 at a time")
    assert len([line for line in lines if re.match(r"\[\d\d:\d\d\] trial \w+ (started|finished|stopped)", line)]) == 8
    assert lines[-2].startswith("sweep parent run ")
    before_after = lines[-1].removeprefix("the best trial's before/after image (input | output | target): ")
    assert before_after != lines[-1] and Path(before_after).is_file() and before_after.endswith(".png")
    assert len(lines) < 40


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """``deconvlab list | head -1``: the closed pipe ends the command quietly, exit 0."""
    listing = subprocess.Popen([sys.executable, "-m", "deconvlab.cli", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=tmp_path)
    listing.stdout.close()  # the reader is gone before the command writes a line
    _, err = listing.communicate(timeout=60)
    assert listing.returncode == 0 and not err, err


def test_overrides_may_follow_options(capsys):
    code, out, _ = _cli(capsys, "train", "--cfg", "job", "experiment=quickstart", "--quiet", "trainer.max_epochs=7")
    assert code == 0 and "max_epochs: 7" in out
