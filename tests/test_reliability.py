"""Bad input and faults end to end through the CLI: one line, the right exit code, nothing left behind.

After every failure: no MLflow run is left RUNNING (a run that opened says why in its ``error`` tag), the
model registry is unchanged and no partial output file (checkpoint, prediction) is left.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient

from conftest import TINY_TRAINER, write_phantom_case
from deconvlab.cli import main
from deconvlab.errors import DataError, MissingDataError, UserError
from deconvlab.tracking import release_interrupted_reads, tracked_run
from deconvlab.train import train

QUICK = ["experiment=quickstart", "data.samples_per_epoch=32", "data.max_eval_size=32", *TINY_TRAINER]


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating MLflow's tables takes seconds, once is enough."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def tracking_uri(module_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Overrides conftest's: the module's store, and outputs under this test's tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store)
    monkeypatch.setenv("DECONVLAB_ARTIFACT_ROOT", str(Path(module_store.removeprefix("sqlite:///")).parent / "art"))
    monkeypatch.setenv("DECONVLAB_OUTPUT_ROOT", str(tmp_path / "outputs"))
    return module_store


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Exit code and the stderr lines of ``deconvlab argv`` run in this process."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def all_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def assert_nothing_left_behind(tracking_uri: str, tmp_path: Path, registered: tuple[str, ...] = (),
                               complete_checkpoints: bool = False) -> None:
    """No run RUNNING, failed runs tagged with why, registry as before, no checkpoint or output file
    (or, with ``complete_checkpoints``, only checkpoints that load whole)."""
    for run in all_runs(tracking_uri):
        assert run.info.status != "RUNNING", run.info.run_id
        if run.info.status == "FAILED":
            assert run.data.tags.get("error"), run.info.run_id
    names = tuple(sorted(m.name for m in MlflowClient(tracking_uri, registry_uri=tracking_uri)
                         .search_registered_models()))
    assert names == registered
    checkpoints = list((tmp_path / "outputs").rglob("*.ckpt"))
    if complete_checkpoints:
        import torch

        for path in checkpoints:
            assert "state_dict" in torch.load(path, weights_only=True), path
    else:
        assert not checkpoints
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file() and not p.name.endswith(".ckpt")
                and "samples" not in p.parts and p.name != "patch_plan.json"]


def error_line(err: list[str], last: bool = True) -> str:
    """The one ``error:`` line, last on stderr (libraries may log INFO lines before it), no traceback.

    ``last=False``: Ray forwards its workers' log lines asynchronously, some after the driver's line.
    """
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and (errors == err[-1:] or not last), err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def assert_one_user_error_line(code: int, err: list[str], *fragments: str) -> None:
    assert code == 2, err
    line = error_line(err)
    for fragment in fragments:
        assert fragment in line, line


# -- the error style ---------------------------------------------------------------------------------------
def test_user_error_line_has_what_where_and_fix():
    error = UserError("no such model 'x'", "--name", "pick one of: a, b")
    assert error.one_line() == "no such model 'x' (--name): pick one of: a, b"
    # Data errors are user errors and the built-in types callers already catch.
    assert isinstance(DataError("bad", "f.png"), ValueError) and isinstance(MissingDataError("gone"), OSError)


def test_user_errors_survive_pickling_as_ray_ships_them():
    import pickle

    error = pickle.loads(pickle.dumps(MissingDataError("image folder /x does not exist", "data.root", "fix it")))
    assert type(error) is MissingDataError
    assert (error.what, error.where, error.fix) == ("image folder /x does not exist", "data.root", "fix it")


def test_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(tracking_uri, tmp_path, capsys,
                                                                          monkeypatch):
    import deconvlab.train

    def broken(cfg, *args, **kwargs):
        raise RuntimeError("tensor sizes disagree\nsecond line of detail")

    monkeypatch.setattr(deconvlab.train, "train", broken)
    code, err = run_cli(["train", *QUICK], capsys)
    assert code == 1
    assert error_line(err) == ("error: RuntimeError: tensor sizes disagree (internal, deconvlab train): "
                      "rerun with --debug for the traceback")
    with pytest.raises(RuntimeError, match="tensor sizes disagree"):  # the console script prints the traceback
        main(["train", *QUICK, "--debug"])
    with pytest.raises(UserError, match="unknown experiment"):
        main(["--debug", "train", "experiment=nope"])
    assert_nothing_left_behind(tracking_uri, tmp_path)


def test_a_user_error_wrapped_by_hydra_instantiate_is_still_exit_2(tracking_uri, tmp_path, capsys):
    # VOC refuses to build without a root inside instantiate(), which wraps the error.
    new_runs = _assert_train_fails_cleanly(["experiment=fcn8s_shapes", "data=voc", *TINY_TRAINER], capsys,
                                           tracking_uri, tmp_path, "VOC needs a data folder", "(data.root)")
    assert new_runs == []  # refused before any run opened


# -- bad data through deconvlab train ----------------------------------------------------------------------
def _write_pngs(folder: Path, count: int, size: int = 64) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _assert_train_fails_cleanly(argv, capsys, tracking_uri, tmp_path, *fragments) -> list:
    """Run ``deconvlab train argv``; check the one line and that nothing is left; return the new runs."""
    before = {r.info.run_id for r in all_runs(tracking_uri)}
    code, err = run_cli(["train", *argv], capsys)
    assert_one_user_error_line(code, err, *fragments)
    assert_nothing_left_behind(tracking_uri, tmp_path)
    return [r for r in all_runs(tracking_uri) if r.info.run_id not in before]


def test_missing_data_root(tracking_uri, tmp_path, capsys):
    runs = _assert_train_fails_cleanly([*QUICK, f"data.root={tmp_path / 'absent'}"], capsys, tracking_uri,
                                       tmp_path, "does not exist", "(data.root)")
    # The data is read when training starts: the run that opened ends FAILED and says why.
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "MissingDataError" in runs[0].data.tags["error"] and "absent" in runs[0].data.tags["error"]


def test_patch_larger_than_the_images(tracking_uri, tmp_path, capsys):
    _write_pngs(tmp_path / "images" / "train", 2, size=24)
    _write_pngs(tmp_path / "images" / "val", 1, size=24)
    _assert_train_fails_cleanly([*QUICK, f"data.root={tmp_path / 'images'}"], capsys, tracking_uri, tmp_path,
                                "patch_size 48 is larger than images", "(data.patch_size)")


def test_empty_split(tracking_uri, tmp_path, capsys):
    _write_pngs(tmp_path / "images" / "train", 2)
    (tmp_path / "images" / "val").mkdir()
    _assert_train_fails_cleanly([*QUICK, f"data.root={tmp_path / 'images'}"], capsys, tracking_uri, tmp_path,
                                "no images", "split 'val'")


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_corrupt_png_in_an_image_folder(damage, tracking_uri, tmp_path, capsys):
    _write_pngs(tmp_path / "images" / "val", 1)
    bad = _write_pngs(tmp_path / "images" / "train", 3)[1]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"GIF89a but not really" * 10)
    _assert_train_fails_cleanly([*QUICK, f"data.root={tmp_path / 'images'}"], capsys, tracking_uri, tmp_path,
                                "cannot read image img1.png", str(bad))


def _camvid_folder(tmp_path: Path) -> Path:
    from deconvlab.data.shapes import ShapesConfig, write_shapes_folder

    return write_shapes_folder(tmp_path / "camvid_like", {"train": 3, "val": 2}, seed=1,
                               config=ShapesConfig(height=32, width=32))


CAMVID = ["experiment=fcn8s_camvid", "data.num_classes=4", "model.width=0.0625", "data.image_size=[32,32]",
          "data.batch_size=2", *TINY_TRAINER]


@pytest.mark.parametrize("fault", ["size_mismatch", "label_out_of_range", "corrupt_jpeg"])
def test_bad_segmentation_files(fault, tracking_uri, tmp_path, capsys):
    from PIL import Image

    root = _camvid_folder(tmp_path)
    mask = sorted((root / "trainannot").glob("*.png"))[0]
    image = sorted((root / "train").glob("*.jpg"))[0]
    if fault == "size_mismatch":
        Image.fromarray(np.zeros((20, 32), np.uint8)).save(mask)
        expected = ("is 32x20 but image", str(mask))
    elif fault == "label_out_of_range":
        labels = np.asarray(Image.open(mask)).copy()
        labels[0, 0] = 9
        Image.fromarray(labels).save(mask)
        expected = ("values [9] outside the classes 0..3", "data.num_classes")
    else:
        image.write_bytes(image.read_bytes()[:200])
        expected = (f"cannot read {image}", str(image))
    _assert_train_fails_cleanly([*CAMVID, f"data.root={root}"], capsys, tracking_uri, tmp_path, *expected)


def test_truncated_nifti(tracking_uri, tmp_path, capsys):
    root = tmp_path / "brats"
    for split in ("train", "val"):
        write_phantom_case(root / split / "case0", size=16)
    flair = root / "train" / "case0" / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:300])
    argv = ["experiment=deepmedic_p9_ctx3_brats", f"data.root={root}", "data.samples_per_epoch=64",
            "data.eval_samples=64", *TINY_TRAINER]
    _assert_train_fails_cleanly(argv, capsys, tracking_uri, tmp_path, "cannot read NIfTI file", str(flair))


# -- faults while training ---------------------------------------------------------------------------------
def test_disk_full_while_writing_a_checkpoint(tracking_uri, tmp_path, capsys, monkeypatch):
    """The device fills up half-way through writing last.ckpt (just after the best checkpoint was written)."""
    from fsspec.implementations.local import LocalFileOpener

    original, attempts = LocalFileOpener.write, []

    def write(self, data, *args, **kwargs):
        if str(self.path).endswith(".ckpt"):
            attempts.append(getattr(self, "temp", None) or self.path)
            if str(self.path).endswith("last.ckpt"):
                original(self, data[: len(data) // 2])  # some bytes reach the disk, then it is full
                raise OSError(errno.ENOSPC, "No space left on device", str(attempts[-1]))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(LocalFileOpener, "write", write)
    new_runs = _assert_train_fails_cleanly_with_checkpoints(
        QUICK, capsys, tracking_uri, tmp_path, "disk full: No space left on device",
        "DECONVLAB_OUTPUT_ROOT")
    assert len(attempts) == 2 and not Path(attempts[-1]).exists()  # the half-written file is gone
    (run,) = new_runs
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    # The best checkpoint was written whole before the disk filled; no last.ckpt, not even a partial one.
    assert [p.name for p in (tmp_path / "outputs").rglob("*.ckpt")] == ["best-epoch000.ckpt"]


def _assert_train_fails_cleanly_with_checkpoints(argv, capsys, tracking_uri, tmp_path, *fragments) -> list:
    before = {r.info.run_id for r in all_runs(tracking_uri)}
    code, err = run_cli(["train", *argv], capsys)
    assert_one_user_error_line(code, err, *fragments)
    assert_nothing_left_behind(tracking_uri, tmp_path, complete_checkpoints=True)
    return [r for r in all_runs(tracking_uri) if r.info.run_id not in before]


# -- Ctrl-C ------------------------------------------------------------------------------------------------
def _restore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli_process(args: list[str], cwd: Path) -> subprocess.Popen:
    # SIGINT must arrive as Ctrl-C at a terminal would. A child inherits ignored signals, and a shell ignores
    # SIGINT for what it starts in the background (`.ci/run &` from a script): Python then never raises
    # KeyboardInterrupt. So the child gets the default disposition back before it starts.
    return subprocess.Popen([sys.executable, "-m", "deconvlab.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_restore_ctrl_c)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with contextlib.suppress(Exception):  # the store may not exist yet
            if condition():
                return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_ctrl_c_during_train_ends_the_run_killed(tracking_uri, tmp_path):
    before = {r.info.run_id for r in all_runs(tracking_uri)}

    def new_runs() -> list:
        return [r for r in all_runs(tracking_uri) if r.info.run_id not in before]

    process = _cli_process(["train", "--quiet", *QUICK, "trainer.max_epochs=10000"], tmp_path)
    try:
        # Interrupt once training is under way: this command's run has logged metrics.
        _wait_for(lambda: any(r.data.metrics for r in new_runs()), 180, "training to start")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-2000:]
    line = error_line(err.strip().splitlines())
    assert line.startswith("error: interrupted (deconvlab train)")
    (run,) = new_runs()
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]
    assert_nothing_left_behind(tracking_uri, tmp_path, complete_checkpoints=True)


def _writes_blocked(database: Path) -> bool:
    connection = sqlite3.connect(database, timeout=0.2)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("COMMIT")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        connection.close()


def _read_cut_short_by_ctrl_c(database: Path) -> None:
    cursor = sqlite3.connect(database).execute("SELECT value FROM numbers")
    cursor.fetchone()  # one row of several read: the statement is unfinished and holds the shared lock
    raise KeyboardInterrupt


def test_ctrl_c_in_the_middle_of_a_read_no_longer_locks_the_store(tmp_path):
    database = tmp_path / "store.db"
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("CREATE TABLE numbers (value)")
        connection.executemany("INSERT INTO numbers VALUES (?)", [(i,) for i in range(10)])
    try:
        _read_cut_short_by_ctrl_c(database)
    except KeyboardInterrupt as interrupt:
        assert _writes_blocked(database)  # what left runs RUNNING: the traceback keeps the read alive
        release_interrupted_reads(interrupt)
        assert not _writes_blocked(database)
        assert traceback.format_exception(interrupt)[-2].strip().endswith("raise KeyboardInterrupt")


def test_any_other_error_keeps_its_frames():
    def failing() -> None:
        kept = "local"  # noqa: F841 - what a post-mortem debugger would show
        raise ValueError("not an interrupt")

    try:
        failing()
    except ValueError as error:
        release_interrupted_reads(error)
        assert error.__traceback__.tb_next.tb_frame.f_locals["kept"] == "local"


def _store_read_cut_short_by_ctrl_c(client: MlflowClient) -> None:
    # Through the pool of MLflow's own engine, the connection its writes then wait on.
    unfinished = client._tracking_client.store.engine.connect().exec_driver_sql("SELECT name FROM sqlite_master")
    unfinished.fetchone()
    raise KeyboardInterrupt


def test_a_run_interrupted_while_reading_the_store_ends_killed(tracking_uri):
    client = MlflowClient(tracking_uri)
    with pytest.raises(KeyboardInterrupt), tracked_run("interrupted-read", "r", tracking_uri) as (_, run_id):
        _store_read_cut_short_by_ctrl_c(client)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]


class _CtrlCWhileLightningReadsTheStore(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        _store_read_cut_short_by_ctrl_c(trainer.logger.experiment)


def test_ctrl_c_while_lightning_reads_the_store_ends_the_run_killed(compose, tracking_uri):
    # Lightning ends its logger's run before train() sees the interrupt: that write must not wait on the read.
    before = {r.info.run_id for r in all_runs(tracking_uri)}
    with pytest.raises(SystemExit):
        train(compose(*QUICK), callbacks=[_CtrlCWhileLightningReadsTheStore()])
    (run,) = [r for r in all_runs(tracking_uri) if r.info.run_id not in before]
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]


INTERRUPTED_SWEEP = """
experiment: quickstart
overrides: [trainer.max_epochs=4, data.samples_per_epoch=64, trainer.limit_train_batches=8, data.max_eval_size=32,
            trainer.enable_progress_bar=false]
metric: val/psnr
mode: max
search_space:
  optim.lr: grid([0.001, 0.002])
num_samples: 1
max_concurrent_trials: 2
resources: {cpu: 1, gpu: 0}
"""


def _sweep_runs(tracking_uri: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sweep-interrupted")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id])
    return ([r for r in runs if r.data.tags.get("deconvlab.role") == "parent"],
            [r for r in runs if r.data.tags.get("mlflow.parentRunId")])


@pytest.mark.slow
def test_ctrl_c_during_sweep_closes_every_run_and_resume_finishes_it(tracking_uri, tmp_path):
    sweep = tmp_path / "interrupted.yaml"
    sweep.write_text(INTERRUPTED_SWEEP)
    args = ["sweep", str(sweep), "--quiet", "--storage", str(tmp_path / "ray")]
    process = _cli_process(args, tmp_path)
    try:
        _wait_for(lambda: any(r.data.metrics for r in _sweep_runs(tracking_uri)[1]), 300, "a trial to report")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    parents, children = _sweep_runs(tracking_uri)
    assert process.returncode == 130, err[-3000:]
    assert error_line(err.strip().splitlines(), last=False).startswith("error: interrupted (deconvlab sweep)")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert children and all(c.info.status in ("KILLED", "FINISHED") for c in children), \
        [c.info.status for c in children]
    resumed = subprocess.run([sys.executable, "-m", "deconvlab.cli", *args, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parents, children = _sweep_runs(tracking_uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    trials = sorted(c.data.tags["deconvlab.trial_id"] for c in children)
    assert len(trials) == 2 == len(set(trials))  # each trial once, not duplicated by the resume
    assert all(c.info.status == "FINISHED" for c in children)


# -- security ----------------------------------------------------------------------------------------------
def test_the_mlflow_ui_listens_on_loopback_unless_told_otherwise():
    from deconvlab.cli import build_parser
    from deconvlab.runs import mlflow_ui_command

    args = build_parser().parse_args(["ui"])
    command = mlflow_ui_command("sqlite:///x.db", args.port, args.host)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    exposed = build_parser().parse_args(["ui", "--host", "0.0.0.0"])
    assert mlflow_ui_command("sqlite:///x.db", 5000, exposed.host)[command.index("--host") + 1] == "0.0.0.0"


class _Payload:
    """Unpickling this runs code: it creates the marker file (a stand-in for anything worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_weights_holding_pickled_code_are_refused_without_trust(tmp_path):
    import torch

    from deconvlab.build import read_weights

    marker, weights = tmp_path / "code-ran", tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1), "extra": _Payload(marker)}, weights)
    with pytest.raises(UserError, match="pickled objects") as info:
        read_weights(weights)
    assert "--trust" in info.value.fix and not marker.exists()
    read_weights(weights, trust=True)  # what --trust allows, and why it is opt-in
    assert marker.exists()


def test_a_kernel_file_holding_pickled_objects_is_refused(tmp_path):
    marker, kernel = tmp_path / "code-ran", tmp_path / "kernel.npy"
    np.save(kernel, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    from deconvlab.data.degrade import load_kernel

    with pytest.raises(ValueError, match="allow_pickle"):
        load_kernel(kernel)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["promote", "some-sweep", "--name", "../../evil"],
    ["promote", "some-sweep", "--name", "ok", "--alias", "../x"],
    ["predict", "models:/../../evil@champion", "INPUT", "-o", "OUT"],
    ["evaluate", "models:/..%2F..%2Fevil/1"],
])
def test_names_that_would_escape_are_refused_and_nothing_is_written(argv, tracking_uri, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "INPUT").write_bytes(b"")
    code, err = run_cli(argv, capsys)
    assert_one_user_error_line(code, err)
    assert not (tmp_path / "OUT").exists() and not list(tmp_path.parent.glob("evil*"))
    assert_nothing_left_behind(tracking_uri, tmp_path)


def test_a_config_name_cannot_place_outputs_outside_the_output_root(tracking_uri, tmp_path, capsys):
    runs = _assert_train_fails_cleanly([*QUICK, "name=../../evil"], capsys, tracking_uri, tmp_path,
                                       "run name '../../evil' is not a single folder name", "(name)")
    assert not list(tmp_path.rglob("evil")) and not list(tmp_path.parent.rglob("evil"))
    assert runs == []  # refused before the MLflow run opens


def test_experiment_names_become_one_safe_artifact_folder(tracking_uri, tmp_path):
    from deconvlab import tracking

    root = Path(tracking.artifact_location().removeprefix("file://"))
    experiment_id = tracking.get_or_create_experiment("../../evil/../x", tracking_uri)
    location = MlflowClient(tracking_uri).get_experiment(experiment_id).artifact_location.removeprefix("file://")
    # One folder right under the artifact root ("_.._evil_.._x" holds dots, but no path separator).
    assert Path(location).parent == root and Path(location).name == "_.._evil_.._x"


def test_a_checkpoint_that_does_not_match_the_model_is_refused(compose):
    import torch

    from deconvlab.build import build_task, checkpoint_model_weights, rebuild_task

    cfg = compose("experiment=quickstart", "model.width=8")
    other = build_task(compose("experiment=quickstart", "model.width=4")).model.state_dict()
    with pytest.raises(UserError, match="do not fit the model built from its config") as info:
        rebuild_task(cfg, other, "runs:/abc")
    assert info.value.where == "runs:/abc" and "promote the run again" in info.value.fix
    with pytest.raises(UserError, match="no state_dict"):
        checkpoint_model_weights({"epoch": 3}, "best.ckpt")
    with pytest.raises(UserError, match="no model.\\* weights"):
        checkpoint_model_weights({"state_dict": {"head.weight": torch.zeros(1)}}, "best.ckpt")


def test_resuming_from_a_checkpoint_of_another_model_is_refused_before_any_run(compose, tracking_uri, tmp_path,
                                                                               capsys):
    from deconvlab.train import train

    other = compose("experiment=quickstart", "model.width=4", "logger=none", "trainer.max_epochs=1",
                    "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    f"paths.output_dir={tmp_path / 'other'}")
    train(other)
    wrong = tmp_path / "other" / "checkpoints" / "last.ckpt"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    before = {r.info.run_id for r in all_runs(tracking_uri)}
    for path, fragment in ((wrong, "do not fit this model"), (garbage, "cannot read the checkpoint"),
                           (tmp_path / "absent.ckpt", "cannot read the checkpoint")):
        code, err = run_cli(["train", *QUICK, "model.width=8", f"ckpt_path={path}"], capsys)
        assert_one_user_error_line(code, err, fragment, f"(ckpt_path={path})")
    assert {r.info.run_id for r in all_runs(tracking_uri)} == before  # refused before any run opened
