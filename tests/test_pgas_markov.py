"""Particle Gibbs with ancestor / backward sampling on a tilted Markov chain (states that do
not hold their history, as in diffusion): the tilt's potentials depend on the parent through
the shape, so candidates are weighed by the reference's whole future and the re-parented
reference is re-weighed. The path marginals match enumeration within batch-means errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ppl_scaling import Tilted
from ppl_scaling.fk import Dynamics
from ppl_scaling.samplers import particle_gibbs

P0 = np.array([0.5, 0.3, 0.2])
P = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
T = 4


class Chain(Dynamics):
    """x_0 ~ P0, x_t | x_{t-1} ~ P[x_{t-1}]: Markov, with its transition density."""

    T = T

    def M0(self, N, rng):
        return rng.choice(3, size=N, p=P0)

    def M(self, t, xp, rng):
        return (rng.random(len(xp))[:, None] > np.cumsum(P[xp], 1)).sum(1)

    def logpt(self, t, xp, x):
        return np.log(P[xp, x])


def reward(xs):
    return 0.8 * np.asarray(xs, dtype=float)


def exact() -> np.ndarray:
    """P(x_t = v) under the tilted target p(x) exp(0.8 x_{T-1}) (every shape's, by its terminal
    correction), by enumeration of the 3^T paths."""
    post = np.zeros((T, 3))
    for path in itertools.product(range(3), repeat=T):
        p = P0[path[0]] * np.prod([P[a, b] for a, b in zip(path, path[1:])]) * np.exp(reward([path[-1]])[0])
        for t, v in enumerate(path):
            post[t, v] += p
    return post / post[0].sum()


@pytest.mark.parametrize("shape,kind", [("difference", "ancestor"), ("last", "ancestor"), ("max", "ancestor"),
                                        ("sum", "ancestor"), ("difference", "backward"), ("sum", "backward")])
def test_pgas_on_a_tilted_markov_chain_targets_the_enumerated_path_law(shape, kind):
    options = {"ancestor_sampling": True} if kind == "ancestor" else {"backward_sampling": True}
    out = particle_gibbs(Tilted(Chain(), reward, shape=shape), 2, 4000, seed=1, **options)
    paths = np.array([[int(np.asarray(s.base).ravel()[0]) for s in tr] for tr in out.trajectories])[200:]
    hits = np.stack([paths == v for v in range(3)], -1).astype(float)        # (iterations, T, 3)
    batches = hits[: len(hits) // 40 * 40].reshape(40, -1, T, 3).mean(1)
    se = batches.std(0, ddof=1) / np.sqrt(40)
    pi = exact()
    assert np.all(np.abs(hits.mean(0) - pi) < 4.5 * se + 1e-3), (hits.mean(0), pi, se)
