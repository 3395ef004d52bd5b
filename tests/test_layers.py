"""The subpackages form layers: each imports only the ones below it, at module level or inside a
function alike. The pure cores (model, evaluation, data) never reach training, tuning or serving,
and the training path never goes through the research code in ``analysis``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samtone_ray"

# What each subpackage may import from the others. ``cli`` is the one place that joins them all.
ALLOWED = {
    "core": set(),
    "model": {"core"},
    "data": {"core", "model"},
    "evaluation": {"core", "model"},
    "tracking": {"core", "model", "evaluation"},
    "train": {"core", "model", "data", "evaluation", "tracking"},
    "encode": {"core", "model", "data", "evaluation", "tracking"},
    "serve": {"core", "model", "data", "encode", "tracking"},
    # Hard-negative mining retrieves with the encoder (encode/evaluation) and feeds tune's searches.
    "mining": {"core", "model", "data", "evaluation", "tracking", "encode"},
    "cluster": {"core", "tracking"},
    # ``tune`` may run the analyses after a tuning run.
    "analysis": {"core", "model", "data", "tracking"},
    "tune": {"core", "model", "data", "evaluation", "tracking", "train", "analysis", "mining"},
}
# Deprecated re-exports kept for one release (deployed Serve configs, pickled MLflow models).
SHIMS = {"serving": {"serve"}, "mlflow_model": {"tracking"}}


def _imports(path: Path) -> set[str]:
    """The samtone_ray subpackages (or top-level modules) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "samtone_ray":
            names = node.module.split(".")[1:] or [alias.name for alias in node.names]
            found.add(names[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("samtone_ray."))
    found.discard("__version__")
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return rel[0]


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(ALLOWED) | {"cli"}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(SHIMS)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_stay_within_the_layers_below(path):
    owner = _owner(path)
    if owner in ("cli", "__init__"):
        return
    allowed = ALLOWED.get(owner, SHIMS.get(owner, set())) | {owner}
    wrong = _imports(path) - allowed
    assert not wrong, f"{path.relative_to(PACKAGE)} ({owner}/) imports {sorted(wrong)}; {owner}/ may import {sorted(allowed)}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from samtone_ray.train.trainer import build_model\n"
                      "import samtone_ray.serve.app\nfrom samtone_ray import __version__\n")
    assert _imports(module) == {"train", "serve"}
