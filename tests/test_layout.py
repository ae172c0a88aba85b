"""The package's shape: no import cycles between modules or between subpackages, and old paths still work.

Imports are read with ``ast``, those inside functions included (an import moved into a
function to dodge a cycle is still a cycle); only ``if TYPE_CHECKING:`` blocks are skipped,
since they never run.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoprune

PACKAGE = Path(autoprune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str) -> set[str]:
    """The autoprune modules ``name`` imports, with the subpackages whose ``__init__`` that runs."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    targets = set()
    for target in found & MODULES.keys():
        parts = target.split(".")
        targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # parents' __init__ run first
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # running already
    return targets - ancestors - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _stage(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_module_imports_itself_through_others():
    graph = {name: _imports(name) for name in MODULES if name != "autoprune"}
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph))


def test_the_subpackages_are_layered():
    """Stages import downwards only: a package-level cycle breaks as soon as an ``__init__`` re-exports."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        if name != "autoprune":
            graph.setdefault(_stage(name), set()).update(_stage(t) for t in _imports(name) if _stage(t) != _stage(name))
    assert _cycle(graph) is None, "subpackages import each other: " + " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_subpackage_lists_what_it_exports():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "autoprune":
            module = importlib.import_module(name)
            assert module.__all__, name
            assert all(hasattr(module, item) for item in module.__all__), name


OLD_PATHS = {"autoprune.groups": "autoprune.prune.groups", "autoprune.training": "autoprune.train.loop",
             "autoprune.unstructured": "autoprune.study.weights"}


def test_an_old_import_path_still_works_with_a_deprecation_warning():
    """In a fresh interpreter (one for all: each import of torch costs seconds), as a user's script meets it."""
    code = "import importlib, warnings\n" + "".join(
        f"with warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n"
        f"    import {old} as o\n"
        f"print(repr(str(seen[0].message)), seen[0].category.__name__, o is importlib.import_module({new!r}))\n"
        for old, new in OLD_PATHS.items())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(OLD_PATHS)
    for line, (old, new) in zip(lines, OLD_PATHS.items()):
        assert f"{old} is deprecated" in line and new in line and line.endswith("DeprecationWarning True"), line


def test_a_name_of_a_module_that_is_a_subpackage_now_still_resolves_with_a_warning():
    """``autoprune.study`` was the trials module; ``autoprune.study.trials_table`` still finds it there."""
    import autoprune.study
    from autoprune.study.trials import trials_table

    with pytest.warns(DeprecationWarning, match="autoprune.study.trials_table is deprecated"):
        assert autoprune.study.trials_table is trials_table
    with pytest.raises(AttributeError):
        autoprune.study.no_such_name


def test_a_pickle_that_names_the_old_module_still_loads(tmp_path):
    """A 0.1 ``model.pt`` of a file model names ``autoprune.models.user_object``, which rebuilds its class."""
    import io
    import pickle

    from autoprune.files import ByValue
    from autoprune.inputs.models import build_model

    (tmp_path / "oldnet.py").write_text("import torch.nn as nn\n\ndef net(num_classes=10):\n"
                                        "    return nn.Sequential(Flat(), nn.Linear(4, num_classes))\n\n"
                                        "class Flat(nn.Module):\n    def forward(self, x):\n"
                                        "        return x.flatten(1)\n")
    buffer = io.BytesIO()
    ByValue(buffer, protocol=2).dump(build_model(f"{tmp_path / 'oldnet.py'}:net", 3))
    new = buffer.getvalue()
    old = new.replace(b"cautoprune.files\nuser_object\n", b"cautoprune.models\nuser_object\n")
    assert old != new
    with pytest.warns(DeprecationWarning, match="autoprune.models is deprecated"):
        model = pickle.loads(old)
    assert model(torch.zeros(2, 4)).shape == (2, 3)
