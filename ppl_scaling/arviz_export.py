"""Export SMC results to ArviZ.

Layout (one ``chain`` per independent SMC run, one ``draw`` per particle):

- ``posterior``: the final particles, *weighted* (not resampled). Each array in
  the state becomes a variable with dims (chain, draw, *event dims*): a dict
  state keeps its keys, a bare array is called ``x``, a tuple gives ``x0, x1, ...``.
  States that are not arrays (token sequences, objects) are left out; a state with
  an ``arviz_fields()`` method (e.g. an LLM step state: answers, rewards, lengths)
  adds the per-particle arrays it returns, and ``extra`` (one dict of per-particle
  arrays per run, e.g. ``ppl_scaling.models.harness.llm_posterior_fields(run)``) adds
  more (it wins over a state's field of the same name), after those a result keeps in
  ``info["posterior_fields"]`` (the LLM harness puts the candidates' answers, rewards
  and lengths there). A result with final ``rewards`` gets a ``reward`` variable.
- ``sample_stats``: ``log_weight`` (chain, draw), the unnormalised final
  log-weights, and ``log_marginal_likelihood`` (chain). ``attrs["weighted"] = True``.
  Weighted summaries need these weights (``arviz`` functions that accept
  ``weights=``), or draw an unweighted sample with ``SMCResult.resample``.
- ``smc_stats``: per-step diagnostics on a ``step`` dim, NaN-padded when runs
  have different lengths: ``ess``, ``resampled`` (0/1), ``log_evidence_increment``,
  ``log_evidence`` (cumulative), and ``n_steps`` (chain).

With arviz < 1 the result is an ``InferenceData``; with arviz >= 1 an
``xarray.DataTree`` with the same groups.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np


def _state_arrays(state: Any) -> dict[str, np.ndarray]:
    def as_array(v: Any) -> np.ndarray | None:
        if hasattr(v, "detach"):
            return v.detach().cpu().numpy()
        if isinstance(v, np.ndarray) or type(v).__module__.startswith("jax"):
            return np.asarray(v)
        return None

    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (tuple, list)):
        items = ((f"x{i}", v) for i, v in enumerate(state))
    else:
        items = [("x", state)]
    out = {}
    for name, v in items:
        arr = as_array(v)
        if arr is not None:
            out[str(name)] = arr
    return out


def _pad(rows: Sequence[np.ndarray]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _posterior_fields(result: Any, extra: Any) -> dict[str, np.ndarray]:
    fields = _state_arrays(result.particles)
    hook = getattr(result.particles, "arviz_fields", None)
    if callable(hook):
        fields.update({str(k): np.asarray(v) for k, v in hook().items()})
    if getattr(result, "rewards", None) is not None:
        fields.setdefault("reward", np.asarray(result.rewards, dtype=np.float64))
    fields.update({str(k): np.asarray(v) for k, v in (result.info.get("posterior_fields") or {}).items()})
    if extra:
        fields.update({str(k): np.asarray(v) for k, v in extra.items()})
    n = result.num_particles
    for name, arr in fields.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ValueError(f"posterior field {name!r} has shape {arr.shape}; it needs one entry per particle ({n})")
    return fields


def to_arviz(results: Sequence[Any], extra: Sequence[dict[str, Any] | None] | dict[str, Any] | None = None):
    """One ArviZ object from one or more ``SMCResult`` (independent runs = chains).
    ``extra``: per-particle arrays for the posterior group, one dict per run (a single
    dict for a single run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    import xarray as xr

    results = list(results)
    if not results:
        raise ValueError("to_arviz needs at least one result")
    if extra is None or isinstance(extra, dict):
        extra = [extra] * len(results) if len(results) == 1 or extra is None else None
        if extra is None:
            raise ValueError("extra must hold one dict per run (a single dict only for a single run)")
    extra = list(extra)
    if len(extra) != len(results):
        raise ValueError(f"got {len(extra)} extra dicts for {len(results)} runs")
    per_run = [_posterior_fields(r, e) for r, e in zip(results, extra)]
    posterior = {}
    for name in per_run[0]:
        if any(name not in p for p in per_run):
            continue
        stacked = np.stack([p[name] for p in per_run])
        dims = ["chain", "draw"] + [f"{name}_dim_{i}" for i in range(stacked.ndim - 2)]
        posterior[name] = (dims, stacked)
    sample_stats = {
        "log_weight": (["chain", "draw"], np.stack([r.log_weights for r in results])),
        "log_marginal_likelihood": (["chain"], np.array([r.log_evidence for r in results])),
    }
    smc_stats = {
        "ess": (["chain", "step"], _pad([r.ess for r in results])),
        "resampled": (["chain", "step"], _pad([r.resampled.astype(float) for r in results])),
        "log_evidence_increment": (["chain", "step"], _pad([r.log_evidence_increments for r in results])),
        "log_evidence": (["chain", "step"], _pad([r.cumulative_log_evidence for r in results])),
        "n_steps": (["chain"], np.array([len(r.ess) for r in results])),
    }
    info = results[0].info
    attrs = {"weighted": 1, "inference_library": "ppl_scaling",
             "num_particles": results[0].num_particles,
             "resampling": str(info.get("resampling")), "ess_threshold": float(info.get("ess_threshold", np.nan))}
    groups = {
        "posterior": xr.Dataset(posterior, attrs=attrs),
        "sample_stats": xr.Dataset(sample_stats, attrs=attrs),
        "smc_stats": xr.Dataset(smc_stats, attrs=attrs),
    }
    if int(az.__version__.split(".")[0]) >= 1:
        return xr.DataTree.from_dict(groups)
    return az.InferenceData(**groups)
