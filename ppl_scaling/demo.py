"""The main job of ``make demo``: SMC on bundled models, printed summaries and saved plots.

Runs, in order, whatever parts are available: the state-space-model filter
(always), the toy LLM scaling comparison and the image-steering comparison
(when their bundled models and modules are present).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import smc
from .plots import plot_ess, plot_filtering, plot_genealogy
from .ssm import LinearGaussian


def state_space_demo(out_dir: Path, *, num_particles: int = 1000, T: int = 100, seed: int = 0) -> dict:
    """Bootstrap particle filter on a linear-Gaussian model vs the exact Kalman filter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    model = LinearGaussian(a=0.9, sigma_x=1.0, sigma_y=0.5)
    x, y = model.simulate(T, rng)
    result = smc(model.bootstrap(y), num_particles, rng=rng, store_history=True, progress=True)
    kalman = model.kalman(y)
    print("== Particle filter on a linear-Gaussian state-space model ==")
    print(result.summary())
    print(f"  exact log evidence {kalman.log_evidence:.4f} (Kalman filter)")
    err = np.abs(result.filtering_mean() - kalman.mean).max()
    print(f"  max |filtering mean - Kalman mean| = {err:.4f}")

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), constrained_layout=True)
    plot_filtering(result, axes[0], kalman.mean, kalman.var, truth=x)
    plot_ess(result, axes[1])
    small = smc(model.bootstrap(y[:30]), 50, seed=seed, store_history=True)
    plot_genealogy(small, axes[2])
    path = out_dir / "state_space_filter.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"  plot: {path}")
    return {"log_evidence": result.log_evidence, "exact_log_evidence": kalman.log_evidence, "max_mean_error": err}


def run_demo(out_dir: str | Path = "demo_output") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"state_space": state_space_demo(out)}
