"""The README's Python examples run as written (offline, on the bundled models).

Every block fenced as ```python is executed, in its own namespace, from the repository
root; blocks fenced as ```py are illustrations that need what tests cannot have (a GPU,
a model hub, a running server) and are only compiled.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text()
RUN = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)
SHOW = re.findall(r"^```py\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_the_readme_has_examples_to_run():
    assert len(RUN) >= 3


@pytest.mark.parametrize("code", RUN, ids=[f"block{i}" for i in range(len(RUN))])
def test_readme_example_runs(code, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("code", SHOW, ids=[f"shown{i}" for i in range(len(SHOW))])
def test_readme_illustration_compiles(code):
    compile(code, "README.md", "exec")
