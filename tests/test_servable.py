"""A promoted model serves without the checkout: MLflow loads it from its own files, and `mlflow models serve`
answers a request.

One tiny quickstart run (a few seconds), promoted once, is the model for the whole module. Loading is
checked in processes that cannot see the checkout or the editable install: the package must come from the
model's ``code/`` folder and the rest from what its ``requirements.txt`` names.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest
import torch
from mlflow.models import Model

from conftest import REPO_ROOT, TINY_TRAINER, use_store_under
from deconvlab.config import compose_config
from deconvlab.model_io import SERVING_DISTRIBUTIONS, load_model
from deconvlab.promote import promote
from deconvlab.train import train

PACKAGE = REPO_ROOT / "platform" / "deconvlab"
# Small crops keep the JSON input example (and the request) small.
QUICKSTART = ["experiment=quickstart", "data.samples_per_epoch=32", "data.max_eval_size=32"]
# Loads the model with MLflow, predicts on its input example, and says where deconvlab came from.
# argv: model dir, a site-packages folder to add without its .pth files ("" for none), the output .npy.
LOAD_SCRIPT = """
import importlib.metadata, json, sys
model_dir, site, out = sys.argv[1:4]
if site:
    sys.path.append(site)
import numpy as np
import mlflow.pyfunc
from mlflow.models import Model

model = mlflow.pyfunc.load_model(model_dir)
example = np.asarray(Model.load(model_dir + "/MLmodel").load_input_example(model_dir))
np.save(out, model.predict(example))
try:
    importlib.metadata.distribution("deconvlab")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
files = sorted(m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "deconvlab" and m.__file__)
print(json.dumps({"files": files, "path": sys.path, "installed": installed}))
"""


@dataclass
class Served:
    model_dir: Path
    example: np.ndarray
    expected: np.ndarray  # deconvlab's own loader, in this process
    tracking_uri: str
    model_uri: str


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("servable")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store_under(mp, root)
        result = train(compose_config([*TINY_TRAINER, *QUICKSTART]))
        promote(result.run_id, "servable", tracking_uri=uri)
        model_uri = "models:/servable@champion"
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(root / "model"),
                                                             tracking_uri=uri))
        network = load_model(model_uri, tracking_uri=uri).network
    example = np.asarray(Model.load(str(model_dir / "MLmodel")).load_input_example(str(model_dir)))
    with torch.no_grad():
        expected = network(torch.from_numpy(example)).numpy()
    # Trained weights: the comparisons below would not notice a network left at its identity start.
    assert np.abs(expected - example).max() > 1e-3
    return Served(model_dir, example, expected, uri, model_uri)


def _run_load_script(python: str, flags: list[str], served: Served, site: str, cwd: Path) -> dict:
    """Run LOAD_SCRIPT with ``python`` in ``cwd``, with no PYTHONPATH; its report, and its prediction checked."""
    out = cwd / "predicted.npy"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, *flags, "-c", LOAD_SCRIPT, str(served.model_dir), site, str(out)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.allclose(np.load(out), served.expected, atol=1e-5)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_loaded_from_the_model(report: dict, model_dir: Path) -> None:
    code = str(model_dir / "code" / "deconvlab")
    assert report["files"] and all(f.startswith(code) for f in report["files"]), report["files"]
    # Neither the checkout nor the folder the editable install points at (the venv may live in the checkout).
    assert not {str(REPO_ROOT), str(PACKAGE.parent), "", "."} & set(report["path"]), report["path"]


# -- what the model carries ------------------------------------------------------------------------------------
def test_the_model_carries_the_package_and_pins_what_loading_needs(served):
    assert (served.model_dir / "code" / "deconvlab" / "model_io.py").is_file()
    assert not list((served.model_dir / "code").rglob("__pycache__"))
    requirements = (served.model_dir / "requirements.txt").read_text().split()
    pins = dict(line.split("==") for line in requirements)
    assert "deconvlab" not in pins  # it travels as code: no index has it
    assert pins["torch"] == torch.__version__.split("+")[0]  # no +cpu: installable from any torch index
    assert pins == {name: metadata.version(name).split("+")[0] for name in SERVING_DISTRIBUTIONS}


def test_deconvlab_load_model_never_imports_the_models_code(served):
    path_before = list(sys.path)
    loaded = load_model(served.model_uri, tracking_uri=served.tracking_uri)
    assert sys.path == path_before  # MLflow's loaders prepend code/; deconvlab's must not
    assert Path(sys.modules[type(loaded.network).__module__].__file__).is_relative_to(PACKAGE)


def _module_level_imports(path: Path) -> list[str]:
    """Modules ``path`` imports when it is imported (not those imported inside functions or for typing)."""
    found: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.extend([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + [s for handler in node.handlers for s in handler.body])

    visit(ast.parse(path.read_text()).body)
    return found


def _source_of(module: str) -> Path | None:
    """The file of a deconvlab module; None for a name that is not one (``from deconvlab.x import function``)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _third_party_imports_on_the_load_path() -> dict[str, str]:
    """Top-level module -> a deconvlab module importing it, over everything loading a model can import.

    Loading imports model_io; Hydra then imports the config's task and model modules (any of them).
    """
    roots = ["deconvlab.model_io", *(f"deconvlab.{p.parent.name}.{p.stem}"
                                     for folder in ("tasks", "models") for p in (PACKAGE / folder).glob("*.py"))]
    seen, third_party, todo = set(), {}, list(roots)
    while todo:
        module = todo.pop()
        source = _source_of(module)
        if module in seen or source is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for name in _module_level_imports(source):
            top = name.split(".")[0]
            if top == "deconvlab":
                todo.append(name)
            elif top not in sys.stdlib_module_names:
                third_party.setdefault(top, module)
    return third_party


def test_the_requirements_cover_every_import_on_the_load_path():
    provided = metadata.packages_distributions()
    required = {name.lower() for name in SERVING_DISTRIBUTIONS}
    imports = _third_party_imports_on_the_load_path()
    assert {"torch", "hydra", "pytorch_lightning", "mlflow"} <= set(imports)  # the walk reaches build and tasks
    missing = {top: (module, provided.get(top)) for top, module in imports.items()
               if not {d.lower() for d in provided.get(top, [])} & required}
    assert not missing, f"imported when a model loads but not in SERVING_DISTRIBUTIONS: {missing}"


# -- loading without the checkout -------------------------------------------------------------------------------
def test_mlflow_loads_the_model_from_its_own_code_without_the_checkout(served, tmp_path):
    # -I: no PYTHONPATH, user site or script folder; -S: no .pth files, so no editable deconvlab. The venv's
    # packages stand in for an environment built from requirements.txt (the slow test below builds one).
    report = _run_load_script(sys.executable, ["-I", "-S"], served, sysconfig.get_path("purelib"), tmp_path)
    _assert_loaded_from_the_model(report, served.model_dir)


@pytest.mark.slow
def test_a_fresh_venv_with_only_the_requirements_loads_and_predicts(served, tmp_path):
    started = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "-r", str(served.model_dir / "requirements.txt")],
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    installed_s = time.monotonic() - started
    report = _run_load_script(python, ["-I"], served, "", tmp_path)
    _assert_loaded_from_the_model(report, served.model_dir)
    assert not report["installed"]  # the deconvlab distribution is not in the venv: the model's code ran
    print(f"fresh venv: installed in {installed_s:.0f} s, loaded and predicted in "
          f"{time.monotonic() - started - installed_s:.0f} s")


# -- serving ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow models serve exited with {server.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.25)
    raise AssertionError(f"no answer from {url}/ping in {timeout_s} s")


def _post_json(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not exited after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def test_mlflow_models_serve_answers_a_request(served, tmp_path):
    port, bin_dir = _free_port(), Path(sys.executable).parent
    # MLflow starts the server as `uvicorn ...` from PATH: the venv's bin first, as with an activated venv.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(served.model_dir), "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        # Its own process group: the uvicorn child it starts is stopped with it.
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_ping(url, server, log, timeout_s=60)
        # MLflow's own tensor request for this model: {"inputs": [...]} as saved beside the input example.
        answer = _post_json(f"{url}/invocations", (served.model_dir / "serving_input_example.json").read_bytes())
    finally:
        _stop(server)
    predictions = np.asarray(answer["predictions"], np.float32)
    assert predictions.shape == served.expected.shape == served.example.shape
    assert np.allclose(predictions, served.expected, atol=1e-5)
