"""The model catalogue as `deconvlab list models` prints it, read from the model modules' source.

Importing :mod:`deconvlab.models` registers every model, which costs the import of torch (about a second
here, more on a busy machine) for a listing of names. The ``@register_model("name", "family", ...)``
decorators are plain literals, so the listing reads them with ``ast`` instead; ``tests/test_models.py``
holds it equal to the imported catalogue (name, family, builder).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
DECORATOR = "register_model"


@dataclass(frozen=True)
class ListedModel:
    """One catalogue entry as its source declares it."""

    name: str
    family: str
    target: str


def _entries(path: Path) -> list[ListedModel]:
    module = f"deconvlab.models.{path.stem}"
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                    and decorator.func.id == DECORATOR and len(decorator.args) >= 2):
                name, family = (ast.literal_eval(arg) for arg in decorator.args[:2])
                found.append(ListedModel(name, family, f"{module}.{node.name}"))
    return found


def listed_models() -> list[ListedModel]:
    """Every registered model, sorted by name, without importing the models."""
    entries = [entry for path in sorted(MODELS_DIR.glob("*.py")) for entry in _entries(path)]
    return sorted(entries, key=lambda entry: entry.name)
