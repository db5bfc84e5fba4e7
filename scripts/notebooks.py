"""Tutorial notebooks from lists of ``("md" | "code", source)`` cells: no outputs, stable
cell ids (regenerating a tutorial gives the same file), the ``python3`` kernel."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src.strip()) if kind == "md" else new_code_cell(src.strip())
                             for kind, src in cells])
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def write(cells: list[tuple[str, str]], path: Path) -> None:
    nbformat.write(notebook(cells), path)
    print("wrote", path)
