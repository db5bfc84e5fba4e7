"""Packaging: what a user gets from `pip install ppl-scaling[...]` and from the sdist.

- Core dependencies are ranges, never exact pins (an exact torch pin replaced users'
  CUDA builds and made `ppl-scaling[vllm]` unresolvable next to current vLLM).
- The LICENSE file exists and matches the license metadata.
- JAX is an optional extra: `import ppl_scaling` never imports it, and the JAX entry
  points fail with an error that names the extra.
- The sdist carries the test suite with its fixtures, tutorials, scripts, benchmarks,
  docs, the bundled model assets, the Makefile and the LICENSE.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JAX_HINT = 'pip install "ppl-scaling[jax]"'


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1).lower().replace("_", "-")


def _exact_pins(reqs: list[str]) -> list[str]:
    """Requirements pinned with == or === (PEP 440 exact or arbitrary equality)."""
    return [r for r in reqs if re.search(r"===?", r.split(";")[0])]


def test_core_dependencies_are_ranges_not_pins(project):
    deps = project["dependencies"]
    assert not _exact_pins(deps), f"exact pins in core dependencies: {_exact_pins(deps)}"
    torch = [r for r in deps if _name(r) == "torch"]
    assert torch and ">=" in torch[0], f"torch should be a lower bound (torch>=X), got {torch}"


def test_optional_dependencies_are_ranges_not_pins(project):
    pinned = {extra: _exact_pins(reqs) for extra, reqs in project["optional-dependencies"].items()}
    assert not any(pinned.values()), f"exact pins in extras: {pinned}"


def test_jax_is_an_extra_not_a_core_dependency(project):
    extras = project["optional-dependencies"]
    assert "jax" not in {_name(r) for r in project["dependencies"]}
    assert "jax" in {_name(r) for r in extras["jax"]}
    # The suite has JAX-backend tests: `pip install -e .[test]` and `make test` bring jax.
    assert any(_name(r) == "jax" or r.replace(" ", "").startswith("ppl-scaling[jax]") for r in extras["test"])
    makefile = (ROOT / "Makefile").read_text()
    extras_line = re.search(r"^EXTRAS \?= (.+)$", makefile, re.M).group(1).split(",")
    assert "jax" in extras_line and "test" in extras_line


def test_makefile_installs_the_cpu_torch_wheel_first():
    """pyproject.toml asks for a range; the Makefile still puts the CPU wheel in place before
    anything else can pull a CUDA build."""
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): $(PY) pyproject.toml", 1)[1]
    torch_at, project_at = recipe.find('pip install -q "torch=='), recipe.find("pip install -q -e")
    assert 0 <= torch_at < project_at


def test_llm_extra_has_the_transformers_floor_models_hf_needs(project):
    # models/hf.py calls DynamicLayer.lazy_initialization(keys, values): two arguments since 5.0.
    tf = [r for r in project["optional-dependencies"]["llm"] if _name(r) == "transformers"]
    assert tf, "the llm extra needs transformers"
    floor = re.search(r">=\s*([0-9.]+)", tf[0])
    assert floor and tuple(int(x) for x in floor.group(1).split(".")[:2]) >= (5, 0), tf


def test_license_file_matches_metadata(project):
    text = (ROOT / "LICENSE").read_text()
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert project.get("license-files", ["LICENSE"]) == ["LICENSE"]


def test_import_does_not_import_jax(tmp_path):
    code = ("import sys, ppl_scaling, ppl_scaling.samplers, ppl_scaling.ssm, ppl_scaling.state; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))")
    # Run outside the checkout, so the installed package is imported (as a user's would be).
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def no_jax(monkeypatch):
    """Simulate an install without the jax extra: `import jax` raises ImportError."""
    for name in [m for m in sys.modules if m == "jax" or m.startswith("jax.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("jax", "jax.numpy", "jax.random"):
        monkeypatch.setitem(sys.modules, name, None)


def test_jax_key_without_jax_names_the_extra(no_jax):
    from ppl_scaling.rng import jax_key

    with pytest.raises(ImportError, match=re.escape(JAX_HINT)):
        jax_key(np.random.default_rng(0))


def test_jax_backend_without_jax_names_the_extra(no_jax):
    from ppl_scaling.ssm import LinearGaussian

    with pytest.raises(ImportError, match=re.escape(JAX_HINT)):
        LinearGaussian().bootstrap(np.zeros(3), backend="jax")
    # numpy and torch backends are untouched
    assert LinearGaussian().bootstrap(np.zeros(3), backend="numpy").T == 3


# -- the sdist ------------------------------------------------------------------------------
_SKIP = {".git", ".venv", ".venv-vllm", ".venv-particles", "__pycache__", ".pytest_cache", "build", "dist",
         "demo_output", ".ipynb_checkpoints"}


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    """Build the sdist (setuptools' PEP 517 backend, no network) from a copy of the checkout."""
    pytest.importorskip("setuptools.build_meta")
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in _SKIP or n.endswith(".egg-info")
                                                       or n.startswith(".venv")])
    out = tmp / "out"
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tarball,) = out.glob("*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
    top = names[0].split("/")[0]
    return {n[len(top) + 1:] for n in names if "/" in n}


def test_sdist_is_complete(sdist_names):
    tracked = lambda d, pattern: sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / d).glob(pattern)
                                        if "__pycache__" not in p.parts and ".venv" not in p.as_posix())
    expected = {"LICENSE", "README.md", "Makefile", "pyproject.toml", "MANIFEST.in",
                *tracked("tests", "*.py"),            # test modules and their helpers (conftest, fixtures)
                *tracked("tutorials", "*.ipynb"), *tracked("scripts", "*"), *tracked("docs", "*.md"),
                *tracked("benchmarks", "*.py"), *tracked("benchmarks", "*.md"), *tracked("benchmarks", "*.txt"),
                *tracked("models/assets", "**/*.*"), *tracked("diffusion/assets", "**/*.*")}
    for helper in ("tests/conftest.py", "tests/llm_fixtures.py", "tests/diffusion_fixtures.py", "tests/tiny_llama.py"):
        assert helper in expected
    missing = sorted(expected - sdist_names)
    assert not missing, f"missing from the sdist: {missing}"


def test_sdist_has_no_local_environments(sdist_names):
    junk = sorted(n for n in sdist_names if ".venv" in n or "__pycache__" in n or n.endswith(".pyc"))
    assert not junk, junk[:20]
