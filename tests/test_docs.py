"""The API reference builds offline without a warning (mkdocs --strict) and documents the core."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "site"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {name: (out / "api" / name / "index.html").read_text() for name in ("core", "samplers", "models",
                                                                               "diffusion")}
    for page, names in {"core": ["SMCState", "Tilted", "Ledger", "as_potential"],
                        "samplers": ["pf_paper", "particle_gibbs", "fk_steering", "METHODS"],
                        "models": ["StepModel", "ProcessRewardModel", "run_method"],
                        "diffusion": ["DiffusionModel", "MaskedDiffusionModel", "fk_schedule"]}.items():
        missing = [n for n in names if n not in pages[page]]
        assert not missing, f"api/{page} does not document {missing}"
