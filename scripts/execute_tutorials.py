"""Execute the tutorials in place, so they are stored with their outputs (tables, plots).

    python scripts/execute_tutorials.py [NOTEBOOK ...]     # default: every tutorials/*.ipynb  (make tutorials)

Each notebook runs top to bottom in ``tutorials/`` (as ``tests/test_tutorials.py`` runs it)
and is written back with its outputs, so the plots show where the repository is browsed.
Standard-error streams (progress bars of model loading, library warnings) are not stored:
they are about this machine's run, not the tutorial.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nbformat.write(nb, path)
    print("executed", path)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(TUTORIALS.glob("*.ipynb"))
    for path in paths:
        execute(path)


if __name__ == "__main__":
    main()
