"""The layers, read from the source: the CLI on top, then the job (``pipelines``) and training, then
the library (``evf``). Nothing imports upward, and no project module imports itself in a cycle.

Every ``import`` statement counts, including those inside functions (a lazy import is still a
dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Each layer is a folder at the repository root, installed inside the one ``evf`` package.
FOLDERS = {"evf": "evf", "cli": "evf.cli", "pipelines": "evf.pipelines", "training": "evf.training"}

# Layer of a module: the first prefix that matches (order matters: the library's prefix comes last).
LAYERS = (("evf.cli", 3), ("evf.pipelines", 2), ("evf.training", 2), ("evf", 1))
# The two middle layers stand beside each other: neither imports the other.
SIBLINGS = {("evf.pipelines", "evf.training"), ("evf.training", "evf.pipelines")}


def module_name(path: Path, root: Path) -> str:
    folder, *parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([FOLDERS[folder], *parts])


def test_each_folder_holds_one_layer() -> None:
    """The folders say what the layers are: the library's folder holds no module of a higher layer."""
    library = {layer(module_name(p, REPO))[0] for p in (REPO / "evf").rglob("*.py")}
    assert library == {"evf"}


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute imports only)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def project_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a.b import c`` counts as ``a.b``)."""
    files = {module_name(p, root): p for folder in FOLDERS for p in (root / folder).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = {m for m in imports_of(path) if m.split(".")[0] == "evf"}
        graph[name] = {m for m in targets if m in files and m != name}
    return graph


def layer(module: str) -> tuple[str, int]:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, level
    raise AssertionError(f"{module} is in no layer")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        here, level = layer(module)
        for target in sorted(targets):
            there, target_level = layer(target)
            if target_level > level or (here, there) in SIBLINGS:
                found.append(f"{module} ({here}) imports {target} ({there})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between project modules (depth-first search, each cycle reported once)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "active"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "active":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_nothing_imports_upward() -> None:
    graph = project_graph(REPO)
    assert {"evf.predictor", "evf.cli", "evf.pipelines.job", "evf.training.trainer"} <= set(graph)
    assert violations(graph) == []


def test_no_import_cycles() -> None:
    assert cycles(project_graph(REPO)) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "evf/metrics.py",
            "from evf.pipelines.job import run_job\n",
            "evf.metrics (evf) imports evf.pipelines.job",
        ),
        ("evf/io.py", "def f():\n    import evf.cli\n", "evf.io (evf) imports evf.cli"),
        (
            "pipelines/job.py",
            "from evf.training import train\n",
            "evf.pipelines.job (evf.pipelines) imports evf.training",
        ),
    ],
)
def test_the_checker_sees_an_upward_import(tmp_path: Path, module: str, source: str, expected: str) -> None:
    """The checker itself, on a small tree with one violation planted (so the tests above can fail)."""
    for name in (
        "evf/__init__.py",
        "evf/io.py",
        "evf/metrics.py",
        "cli/__init__.py",
        "training/__init__.py",
        "pipelines/__init__.py",
        "pipelines/job.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / module).write_text(source)
    assert any(line.startswith(expected) for line in violations(project_graph(tmp_path)))


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    for name, source in {
        "evf/__init__.py": "",
        "evf/a.py": "import evf.b\n",
        "evf/b.py": "from evf.a import x\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert cycles(project_graph(tmp_path)) == [["evf.a", "evf.b", "evf.a"]]
