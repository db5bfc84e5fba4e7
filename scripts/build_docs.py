"""Build the documentation site (the API reference from the docstrings) offline.

    python scripts/build_docs.py [OUT_DIR]        # default: site/   (make docs)

The package's subpackages live in top-level folders (samplers/, models/, diffusion/,
mapped by pyproject.toml), which mkdocstrings' static reader cannot follow; this script
mirrors the import layout as a tree of links under build/docs_src/ and runs
``mkdocs build --strict`` (every warning is an error).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("samplers", "models", "diffusion")


def mirror_package(dest: Path) -> None:
    """build/docs_src/ppl_scaling/ with links to the core's files and to the subpackage folders."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in (ROOT / "ppl_scaling").iterdir():
        if path.suffix == ".py":
            (dest / path.name).symlink_to(path)
    for name in SUBPACKAGES:
        (dest / name).symlink_to(ROOT / name, target_is_directory=True)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "site"
    mirror_package(ROOT / "build" / "docs_src" / "ppl_scaling")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
           "-d", str(out.resolve())]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
