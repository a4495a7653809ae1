"""Team tracking: a sweep with concurrent trials logging to a real `mlflow server` on 127.0.0.1,
backed by a real PostgreSQL (and by SQLite), with artifacts proxied by the server.

The helpers that start those servers (``postgres_cluster``, ``mlflow_server``, optionally with MLflow's
basic-auth app) are shared with tests/test_auth.py.
"""

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.errors import UserError

pytestmark = pytest.mark.slow
# Debian's server binaries, whatever the major version (.ci/run installs them when missing).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/15/bin"),
             key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server behind {url} exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port with a database ``mlflow``; yields its SQLAlchemy URI.

    It refuses to run as root: it runs as user postgres. Skips the test when the binaries are missing.
    """
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="deconvlab-pg-"))
    shutil.chown(data, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_postgres, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres():
    with postgres_cluster() as uri:
        yield uri


def auth_app_environment(folder: Path, admin_password: str) -> dict[str, str]:
    """The environment of a server running the basic-auth app with infra/mlflow/basic_auth.ini, its user
    store moved under ``folder``; the admin password and CSRF key are given as the deployments give them."""
    shipped = (Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "basic_auth.ini").read_text()
    config = folder / "basic_auth.ini"
    config.write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{folder / 'basic_auth.db'}",
                             shipped))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, auth: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (with ``--app-name basic-auth`` when ``auth`` gives its
    environment, see :func:`auth_app_environment`); yields its URL and stops it afterwards."""
    if auth is not None:
        pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    port = free_port()
    app = ["--app-name", "basic-auth"] if auth is not None else []
    # The server's own environment: no client credentials of the test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *app, "--backend-store-uri", backend_uri,
         "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true", **(auth or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", process=process)
        yield url
    finally:
        # The server and the uvicorn workers it started: its own process group. Uvicorn waits for clients'
        # kept-alive connections to close before it exits: a few seconds' grace, then SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


SWEEP = """
    experiment: quickstart
    overrides: [trainer.max_epochs=2, trainer.limit_train_batches=3, data.samples_per_epoch=48,
                data.max_eval_size=48, trainer.enable_progress_bar=false]
    metric: val/psnr
    mode: max
    search_space:
      optim.lr: grid([0.001, 0.002, 0.003])
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}
"""


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_trials_log_to_a_tracking_server(backend, tmp_path, monkeypatch, request):
    from deconvlab.sweep.runner import run_sweep

    backend_uri = request.getfixturevalue("postgres") if backend == "postgres" else \
        f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend_uri, tmp_path / "artifacts") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        sweep = tmp_path / "team.yaml"
        sweep.write_text(textwrap.dedent(SWEEP))
        outcome = run_sweep(str(sweep), storage_path=str(tmp_path / "ray"), quiet=True)
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name(outcome.experiment_name)
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
        assert len(children) == 3 and all(r.info.status == "FINISHED" for r in runs)
        assert all(len(client.get_metric_history(r.info.run_id, "val/psnr")) == 2 for r in children)
        # Artifacts went through the server to its artifact destination.
        assert {a.path for a in client.list_artifacts(outcome.best_run_id)} >= {"config.yaml", "checkpoints"}
        assert list((tmp_path / "artifacts").rglob("config.yaml"))


def test_unreachable_tracking_server_is_one_line_before_any_trial(monkeypatch, tmp_path):
    from deconvlab.sweep.runner import run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.time()
    with pytest.raises(UserError, match="unreachable"):
        run_sweep("quickstart", smoke_test=True, storage_path=str(tmp_path / "ray"), quiet=True)
    assert time.time() - start < 60 and not (tmp_path / "ray").exists()


def test_unreachable_ray_cluster_is_one_line(tmp_path, tracking_uri):
    result = subprocess.run([sys.executable, "-m", "deconvlab.cli", "sweep", "quickstart", "--smoke-test",
                             "--address", f"127.0.0.1:{free_port()}", "--storage", str(tmp_path / "ray")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach a Ray cluster") and "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
