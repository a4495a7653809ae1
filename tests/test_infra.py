"""Offline checks of the deployment files under infra/ (no network, Docker or Kubernetes here).

They parse; the cluster launcher YAML validates against the JSON schema inside the installed ray
package; the KubeRay manifests carry the fields KubeRay requires and agree with each other (one image,
one environment, one shared volume); the compose file's MLflow server points at its Postgres and MinIO;
the images install the package the way the README does; and every ``deconvlab``, ``ray``, ``mlflow`` and
``make`` command written in infra/ parses with the real command-line parsers. Security defaults: the MLflow
server (compose and Kubernetes) runs the basic-auth app with its admin password and keys from secrets and no
default; Ray token authentication is on for every process, with the dashboard on a private address.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
ENV_FILE = INFRA / "deconvlab.env"
CONFIGMAP = "deconvlab-env"
RAY_TOKEN_SECRET, MLFLOW_LOGIN_SECRET = "ray-auth-token", "deconvlab-mlflow-login"
# Every Ray process: the shared environment and the cluster's Ray token; the head (the sweep driver, the
# only MLflow client) also the MLflow login.
ENV_FROM = [{"configMapRef": {"name": CONFIGMAP}}, {"secretRef": {"name": RAY_TOKEN_SECRET}}]
HEAD_ENV_FROM = [*ENV_FROM, {"secretRef": {"name": MLFLOW_LOGIN_SECRET}}]
EXPECTED_YAML = {
    "ray-cluster-launcher.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
    "kuberay/shared-storage.yaml", "kuberay/mlflow-server.yaml", "mlflow/docker-compose.yaml",
}
# KubeRay's limits (ray-operator/controllers/ray/utils): it appends suffixes to these names.
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PROGRAMS = ("deconvlab", "ray", "mlflow", "make")


# ---------------------------------------------------------------------------------------------- loading
def load(relative: str) -> dict[str, Any]:
    """The single YAML document of ``infra/<relative>``."""
    (document,) = list(yaml.safe_load_all((INFRA / relative).read_text()))
    return document


def env_file() -> dict[str, str]:
    """infra/deconvlab.env as a dict (KEY=VALUE lines, # comments)."""
    pairs = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def makefile_torch_pin() -> str:
    """The ``torch==X`` that `make install` installs first."""
    (pin,) = set(re.findall(r"pip install [^\n]*?(torch==[\w.+]+)", (REPO / "Makefile").read_text()))
    return pin


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def dockerfile_arg(path: Path, name: str) -> str:
    (value,) = [a.split("=", 1)[1].strip('"') for i, a in dockerfile_instructions(path)
                if i == "ARG" and a.startswith(f"{name}=")]
    return value


def kuberay_documents() -> dict[str, dict[str, Any]]:
    return {kind: load(f"kuberay/{kind}.yaml") for kind in ("raycluster", "rayjob")}


def cluster_spec(document: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster or of a RayJob (its rayClusterSpec)."""
    return document["spec"].get("rayClusterSpec", document["spec"])


def pod_templates(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod template) of the head and of every worker group."""
    yield "head", cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def all_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container the manifests start: Ray head and workers (both files) and the RayJob submitter."""
    documents = kuberay_documents()
    for name, document in documents.items():
        for group, template in pod_templates(cluster_spec(document)):
            for container in template["spec"]["containers"]:
                yield f"{name}/{group}/{container['name']}", container
    for container in documents["rayjob"]["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        yield f"rayjob/submitter/{container['name']}", container


# ---------------------------------------------------------------------- commands written in infra files
def _segments(line: str) -> Iterator[list[str]]:
    """Simple commands of one shell line, split at ; && || | &, leading VAR=value assignments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    current: list[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            yield current
            current = []
        elif current or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token):
            current.append(token)
    yield current


def _program(token: str) -> str | None:
    name = token.rsplit("/", 1)[-1]
    return name if name in PROGRAMS and (token == name or "/bin/" in token) else None


def shell_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(program, argv) for every deconvlab/ray/mlflow/make command in shell text, quoted ones included.

    A command word counts at the start of a simple command, after ``--`` (``kubectl exec POD --``,
    ``ray job submit ... --``) or as the command of ``docker run IMAGE``.
    """
    for line in re.sub(r"\\\n", " ", text).splitlines():
        try:
            segments = list(_segments(line))
        except ValueError:  # prose with an apostrophe, not a command
            continue
        for tokens in segments:
            for i, token in enumerate(tokens):
                program = _program(token)
                if program and (i == 0 or tokens[i - 1] == "--" or tokens[:2] == ["docker", "run"]):
                    yield program, tokens[i + 1:]
            for token in tokens:  # a quoted command: ray exec CLUSTER 'deconvlab sweep ...'
                if " " in token:
                    yield from shell_commands(token)


def markdown_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """Commands in shell code blocks (```bash, ```sh or unlabelled) and in inline `deconvlab ...` spans."""
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if language in ("", "bash", "sh", "shell", "console"):
            yield from shell_commands(block)
    for span in re.findall(r"(?<!`)`(deconvlab [^`]+)`", text):
        yield from shell_commands(span)


def yaml_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """Commands in YAML string values, in argv lists (``command: [mlflow, server, ...]``) and in comment
    lines indented as commands (``#   kubectl apply ...``: two spaces or more after the ``#``; prose has one).
    """
    comments = "\n".join(m.group(1) for m in re.finditer(r"^\s*#\s{2,}(.*)$", text, flags=re.M))
    yield from shell_commands(comments)

    def walk(node: Any) -> Iterator[tuple[str, list[str]]]:
        if isinstance(node, dict):
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            if node and all(isinstance(v, str) for v in node) and _program(node[0]):
                yield _program(node[0]), list(node[1:])
            else:
                for value in node:
                    yield from walk(value)
        elif isinstance(node, str) and " " in node.strip():  # a command line, not a name like `deconvlab`
            yield from shell_commands(node)

    for document in yaml.safe_load_all(text):
        yield from walk(document)


def infra_commands() -> list[tuple[str, str, list[str]]]:
    """(file, program, argv) for every command written anywhere under infra/."""
    found = []
    for path in sorted(INFRA.rglob("*")):
        if path.suffix == ".md":
            commands = markdown_commands(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            commands = yaml_commands(path.read_text())
        elif path.name == "Dockerfile":
            commands = (c for i, a in dockerfile_instructions(path) if i == "RUN" for c in shell_commands(a))
        else:
            continue
        found += [(str(path.relative_to(REPO)), program, argv) for program, argv in commands]
    return found


def parse_click(group: Any, prog: str, argv: list[str]) -> Any:
    """Parse ``argv`` with a click group down to the leaf command (no command runs); returns its context."""
    import click

    ctx = group.make_context(prog, list(argv))
    while isinstance(ctx.command, click.Group):
        pending = getattr(ctx, "_protected_args", None)
        rest = [*(ctx.protected_args if pending is None else pending), *ctx.args]
        name, command, rest = ctx.command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def check_command(program: str, argv: list[str]) -> None:
    """Raise if ``program argv`` is not a valid command line of the installed tool (nothing runs)."""
    if program == "deconvlab":
        from deconvlab.cli import build_parser

        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"deconvlab {shlex.join(argv)}: not a valid command line") from exc
        # argparse accepts abbreviations (--resum for --resume): written commands spell options out.
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        known = {s for action in subparsers.choices[args.command]._actions for s in action.option_strings}
        written = argv[:argv.index("--")] if "--" in argv else argv
        for option in (a.split("=", 1)[0] for a in written if a.startswith("--")):
            assert option in known, f"deconvlab {args.command}: {option} is not spelled out as an option"
        if args.command == "sweep" and not args.sweep.isupper():  # NAME-like placeholders aside
            assert (REPO / "sweeps" / f"{args.sweep}.yaml").is_file(), f"no sweep named {args.sweep!r}"
    elif program == "ray":
        from ray.scripts.scripts import cli

        parse_click(cli, "ray", argv)
    elif program == "mlflow":
        from mlflow.cli import cli

        parse_click(cli, "mlflow", argv)
    elif program == "make":
        options_with_value = {"-C", "-f"}
        targets = [a for i, a in enumerate(argv)
                   if not a.startswith("-") and (i == 0 or argv[i - 1] not in options_with_value)]
        assert targets and set(targets) <= makefile_targets(), f"make {shlex.join(argv)}: unknown target"


COMMANDS = infra_commands()


# ------------------------------------------------------------------------------------------------ tests
def test_every_yaml_under_infra_parses():
    found = {str(p.relative_to(INFRA)) for p in [*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]}
    assert EXPECTED_YAML <= found
    for relative in found:
        documents = list(yaml.safe_load_all((INFRA / relative).read_text()))
        assert documents and all(isinstance(d, dict) and d for d in documents), relative


@pytest.mark.parametrize("where,program,argv", COMMANDS,
                         ids=[f"{w}:{p} {' '.join(a)[:60]}" for w, p, a in COMMANDS])
def test_commands_written_in_infra_are_real(where, program, argv):
    check_command(program, argv)


def test_commands_found_cover_the_documented_workflows():
    sweeps = [argv for _, program, argv in COMMANDS if program == "deconvlab" and argv[:1] == ["sweep"]]
    flags = {flag for argv in sweeps for flag in argv if flag.startswith("--")}
    assert {"--address", "--storage", "--resume"} <= flags
    where = {w for w, program, argv in COMMANDS if program == "deconvlab" and argv[:1] == ["sweep"]}
    assert {"infra/README.md", "infra/kuberay/rayjob.yaml", "infra/ray-cluster-launcher.yaml"} <= where
    assert ("infra/mlflow/README.md", "mlflow", "server") in {(w, p, a[0]) for w, p, a in COMMANDS}
    assert ("infra/ray-cluster-launcher.yaml", "ray", "start") in {(w, p, a[0]) for w, p, a in COMMANDS}


@pytest.mark.parametrize("program,argv", [
    ("deconvlab", ["sweep", "quickstart", "--adress", "auto"]),
    ("deconvlab", ["sweep", "no_such_sweep", "--address", "auto"]),
    ("deconvlab", ["sweep", "quickstart", "--resum"]),
    ("ray", ["start", "--head", "--num-cpu=0"]),
    ("ray", ["jbo", "submit"]),
    ("mlflow", ["server", "--backend-store", "sqlite:///x.db"]),
    ("make", ["-C", "~/deconvlab", "instal"]),
])
def test_a_wrong_command_is_caught(program, argv):
    import click

    with pytest.raises((AssertionError, click.exceptions.UsageError)):
        check_command(program, argv)


def test_commands_are_found_wherever_they_are_written():
    text = ("HEAD=$(kubectl get pod -o name)\nkubectl exec -it $HEAD -- deconvlab sweep q --address auto\n"
            "ray exec c.yaml --tmux \\\n  'deconvlab runs'\nX=1 .venv/bin/ray start --head; make install\n"
            "docker run --rm img:1 deconvlab list\nkubectl get raycluster deconvlab\n")
    assert list(shell_commands(text)) == [
        ("deconvlab", ["sweep", "q", "--address", "auto"]),
        ("ray", ["exec", "c.yaml", "--tmux", "deconvlab runs"]), ("deconvlab", ["runs"]),
        ("ray", ["start", "--head"]), ("make", ["install"]), ("deconvlab", ["list"])]


# ------------------------------------------------------------------------------- Ray cluster launcher
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_validates_like_ray_up():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("ray-cluster-launcher.yaml")
    jsonschema.validate(raw, ray_schema())
    # What `ray up` does before it contacts any machine: fill defaults and node types, then validate.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    workers = prepared["available_node_types"][prepared["head_node_type"]]
    assert workers["max_workers"] == raw["max_workers"] == len(raw["provider"]["worker_ips"])
    assert prepared["head_setup_commands"][:len(raw["setup_commands"])] == raw["setup_commands"]


@pytest.mark.parametrize("breakage", ["typo in a key", "max_workers not an integer", "provider without type"])
def test_a_broken_launcher_fails_the_schema(breakage):
    import jsonschema

    broken = load("ray-cluster-launcher.yaml")
    if breakage == "typo in a key":
        broken["setup_comands"] = broken.pop("setup_commands")
    elif breakage == "max_workers not an integer":
        broken["max_workers"] = "two"
    else:
        del broken["provider"]["type"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_launcher_installs_like_the_readme_with_one_environment():
    launcher = load("ray-cluster-launcher.yaml")
    setup = launcher["setup_commands"]
    assert setup[0] == "make -C ~/deconvlab install"  # the README's install: torch pin first (Makefile)
    recipe = re.search(r"^\$\(BIN\)/deconvlab:.*?(?=^\S)", (REPO / "Makefile").read_text(), re.S | re.M)
    assert recipe.group(0).index(makefile_torch_pin()) < recipe.group(0).index('-e ".[dev]"')
    assert launcher["file_mounts"]["~/deconvlab"] == "." and ".venv" in launcher["rsync_exclude"]
    sourced = re.search(r"\. ~/deconvlab/(\S+);", setup[-1]).group(1)
    assert (REPO / sourced) == ENV_FILE and "~/.bashrc" in setup[-1]
    (ray_pin,) = re.findall(r"ray\[[\w,]+\]==([\w.]+)", " ".join(setup))
    assert ray_pin == dockerfile_arg(INFRA / "docker" / "Dockerfile", "RAY_VERSION")


# ------------------------------------------------------------------------------------------- KubeRay
def check_pod_template(template: dict[str, Any], where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: KubeRay needs at least one container"
    for container in containers:
        assert container["name"] and container["image"], where
        resources = container["resources"]
        assert set(resources["requests"]) <= set(resources["limits"]) and resources["limits"], where


def check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams take strings"
    check_pod_template(head["template"], f"{where} head")
    names = [group["groupName"] for group in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names) and all(DNS_1035.match(n) for n in names)
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        check_pod_template(group["template"], f"{where} {group['groupName']}")


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_manifest_has_the_fields_kuberay_requires(kind):
    document = kuberay_documents()[kind]
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] in MAX_NAME
    name = document["metadata"]["name"]
    assert DNS_1035.match(name) and len(name) <= MAX_NAME[document["kind"]]
    spec = cluster_spec(document)
    check_cluster_spec(spec, kind)
    assert spec["rayVersion"] == dockerfile_arg(INFRA / "docker" / "Dockerfile", "RAY_VERSION")


def test_rayjob_runs_a_sweep_on_the_same_cluster():
    documents = kuberay_documents()
    job = documents["rayjob"]["spec"]
    # One cluster definition: a change to one manifest that misses the other fails here.
    assert job["rayClusterSpec"] == documents["raycluster"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    ((program, argv),) = list(shell_commands(job["entrypoint"]))
    assert program == "deconvlab" and argv[:1] == ["sweep"]
    check_command(program, argv)
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--storage") + 1] == env_file()["DECONVLAB_RAY_STORAGE"]
    submitter = job["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never" and not submitter["containers"][0].get("command")


def test_every_container_has_one_image_and_one_environment():
    images = {where: c["image"] for where, c in all_containers()}
    assert len(images) == 3 * 2 + 1  # head, cpu and gpu workers in both files, and the submitter
    assert set(images.values()) == {f"deconvlab:{pyproject()['project']['version']}"}
    for where, container in all_containers():
        assert container["envFrom"] == (HEAD_ENV_FROM if "/head/" in where else ENV_FROM), where
        assert not container.get("env"), f"{where}: put settings in infra/deconvlab.env, for every process"
    for document in kuberay_documents().values():
        assert cluster_spec(document)["autoscalerOptions"]["envFrom"] == ENV_FROM


def test_every_ray_pod_mounts_the_shared_storage():
    claim = load("kuberay/shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    storage = env_file()["DECONVLAB_RAY_STORAGE"]
    for name, document in kuberay_documents().items():
        for group, template in pod_templates(cluster_spec(document)):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for container in template["spec"]["containers"]:
                shared = [m for m in container["volumeMounts"]
                          if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                          == claim["metadata"]["name"]]
                assert len(shared) == 1, f"{name}/{group}"
                assert Path(storage).is_relative_to(shared[0]["mountPath"]), f"{name}/{group}"


def test_ray_start_params_are_real_ray_start_options():
    from ray.scripts.scripts import cli

    spec = kuberay_documents()["raycluster"]["spec"]
    # KubeRay turns {key: value} into --key=value and adds --head or the head's --address.
    head = parse_click(cli, "ray", ["start", "--head", *(f"--{k}={v}" for k, v in
                                                       spec["headGroupSpec"]["rayStartParams"].items())])
    assert head.params["num_cpus"] == 0 and head.params["dashboard_host"] == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        parse_click(cli, "ray", ["start", "--address=deconvlab-head-svc:6379",
                                 *(f"--{k}={v}" for k, v in group["rayStartParams"].items())])


# ---------------------------------------------------------------------------------------- environment
def test_the_environment_file_is_read_by_the_code(monkeypatch):
    from deconvlab import tracking
    from deconvlab.sweep.runner import resolve_storage

    env = env_file()
    # Plain KEY=VALUE, read the same way by `kubectl create configmap --from-env-file` and by the shell.
    for key, value in env.items():
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) and re.fullmatch(r"[^\s'\"]+", value), key
    assert env["RAY_AUTH_MODE"] in ("disabled", "token")
    assert urlparse(env["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["NO_ALBUMENTATIONS_UPDATE"] == "1"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The names are the ones deconvlab reads: where a sweep without --storage writes, where runs go.
    assert resolve_storage(None) == env["DECONVLAB_RAY_STORAGE"]
    assert tracking.resolve_tracking_uri() == env["MLFLOW_TRACKING_URI"]


# --------------------------------------------------------------------------------------------- images
def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN instructions, in order."""
    installs = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "RUN":
            for segment in re.split(r"&&|;", arguments):
                tokens = shlex.split(segment)
                if "pip" in tokens and tokens[tokens.index("pip") + 1:][:1] == ["install"]:
                    installs.append(tokens[tokens.index("pip") + 2:])
    return installs


def test_dockerfile_installs_torch_first_then_the_package():
    installs = [i for i in pip_installs(INFRA / "docker" / "Dockerfile") if i != ["--upgrade", "pip"]]
    torch_specs = [a for install in installs for a in install if re.match(r"torch\b", a)]
    assert torch_specs == [makefile_torch_pin()]  # torch once, pinned like `make install`
    torch_step = next(i for i, install in enumerate(installs) if makefile_torch_pin() in install)
    (package_step,) = [i for i, install in enumerate(installs) if "-e" in install]
    assert torch_step < package_step
    package = installs[package_step][installs[package_step].index("-e") + 1]
    extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", package).group(1) or ""
    assert set(filter(None, extras.split(","))) <= set(pyproject()["project"]["optional-dependencies"])


def test_dockerfile_keeps_conf_and_sweeps_next_to_the_code():
    instructions = dockerfile_instructions(INFRA / "docker" / "Dockerfile")
    copied = {s for i, a in instructions if i == "COPY" for s in shlex.split(a)[:-1]}
    assert {"pyproject.toml", "README.md", "platform", "conf", "sweeps"} <= copied
    last_copy = max(k for k, (i, _) in enumerate(instructions) if i == "COPY")
    (install,) = [k for k, (i, a) in enumerate(instructions) if i == "RUN" and " -e " in a]
    assert last_copy < install
    assert "deconvlab list sweeps" in instructions[install][1]  # the build fails without conf/ or sweeps/
    assert "DECONVLAB_CONF_DIR=/opt/deconvlab/conf" in " ".join(a for i, a in instructions if i == "ENV")


def test_dockerfile_base_fits_the_package_and_kuberay():
    instructions = dockerfile_instructions(INFRA / "docker" / "Dockerfile")
    base = next(a for i, a in instructions if i == "FROM")
    major, minor = map(int, re.match(r"python:(\d+)\.(\d+)", base).groups())
    needed = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"]).groups()
    assert (major, minor) >= tuple(map(int, needed))
    assert any("wget" in a for i, a in instructions if i == "RUN")  # KubeRay's probes call wget
    assert ("USER", "ray") in instructions


def test_dockerignore_keeps_what_the_image_copies():
    import fnmatch

    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert ".venv" in patterns and "ray_results" in patterns
    for kept in ("pyproject.toml", "README.md", "platform", "conf", "sweeps", "conf/train.yaml"):
        assert not any(fnmatch.fnmatch(kept, p.removeprefix("**/")) for p in patterns), kept


def test_mlflow_image_has_the_team_extra_and_a_matching_mlflow():
    from importlib.metadata import version

    installs = [a for install in pip_installs(INFRA / "mlflow" / "Dockerfile") for a in install]
    names = {re.split(r"[<>=\[]", a)[0].lower() for a in installs}
    team = pyproject()["project"]["optional-dependencies"]["team"]
    assert {re.split(r"[<>=\[]", r)[0].lower() for r in team} <= names
    (pinned,) = [a.split("==")[1] for a in installs if re.match(r"mlflow(\[[\w,]+\])?==", a)]
    assert pinned.split(".")[0] == version("mlflow").split(".")[0]
    assert any(a.startswith("mlflow[auth]==") for a in installs)  # the basic-auth app needs Flask-WTF
    compose = load("mlflow/docker-compose.yaml")
    assert compose["services"]["mlflow"]["image"].endswith(f":{pinned}")


# -------------------------------------------------------------------------------------- MLflow compose
def interpolate(text: str, env: dict[str, str]) -> str:
    """Docker Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ with ``env``."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group(1), match.group(2), match.group(3)
        if name in env and (env[name] or not (operator or "").startswith(":")):
            return env[name]
        assert not (operator or "").endswith("?"), f"compose needs {name} (not in .env.example)"
        return default or ""

    return re.sub(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}", substitute, text)


# Secrets .env.example leaves empty on purpose: they have no default, and compose refuses to start without them.
REQUIRED_SECRETS = ("MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines()
                if line and not line.startswith("#"))


def compose_services(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose services with ``env`` (default: .env.example with the required secrets filled in)."""
    env = env if env is not None else {**env_example(), **{name: "s3cret-" * 3 for name in REQUIRED_SECRETS}}
    text = interpolate((INFRA / "mlflow" / "docker-compose.yaml").read_text(), env)
    return yaml.safe_load(text)["services"]


def test_compose_mlflow_server_uses_its_postgres_and_minio():
    from mlflow.cli import cli

    services = compose_services()
    assert {"postgres", "minio", "create-buckets", "mlflow"} <= set(services)
    server = services["mlflow"]
    assert server["command"][:2] == ["mlflow", "server"]
    params = parse_click(cli, "mlflow", server["command"][1:]).params
    backend = urlparse(params["backend_store_uri"])
    postgres = services["postgres"]["environment"]
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname == "postgres"
    assert backend.username == postgres["POSTGRES_USER"] and backend.password == postgres["POSTGRES_PASSWORD"]
    assert backend.path == f"/{postgres['POSTGRES_DB']}" and (backend.port or 5432) == 5432
    artifacts = urlparse(params["artifacts_destination"] or params["default_artifact_root"])
    assert artifacts.scheme == "s3" and params["serve_artifacts"]
    buckets = " ".join(services["create-buckets"]["command"])
    created = re.findall(r"mc mb (?:--ignore-existing )?local/([\w.-]+)", buckets)
    assert artifacts.hostname in created
    endpoint = urlparse(server["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    minio = services["minio"]["environment"]
    assert server["environment"]["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert server["environment"]["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    assert params["host"] == "0.0.0.0" and f"{params['port']}:{params['port']}" in server["ports"]


def test_compose_server_answers_the_hosts_clients_use():
    from mlflow.cli import cli
    from mlflow.server.security_utils import is_allowed_host_header

    params = parse_click(cli, "mlflow", compose_services()["mlflow"]["command"][1:]).params
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    tracking = urlparse(env_file()["MLFLOW_TRACKING_URI"])
    for host in (tracking.netloc, "mlflow:5000", "localhost:5000", "10.1.2.3:5000", "172.18.0.4:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")


def test_compose_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$${SET} ${SET} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == "${SET} x d d "
    with pytest.raises(AssertionError):
        interpolate("${UNSET:?needed}", env)


# ------------------------------------------------------------------------------- MLflow authentication
def auth_ini():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    return ini["mlflow"]


def auth_store_folder() -> str:
    """The folder of the auth app's SQLite user store (basic_auth.ini: database_uri = sqlite:////...)."""
    uri = auth_ini()["database_uri"]
    assert uri.startswith("sqlite:////"), uri
    return str(Path(uri.removeprefix("sqlite:///")).parent)


def test_the_auth_config_has_no_password_and_mlflow_reads_it(monkeypatch):
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import ALL_PERMISSIONS

    assert "admin_password" not in auth_ini()  # only ever from MLFLOW_AUTH_ADMIN_PASSWORD, a secret
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.admin_password is None and config.admin_username == "admin"
    assert config.default_permission in ALL_PERMISSIONS
    instructions = dockerfile_instructions(INFRA / "mlflow" / "Dockerfile")
    assert ("COPY", "basic_auth.ini /etc/mlflow/basic_auth.ini") in instructions
    assert ("ENV", "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini") in instructions
    assert any(i == "RUN" and f"chown mlflow:mlflow {auth_store_folder()}" in a for i, a in instructions)


def test_compose_server_runs_the_auth_app_with_secrets_and_no_default():
    from mlflow.cli import cli

    example = env_example()
    assert all(example[name] == "" for name in REQUIRED_SECRETS)  # no default in the template
    with pytest.raises(AssertionError, match="compose needs MLFLOW_ADMIN_PASSWORD"):
        compose_services(example)  # docker compose refuses to start the same way (${VAR:?...})
    server = compose_services()["mlflow"]
    assert parse_click(cli, "mlflow", server["command"][1:]).params["app_name"] == "basic-auth"
    assert server["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "s3cret-" * 3
    assert server["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "s3cret-" * 3
    assert f"mlflow-auth:{auth_store_folder()}" in server["volumes"]


def mlflow_manifest() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / "kuberay" / "mlflow-server.yaml").read_text())}


def test_kubernetes_mlflow_server_runs_the_auth_app_with_every_secret_from_a_secret(monkeypatch):
    from mlflow.cli import cli
    from mlflow.server.security_utils import is_allowed_host_header

    documents = mlflow_manifest()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_BACKEND_STORE_URI"} <= set(env)
    for name, entry in env.items():
        if re.search(r"PASSWORD|SECRET|KEY_ID|STORE_URI", name):
            assert "value" not in entry, f"{name} is written in the manifest"
            assert entry["valueFrom"]["secretKeyRef"]["name"] == "mlflow-server", name
    # The server reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI (the Secret), not from its command.
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql+psycopg2://mlflow:pw@db.internal:5432/mlflow")
    params = parse_click(cli, "mlflow", container["command"][1:]).params
    assert params["app_name"] == "basic-auth" and params["backend_store_uri"].startswith("postgresql")
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]
    assert container["image"] == load("mlflow/docker-compose.yaml")["services"]["mlflow"]["image"]
    allowed = params["allowed_hosts"].split(",")
    assert is_allowed_host_header(allowed, "mlflow:5000") and not is_allowed_host_header(allowed, "evil.com:5000")
    # The user store on its volume; /health (no login needed) for the probes; inside the cluster only.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[auth_store_folder()]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims[volume] == documents["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["fsGroup"] == 1000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert documents["Service"]["spec"]["type"] == "ClusterIP"


# ------------------------------------------------------------------------------------ Ray authentication
def test_ray_token_authentication_is_on_for_every_process():
    assert env_file()["RAY_AUTH_MODE"] == "token"  # every process reads deconvlab.env
    token = {"secretRef": {"name": RAY_TOKEN_SECRET}}
    login = {"secretRef": {"name": MLFLOW_LOGIN_SECRET}}
    for where, container in all_containers():  # head, workers and the RayJob submitter
        assert token in container["envFrom"], where
        # Only the head pod runs the sweep driver, the one MLflow client: workers never get the login.
        assert (login in container["envFrom"]) == ("/head/" in where), where
    for name, document in kuberay_documents().items():
        spec = cluster_spec(document)
        assert token in spec["autoscalerOptions"]["envFrom"], name
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name  # no NodePort or LoadBalancer
    # The cluster launcher copies the token file to every node; ~/.bashrc there sources deconvlab.env.
    launcher = load("ray-cluster-launcher.yaml")
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(argv[:2] == ["get-auth-token", "--generate"]
               for where, program, argv in COMMANDS if where == "infra/ray-cluster-launcher.yaml")


def test_the_ray_dashboard_listens_on_a_private_address():
    from ray.scripts.scripts import cli

    launcher = load("ray-cluster-launcher.yaml")
    (argv,) = [argv for command in launcher["head_start_ray_commands"]
               for program, argv in shell_commands(command) if program == "ray" and argv[:1] == ["start"]]
    host = parse_click(cli, "ray", argv).params["dashboard_host"]
    assert host == launcher["provider"]["head_ip"] and ipaddress.ip_address(host).is_private
    # KubeRay: the pod's own addresses (its private pod IP and loopback, which KubeRay's probes and
    # kubectl port-forward use), behind a ClusterIP Service (above), never a node's or a public address.
    for document in kuberay_documents().values():
        assert cluster_spec(document)["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
