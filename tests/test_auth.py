"""A team server with authentication: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1 with the
settings of infra/mlflow/basic_auth.ini, backed by SQLite (refusals, sweep, promotion, evaluation) and by
PostgreSQL (promotions racing from two simulated hosts).

Users are made the way infra/mlflow/README.md says: a ``trainers`` role with EDIT on every experiment, a
``release`` role with EDIT on every registered model; ``trainer`` has the first, ``releaser`` both, ``reader``
none (the server's default, READ).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_TRAINER
from deconvlab.access import check_uri_has_no_password, redact
from deconvlab.cli import main
from deconvlab.errors import AccessRefused, UserError
from deconvlab.locks import HOLDER_TAG, TOKEN_TAG, is_lock_name, lock_name, registry_lock
from deconvlab.store import client_for, has_checkpoint
from test_mlflow_server import auth_app_environment, free_port, mlflow_server, postgres_cluster

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SMALL_DATA = ["experiment=quickstart", "data.samples_per_epoch=48", "data.max_eval_size=48"]
MODEL = "team-deblur"


@dataclass(frozen=True)
class User:
    name: str
    password: str


@dataclass
class Team:
    url: str
    folder: Path
    admin: User
    trainer: User
    releaser: User
    reader: User


def new_user(name: str) -> User:
    # A password nothing else contains, so that finding it anywhere means it leaked.
    return User(name, f"{name}-{secrets.token_hex(10)}")


@contextlib.contextmanager
def logged_in(user: User | None):
    """MLflow's client credentials for the block (None: anonymous), as a user exports them."""
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    for key in CREDENTIALS:
        os.environ.pop(key, None)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user.name, user.password
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def provision(url: str, admin: User) -> dict[str, User]:
    """The roles and users of infra/mlflow/README.md ("Users, roles and permissions"), made by the admin."""
    from mlflow.server.auth.client import AuthServiceClient

    users = {key: new_user(key) for key in ("trainer", "releaser", "reader")}
    with logged_in(admin):
        auth = AuthServiceClient(url)
        for user in users.values():
            auth.create_user(user.name, user.password)
        trainers = auth.create_role("default", "trainers", "write runs in every experiment")
        auth.add_role_permission(trainers.id, "experiment", "*", "EDIT")
        release = auth.create_role("default", "release", "register versions and move aliases")
        auth.add_role_permission(release.id, "registered_model", "*", "EDIT")
        auth.assign_role(users["trainer"].name, trainers.id)
        for role in (trainers, release):
            auth.assign_role(users["releaser"].name, role.id)
    return users


@contextlib.contextmanager
def team_server(folder: Path, backend_uri: str):
    admin = new_user("admin")
    with mlflow_server(backend_uri, folder / "artifacts", auth_app_environment(folder, admin.password)) as url:
        yield Team(url, folder, admin, **provision(url, admin))


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """An authenticated server on SQLite."""
    folder = tmp_path_factory.mktemp("team")
    with team_server(folder, f"sqlite:///{folder / 'mlflow.db'}") as server:
        yield server


@pytest.fixture(scope="module")
def pg_team(tmp_path_factory):
    """An authenticated server on PostgreSQL."""
    folder = tmp_path_factory.mktemp("pg-team")
    with postgres_cluster() as backend, team_server(folder, backend) as server:
        yield server


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``deconvlab ARGV`` in this process: exit code and stderr."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def registry_state(client: MlflowClient) -> list:
    """Every registered model (locks included) with its aliases and versions."""
    state = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        state.append((model.name, sorted(model.aliases.items()),
                      sorted((int(v.version), v.run_id) for v in versions)))
    return sorted(state)


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ------------------------------------------------------------------------------------------ the server
def test_the_server_refuses_to_start_without_an_admin_password(tmp_path):
    pytest.importorskip("flask_wtf")
    env = auth_app_environment(tmp_path, "unused")
    del env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(free_port()), "--workers",
         "1"],
        env={**environment, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr and "no default admin password" in result.stderr


def test_anonymous_requests_get_401_and_the_admin_200(team):
    import urllib.error
    import urllib.request

    search = f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    login = base64.b64encode(f"{team.admin.name}:{team.admin.password}".encode()).decode()
    request = urllib.request.Request(search, headers={"Authorization": f"Basic {login}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


# ---------------------------------------------------------------------------------- clear refusals
@pytest.mark.parametrize("who", ["anonymous", "wrong password"])
def test_runs_sweep_and_promote_without_a_valid_login_are_one_line_exit_2(who, team, capsys, tmp_path,
                                                                          monkeypatch):
    user = None if who == "anonymous" else User(team.trainer.name, "not-the-password-1")
    missing = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if user is None else \
        f"rejected the login of user {team.trainer.name!r}"
    with logged_in(team.admin):
        before = all_runs(MlflowClient(team.url))
    with logged_in(user):
        commands = [["runs", "--tracking-uri", team.url],
                    ["promote", "quickstart", "--name", MODEL, "--tracking-uri", team.url]]
        for argv in commands:
            assert_one_line(*cli(capsys, *argv), missing)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
        start = time.monotonic()
        code, err = cli(capsys, "sweep", "quickstart", "--smoke-test", "--storage", str(tmp_path / "ray"))
    assert_one_line(code, err, missing)
    assert time.monotonic() - start < 30 and not (tmp_path / "ray").exists()  # refused before Ray started
    if user is not None:
        assert user.password not in err
    with logged_in(team.admin):
        assert len(all_runs(MlflowClient(team.url))) == len(before)


# --------------------------------------------------------------------- a sweep by an EDIT user, no secrets
@dataclass
class Swept:
    outcome: object  # SweepOutcome
    folders: list[Path]  # everything the sweep wrote: store, artifacts, Ray's storage and logs, outputs


@pytest.fixture(scope="module")
def swept(team, tmp_path_factory):
    """``deconvlab sweep quickstart --smoke-test`` by the trainer; every folder it writes is kept for grep."""
    import ray

    from deconvlab.sweep.runner import run_sweep

    ray.shutdown()
    work = tmp_path_factory.mktemp("sweep-work")
    scratch = Path(tempfile.mkdtemp(prefix="dl-auth-"))  # short: Ray's socket paths live under it
    try:
        with pytest.MonkeyPatch.context() as mp, logged_in(team.trainer):
            mp.chdir(work)
            for key, value in {"MLFLOW_TRACKING_URI": team.url, "DECONVLAB_OUTPUT_ROOT": str(work / "outputs"),
                               "TMPDIR": str(scratch), "RAY_TMPDIR": str(scratch),
                               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
                mp.setenv(key, value)
            mp.setattr(tempfile, "tempdir", str(scratch))
            outcome = run_sweep("quickstart", smoke_test=True, storage_path=str(work / "ray"), quiet=True)
        yield Swept(outcome, [team.folder, work, scratch])
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
def test_an_edit_user_runs_a_sweep_and_the_password_is_written_nowhere(team, swept):
    with logged_in(team.admin):
        client = MlflowClient(team.url)
        runs = client.search_runs([client.get_experiment_by_name(swept.outcome.experiment_name).experiment_id])
    assert len(runs) >= 3 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags.get("mlflow.user") for r in runs} <= {team.trainer.name, None}
    secret = team.trainer.password.encode()
    basic = base64.b64encode(f"{team.trainer.name}:{team.trainer.password}".encode())
    files = [p for folder in swept.folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    # Not vacuous: the store, the artifacts, Ray's storage and session logs and the trial folders are there.
    assert {"mlflow.db", "config.yaml", "leaderboard.csv"} <= names and any(n.endswith(".log") for n in names)
    assert any("deconvlab-trials" in p.parts for p in files)
    leaked = [p for p in files if secret in p.read_bytes() or basic in p.read_bytes()]
    assert not leaked, leaked
    assert team.trainer.password not in repr(swept.outcome.leaderboard.to_dict())


@pytest.mark.slow
def test_a_user_without_edit_on_the_experiment_cannot_log_a_sweep_into_it(team, swept, capsys, tmp_path,
                                                                           monkeypatch):
    with logged_in(team.admin):
        before = all_runs(MlflowClient(team.url))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    with logged_in(team.reader):
        code, err = cli(capsys, "sweep", "quickstart", "--smoke-test", "--storage", str(tmp_path / "ray"))
    assert_one_line(code, err, f"user {team.reader.name!r} has no permission to create runs in experiment "
                               f"'{swept.outcome.experiment_name}'", "EDIT", "trainers")
    with logged_in(team.admin):
        after = all_runs(MlflowClient(team.url))
    assert len(after) == len(before) and not [r for r in after if r.info.status == "RUNNING"]


# --------------------------------------------------------------- promotion and evaluation by permission
def _trial_runs(client: MlflowClient, swept: Swept) -> list[str]:
    """The sweep's trial runs that have a checkpoint, best first."""
    table = swept.outcome.leaderboard
    ids = [run_id for run_id in table["mlflow_run"] if isinstance(run_id, str)]
    return [run_id for run_id in ids if has_checkpoint(client, client.get_run(run_id))]


@pytest.mark.slow
def test_a_reader_of_a_model_evaluates_it_but_cannot_add_a_version_or_move_its_alias(team, swept, capsys):
    from mlflow.server.auth.client import AuthServiceClient

    from deconvlab.promote import promote

    with logged_in(team.releaser):
        client = client_for(team.url)
        first = promote(swept.outcome.parent_run_id, MODEL, tracking_uri=team.url)
        assert first.moved
        trials = [t for t in _trial_runs(client, swept) if t != first.candidate.run_id]
        assert len(trials) >= 2, trials
        second = promote(trials[0], MODEL, tracking_uri=team.url)  # not better: registered, alias stays
        assert second.newly_registered and not second.moved
    with logged_in(team.admin):
        AuthServiceClient(team.url).grant_user_permission(team.reader.name, "registered_model", MODEL, "READ")
        before = registry_state(client)
    assert [name for name, _, _ in before] == [MODEL]  # no lock left behind

    with logged_in(team.reader):
        code, err = cli(capsys, "evaluate", f"models:/{MODEL}@champion", "--no-log", "--json",
                        "--tracking-uri", team.url)
    assert code == 0, err
    # The trainer may write runs but has only READ on the model: no new version, no alias move.
    with logged_in(team.trainer):
        code, err = cli(capsys, "promote", trials[0], "--name", MODEL, "--force", "--tracking-uri", team.url)
        assert_one_line(code, err, f"user {team.trainer.name!r} has no permission to move aliases of "
                                   f"registered model {MODEL!r}", "release role")
        code, err = cli(capsys, "promote", trials[1], "--name", MODEL, "--tracking-uri", team.url)
        assert_one_line(code, err, f"user {team.trainer.name!r} has no permission to add versions to "
                                   f"registered model {MODEL!r}")
    # The reader may not even package the model into the trial's run (READ on the experiment).
    with logged_in(team.reader):
        code, err = cli(capsys, "promote", trials[1], "--name", MODEL, "--tracking-uri", team.url)
    assert_one_line(code, err, f"user {team.reader.name!r} has no permission to write artifacts to experiment "
                               f"'{swept.outcome.experiment_name}'")
    with logged_in(team.admin):
        assert registry_state(client) == before


# ------------------------------------------------------------------------------------- the registry lock
def test_a_held_lock_makes_another_promotion_wait_then_give_up_with_one_line(team):
    with logged_in(team.releaser):
        client = client_for(team.url)
        with registry_lock(client, "busy-model"):
            start = time.monotonic()
            with pytest.raises(UserError, match="another promotion holds the lock 'busy-model.promotion-lock'"):
                with registry_lock(client, "busy-model", timeout_s=1.0):
                    pass
            assert 1.0 <= time.monotonic() - start < 10
        assert not [m for m in client.search_registered_models() if is_lock_name(m.name)]


def test_a_lock_left_by_a_dead_promotion_is_broken_after_its_lease(team):
    with logged_in(team.releaser):
        client = client_for(team.url)
        lock = lock_name("orphan-model")
        client.create_registered_model(lock, tags={TOKEN_TAG: "dead", HOLDER_TAG: "a SIGKILLed promotion"})
        start = time.monotonic()
        with registry_lock(client, "orphan-model", timeout_s=30, lease_s=1.0):
            assert client.get_registered_model(lock).tags[TOKEN_TAG] != "dead"
        assert 1.0 <= time.monotonic() - start < 15
        assert not [m for m in client.search_registered_models() if is_lock_name(m.name)]


def test_a_lock_another_user_left_is_not_deleted_by_a_reader(team):
    with logged_in(team.releaser):
        client = client_for(team.url)
        lock = lock_name("kept-model")
        client.create_registered_model(lock, tags={TOKEN_TAG: "dead", HOLDER_TAG: "the releaser's killed run"})
    try:
        with logged_in(team.reader), pytest.raises(UserError, match="may not delete it"):
            with registry_lock(client, "kept-model", timeout_s=30, lease_s=0.5):
                pass
    finally:
        with logged_in(team.releaser):
            client.delete_registered_model(lock)


@pytest.mark.slow
def test_promotions_from_two_hosts_sharing_no_files_leave_one_champion_and_one_version_per_run(pg_team,
                                                                                              tmp_path):
    from deconvlab.config import compose_config
    from deconvlab.train import train

    with pytest.MonkeyPatch.context() as mp, logged_in(pg_team.trainer):
        mp.setenv("MLFLOW_TRACKING_URI", pg_team.url)
        mp.setenv("DECONVLAB_OUTPUT_ROOT", str(tmp_path / "outputs"))
        low = train(compose_config([*TINY_TRAINER, *SMALL_DATA, "optim.lr=0.0"])).run_id
        high = train(compose_config([*TINY_TRAINER, *SMALL_DATA, "trainer.max_epochs=3",
                                     "trainer.limit_train_batches=8", "optim.lr=3e-3"])).run_id
    client = MlflowClient(pg_team.url)
    with logged_in(pg_team.trainer):
        value = {r: client.get_run(r).data.metrics["best/val/psnr"] for r in (low, high)}
    assert value[high] > value[low]
    # Three promotions at once, as from separate hosts: own HOME, temp folder and working folder each.
    processes = []
    for index, run_id in enumerate([low, high, high]):
        host = tmp_path / f"host{index}"
        for folder in ("home", "tmp", "work"):
            (host / folder).mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        env |= {"HOME": str(host / "home"), "TMPDIR": str(host / "tmp"), "MLFLOW_TRACKING_URI": pg_team.url,
                "MLFLOW_TRACKING_USERNAME": pg_team.releaser.name,
                "MLFLOW_TRACKING_PASSWORD": pg_team.releaser.password}
        processes.append(subprocess.Popen([sys.executable, "-m", "deconvlab.cli", "promote", run_id, "--name", "race"],
                                          cwd=host / "work", env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    with logged_in(pg_team.admin):
        versions = client.search_model_versions("name='race'")
        aliases = client.get_registered_model("race").aliases
        models = [m.name for m in client.search_registered_models()]
    assert sorted(v.run_id for v in versions) == sorted([low, high])  # one version per run
    by_run = {v.run_id: str(v.version) for v in versions}
    assert str(aliases["champion"]) == by_run[high]  # exactly one champion, the better run
    assert models == ["race"]  # and no lock row left


@pytest.mark.slow
def test_anonymous_runs_on_the_postgres_backed_server_are_refused_too(pg_team, capsys):
    with logged_in(None):
        assert_one_line(*cli(capsys, "runs", "--tracking-uri", pg_team.url), "requires a login")


# ------------------------------------------------------------------------------------ secrets stay out
def test_passwords_are_redacted_and_a_password_in_the_tracking_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-very-secret")
    text = "uri postgresql+psycopg2://mlflow:dbpass99@db:5432/mlflow and hunter2-very-secret in a message"
    assert redact(text) == "uri postgresql+psycopg2://mlflow:***@db:5432/mlflow and *** in a message"
    with pytest.raises(UserError, match="carries a password") as refused:
        check_uri_has_no_password("http://bob:hunter2-very-secret@mlflow.internal:5000")
    assert "hunter2" not in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)
    assert check_uri_has_no_password("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    assert issubclass(AccessRefused, UserError)
