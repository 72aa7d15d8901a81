"""The quickstart notebook runs top to bottom (so it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def overlays(notebook: nbformat.NotebookNode) -> int:
    """How many pictures the notebook's code cells show."""
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    return sum(1 for out in outputs if "image/png" in out.get("data", {}))


def test_quickstart_notebook_is_saved_with_its_pictures() -> None:
    # a reader on GitHub sees the overlays without running anything
    assert overlays(nbformat.read(NOTEBOOK, as_version=4)) >= 2


def test_quickstart_notebook_executes() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert overlays(notebook) >= 2
