"""The main job of ``make demo``: SMC on the bundled models, printed tables and saved plots.

1. a particle filter on a linear-Gaussian state-space model vs the exact Kalman filter;
2. the toy arithmetic task: particle filtering vs best-of-N / self-consistency / beam
   search at equal budgets, with the bundled tiny LM and learned PRM (scaling table and plot);
3. FK steering of the bundled digits diffusion model vs best-of-N and noise search
   (image grid and reward-vs-particles plot).
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
    results = {"state_space": state_space_demo(out)}
    from .models.evaluate import scaling_comparison

    print("\n== Toy arithmetic task: particle filtering vs baselines at equal budgets (bundled LM and PRM) ==")
    results["llm_scaling"] = scaling_comparison(out / "llm_scaling", quick=True)
    print(results["llm_scaling"]["markdown"])
    from .diffusion.demo import run_image_demo

    print("\n== FK steering of the bundled digits diffusion model ==")
    results["image_steering"] = image = run_image_demo(out / "image_steering", quick=True)
    print(_format_image_demo(image))
    print(f"\nplots and tables: {out.resolve()}")
    return results


def _format_image_demo(numbers: dict) -> str:
    """Held-out accuracy and reward per method and particle count, as a markdown table."""
    particles = numbers["particles"]
    lines = [f"target digit {numbers['target']}, {numbers['num_inference_steps']} steps, "
             f"{numbers['runs']} runs per cell; held-out classifier accuracy (mean reward)",
             "| method | " + " | ".join(f"N={n}" for n in particles) + " |",
             "|---|" + "---:|" * len(particles)]
    for method in ("base", "fk_steering", "best_of_n", "zero_order"):
        row = numbers[method]
        cells = [f"{a:.2f} ({r:.2f})" for a, r in zip(row["heldout_accuracy"], row["reward"])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"grid: {numbers['grid']}\nplot: {numbers['plot']}")
    return "\n".join(lines)
