"""Batched particle states.

A state holds N particles along its leading axis. Supported containers:
numpy arrays, torch tensors, JAX arrays, dicts / tuples / lists of these (nested),
and any object implementing the two-method protocol::

    state.take(idx)          -> state of the particles idx (ancestor indices)
    state.where(mask, other) -> state taking self where mask, other elsewhere

``take`` is needed for resampling; ``where`` only when particles finish early
(``done``), to freeze finished particles.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_jax(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def take(state: Any, idx: np.ndarray) -> Any:
    """Select particles ``idx`` (an int array) from a batched ``state``."""
    if isinstance(state, np.ndarray):
        return state[idx]
    if _is_torch(state):
        import torch

        return state[torch.as_tensor(np.ascontiguousarray(idx), device=state.device)]
    if _is_jax(state):
        return state[np.asarray(idx)]
    if isinstance(state, dict):
        return {k: take(v, idx) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(take(v, idx) for v in state)
    if hasattr(state, "take"):
        return state.take(idx)
    raise TypeError(
        f"cannot resample a state of type {type(state).__name__}: use numpy/torch/JAX arrays, "
        "dicts or tuples of them, or give the class a take(idx) method"
    )


def where(mask: np.ndarray, new: Any, old: Any) -> Any:
    """Particle-wise select: ``new`` where ``mask`` is True, ``old`` elsewhere."""
    if isinstance(new, np.ndarray):
        return np.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)
    if _is_torch(new):
        import torch

        m = torch.as_tensor(mask, device=new.device).reshape(mask.shape + (1,) * (new.dim() - 1))
        return torch.where(m, new, old)
    if _is_jax(new):
        import jax.numpy as jnp

        return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)
    if isinstance(new, dict):
        return {k: where(mask, new[k], old[k]) for k in new}
    if isinstance(new, (tuple, list)):
        return type(new)(where(mask, a, b) for a, b in zip(new, old))
    if hasattr(new, "where"):
        return new.where(mask, old)
    raise TypeError(
        f"cannot freeze finished particles in a state of type {type(new).__name__}: "
        "give the class a where(mask, other) method"
    )


def num_particles(state: Any) -> int | None:
    """Length of the leading axis of ``state`` (None if it cannot be told)."""
    if isinstance(state, np.ndarray) or _is_torch(state) or _is_jax(state):
        return int(state.shape[0]) if state.ndim > 0 else None
    if isinstance(state, dict) and state:
        return num_particles(next(iter(state.values())))
    if isinstance(state, (tuple, list)) and state:
        return num_particles(state[0])
    n = getattr(state, "num_particles", None)
    return int(n) if n is not None else None
