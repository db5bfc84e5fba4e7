"""Diagnostic plots (matplotlib, imported lazily): ESS traces, particle
genealogies, cumulative evidence, filtering bands.

Each function draws on ``ax`` if given (else a new figure) and returns the axes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3))
    return ax


def plot_ess(results: Any, ax=None, labels: Sequence[str] | None = None):
    """ESS / N per step for one or several results; dots mark resampling steps."""
    ax = _axes(ax)
    results = results if isinstance(results, (list, tuple)) else [results]
    for i, r in enumerate(results):
        frac = r.ess / r.num_particles
        line, = ax.plot(frac, label=labels[i] if labels else None)
        steps = np.flatnonzero(r.resampled)
        ax.plot(steps, frac[steps], "o", ms=3, color=line.get_color())
    ax.set(xlabel="step t", ylabel="ESS / N", ylim=(0, 1.05), title="Effective sample size (dots: resampled)")
    if labels:
        ax.legend()
    return ax


def plot_log_evidence(result: Any, ax=None, exact: float | None = None):
    """Cumulative log-evidence estimate log Z_t; ``exact`` draws the true final value."""
    ax = _axes(ax)
    ax.plot(result.cumulative_log_evidence, label="SMC estimate")
    if exact is not None:
        ax.axhline(exact, color="k", ls="--", lw=1, label="exact")
        ax.legend()
    ax.set(xlabel="step t", ylabel="log Z_t", title="Cumulative log evidence")
    return ax


def plot_genealogy(result: Any, ax=None, value: Any = None):
    """Particle genealogy: every particle's link to its ancestor (grey) and the
    surviving lines of the final particles (black). The vertical axis is the
    particle's value (``value(x) -> (N,)``; default: the state itself when it is
    a 1-D array) or, for other states, its index."""
    ax = _axes(ax)
    if result.history is None:
        raise ValueError("run smc(..., store_history=True) to plot the genealogy")
    if value is None:
        value = (lambda x: np.asarray(x, dtype=float)) if np.ndim(result.history[0]) == 1 else \
                (lambda x: np.arange(result.num_particles, dtype=float))
    vals = np.array([value(x) for x in result.history])
    steps = len(vals)
    for t in range(1, steps):
        A = result.ancestors[t]
        ax.plot([t - 1, t], [vals[t - 1][A], vals[t]], color="0.8", lw=0.4, zorder=1)
    B = result.lineage()
    for t in range(1, steps):
        for a, b in np.unique(B[t - 1 : t + 1].T, axis=0):  # surviving parent -> child links
            ax.plot([t - 1, t], [vals[t - 1][a], vals[t][b]], color="k", lw=0.8, zorder=2)
    ax.set(xlabel="step t", ylabel="particle value" if np.ndim(result.history[0]) == 1 else "particle index",
           title=f"Genealogy ({result.num_unique_ancestors()[0]} ancestor(s) at t=0)")
    return ax


def plot_filtering(result: Any, ax=None, exact_mean: np.ndarray | None = None, exact_var: np.ndarray | None = None,
                   truth: np.ndarray | None = None):
    """Weighted filtering mean ± 2 sd of scalar states, optionally with the exact band and the truth."""
    ax = _axes(ax)
    mean = result.filtering_mean()
    var = result.filtering_mean(lambda x: np.asarray(x, dtype=float) ** 2) - mean**2
    t = np.arange(len(mean))
    ax.plot(t, mean, label="SMC mean")
    ax.fill_between(t, mean - 2 * np.sqrt(var), mean + 2 * np.sqrt(var), alpha=0.25, label="SMC ± 2 sd")
    if exact_mean is not None:
        ax.plot(t, exact_mean, "k--", lw=1, label="exact mean")
        if exact_var is not None:
            ax.plot(t, exact_mean + 2 * np.sqrt(exact_var), "k:", lw=0.8)
            ax.plot(t, exact_mean - 2 * np.sqrt(exact_var), "k:", lw=0.8)
    if truth is not None:
        ax.plot(t, truth, ".", color="C3", ms=3, label="true state")
    ax.set(xlabel="step t", ylabel="x_t", title="Filtering distribution")
    ax.legend(fontsize=7)
    return ax
