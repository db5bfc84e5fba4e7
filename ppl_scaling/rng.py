"""Explicit randomness.

Every random choice in ppl-scaling flows from one ``numpy.random.Generator``.
Torch and JAX code derive their own generators from it, so one seed reproduces
a whole run and no code touches global RNG state.

    rng = as_generator(seed=0)
    g = torch_generator(rng)          # torch.Generator seeded from rng
    key = jax_key(rng)                # jax.random key seeded from rng

JAX is optional (``pip install "ppl-scaling[jax]"``): it is imported only when a JAX
function is called, never by ``import ppl_scaling``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

_MAX_SEED = 2**63 - 1


def as_generator(seed: int | None = None, rng: np.random.Generator | None = None) -> np.random.Generator:
    """Return ``rng`` if given, else a fresh ``Generator`` seeded with ``seed``."""
    if rng is not None and seed is not None:
        raise ValueError("pass either seed or rng, not both")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                            "create one with numpy.random.default_rng(seed)")
        return rng
    return np.random.default_rng(seed)


def derive_seed(rng: np.random.Generator) -> int:
    """Draw a 63-bit integer seed from ``rng`` (for libraries with their own RNG)."""
    return int(rng.integers(_MAX_SEED))


def torch_generator(rng: np.random.Generator, device: str = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded from ``rng``."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(rng))
    return g


JAX_INSTALL_HINT = 'pip install "ppl-scaling[jax]"'


def import_jax(feature: str, module: str = "jax"):
    """Import ``module`` (``jax`` or a submodule) for ``feature``; JAX is an optional extra,
    so a missing install raises ``ImportError`` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{feature} needs JAX, which is an optional extra of ppl-scaling: "
                          f"{JAX_INSTALL_HINT} (or pip install jax). ({e})") from e


def jax_key(rng: np.random.Generator):
    """A JAX PRNG key seeded from ``rng`` (needs the ``jax`` extra)."""
    jax = import_jax("ppl_scaling.rng.jax_key")
    return jax.random.key(derive_seed(rng) % (2**32))


@contextlib.contextmanager
def torch_global_seed(rng: np.random.Generator) -> Iterator[None]:
    """Run a block that uses torch's *global* RNG (e.g. Pyro's samplers) with a
    seed drawn from ``rng``, restoring the global state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(rng))
        yield
