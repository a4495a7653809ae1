"""Declared dependencies: every import is declared, installs follow constraints.txt, Ray matches the cluster."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Imported only where an extra is installed (a clear UserError otherwise), not by every install.
OPTIONAL_IMPORTS = {"optuna"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    local = {p.stem for p in folder.glob("*.py")} | {"deconvlab", "conftest"}
    return {m for m in found - local if m not in sys.stdlib_module_names}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Import name -> the distributions that provide it (as installed here)."""
    provided = metadata.packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in provided.get(m, [])} for m in modules}


def _declared(*extras: str) -> set[str]:
    requirements = list(PYPROJECT["dependencies"])
    for extra in extras:
        requirements += PYPROJECT["optional-dependencies"][extra]
    return {_name(r) for r in requirements}


@pytest.mark.parametrize(("folder", "extras"), [("platform", ()), ("tests", ("dev",)), ("benchmarks", ("dev",))])
def test_every_third_party_import_is_declared(folder, extras):
    declared = _declared(*extras)
    modules = _third_party_imports(REPO / folder) - (OPTIONAL_IMPORTS if folder == "platform" else set())
    missing = {m: sorted(d) for m, d in _distributions(modules).items() if not d & declared and m != "tomli"}
    assert not missing, f"imported in {folder}/ but not declared: {missing}"


def test_the_optional_imports_are_extras():
    assert {_name(r) for r in PYPROJECT["optional-dependencies"]["optuna"]} == {"optuna"}
    assert "optuna" not in _declared()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_declared_distribution_within_its_bounds():
    from packaging.requirements import Requirement

    pins = _constraints()
    for requirement in [*PYPROJECT["dependencies"], *PYPROJECT["optional-dependencies"]["dev"]]:
        parsed = Requirement(requirement)
        name = parsed.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert parsed.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"


def test_this_environment_was_installed_from_the_constraints():
    """What CI (make install) and the Docker image install; a drift means the pins were not used."""
    pins = _constraints()
    drift = {}
    for name in _declared("dev"):
        installed = metadata.version(name).split("+")[0]
        if pins.get(name) not in (None, installed):
            drift[name] = (installed, pins[name])
    assert not drift, f"installed vs constraints.txt: {drift} (make constraints after an upgrade)"


def test_ray_is_pinned_to_the_clusters_minor_version():
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    cluster = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    from packaging.requirements import Requirement

    (ray,) = [Requirement(r) for r in PYPROJECT["dependencies"] if _name(r) == "ray"]
    assert ray.specifier.contains(cluster)
    major, minor = (int(part) for part in cluster.split(".")[:2])
    assert not ray.specifier.contains(f"{major}.{minor + 1}.0")  # a driver of the next minor is refused
    assert _constraints()["ray"] == cluster
