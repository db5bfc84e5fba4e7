"""Particle Gibbs (Andrieu, Doucet & Holenstein 2010).

Conditional SMC keeps one *reference* path x*_{0:T-1} alive in slot 0: slot 0 holds
x*_t at every step t (``initial`` / ``move`` pin it) and its ancestor is slot 0
(``select``); the other N-1 slots resample multinomially from all N,

    A_0 = 0,   A_i ~ Multinomial(W_{t-1})  (i >= 1),   x_t^i ~ M_t(x_{t-1}^{A_i}) (i >= 1),   x_t^0 = x*_t.

Drawing the new reference from the final weights (``draw_trajectory``) is a Markov
kernel that leaves the smoothing distribution pi(x_{0:T-1}) invariant, for any N >= 2.

Plain conditional SMC mixes badly far back in time (path degeneracy: the reference's
early states are rarely replaced). Two remedies need the transition log-density
``fk.logpt(t, xp, x)`` of M, vectorised over particles (the name ``particles`` uses):

- **ancestor sampling** (PGAS; Lindsten, Jordan & Schön 2014): at each step the
  reference's ancestor is redrawn, P(A_0 = i) ∝ W_{t-1,i} M_t(x_{t-1}^i, x*_t) Π_{s>=t} G_s,
  the potentials of the reference's future after x_{t-1}^i, so the reference path is cut
  and re-attached to other particles' histories;
- **backward sampling** (Whiteley 2010): the new reference is drawn backwards,
  x_{T-1} ~ W_{T-1}, then x_t = x_t^i with P(i) ∝ w_{t,i} M_{t+1}(x_t^i, x_{t+1}) Π_{s>t} G_s.

Both leave pi invariant. For a plain Feynman-Kac model only G_t depends on the candidate
(logG(t, xp_i, x_t)). A ``Tilted`` model's potentials depend on the path through its shape's
accumulators (``difference``: r(x_t) - r(x_{t-1}); ``last`` / ``max`` / ``sum``: the whole
history), so ``Tilted.future_log_weights`` runs the shape on from each candidate along the
future's rewards, and the re-parented reference is re-weighed (``Tilted.rebase``): exact for
Markov states (diffusion, masked diffusion) as for states that hold their history (an LLM's
step prefixes, where only parents with the same history have positive density).

    out = particle_gibbs(fk, num_particles=20, num_iterations=500, ancestor_sampling=True, seed=0)
    out.trajectories[i]            # the reference path after iteration i (1-particle states)
    stack_paths(out.trajectories)  # (iterations, T, ...) for array states
    out.ledger                     # every sweep's work, the initial SMC run included

The result is the last conditional sweep's ``SMCResult`` (its evidence is NaN: a
conditional sweep's estimate is not one of Z). Path degeneracy: a run's
``SMCResult.num_unique_ancestors()`` shows how few distinct ancestors survive far
back; with few particles PG then mixes slowly at early times.

``pg_paper`` is the LLM preset of ``METHODS``: the PF paper's weighting in sweeps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ppl_scaling.ledger import recording
from ppl_scaling.resampling import multinomial
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import SMC, SMCState, as_log_potential
from ppl_scaling.state import take, where
from ppl_scaling.weights import normalise

from .particle_filtering import paper_tilt, pf_paper_instead

__all__ = ["ConditionalSMC", "draw_trajectory", "draw_trajectory_backward", "stack_paths", "particle_gibbs",
           "pg_paper", "METHODS"]


class ConditionalSMC(SMC):
    """SMC with the ``reference`` path (one 1-particle state per step) pinned to slot 0,
    multinomial resampling before every step (module docstring).

    The reference's ancestor is ``reference_ancestor`` (slot 0, where x*_{t-1} sits);
    ancestor sampling redraws it ∝ W_{t-1,i} M_t(x_{t-1}^i, x*_t) Π_{s>=t} G_s (the reference's
    future potentials after x_{t-1}^i: ``transition_log_weights``), and the pinned x*_t is
    re-weighed under its new parent (``rebase``).
    """

    def __init__(self, fk: Any, num_particles: int, reference: Sequence[Any], *, ancestor_sampling: bool = False,
                 progress: bool = False) -> None:
        if isinstance(num_particles, (int, np.integer)) and num_particles < 2:
            raise ValueError("conditional SMC needs num_particles >= 2 (one slot is the reference)")
        if ancestor_sampling:
            require_logpt(fk, "ancestor sampling")
        self.ancestor_sampling = bool(ancestor_sampling)
        super().__init__(fk, num_particles, ess_threshold=1.0, resampling="multinomial", store_history=True,
                         progress=progress)
        self.reference = list(reference)
        self.slot = np.zeros(self.N, dtype=bool)
        self.slot[0] = True

    def _pin(self, t: int, x: Any, xp: Any = None) -> Any:
        """Slot 0 := x*_t; a model that can (``rebase``: ``Tilted``) re-weighs it after its
        parent in this sweep, xp's slot 0 (with ancestor sampling, not x*_{t-1})."""
        if t >= len(self.reference):  # the reference had finished; slot 0 stays frozen
            return x
        ref = self.reference[t]
        if xp is not None and callable(getattr(self.fk, "rebase", None)):
            ref = self.fk.rebase(t, take(xp, np.zeros(1, dtype=np.int64)), ref)
        return where(self.slot, take(ref, np.zeros(self.N, dtype=np.int64)), x)

    def initial(self, rng: np.random.Generator) -> Any:
        return self._pin(0, super().initial(rng))

    def move(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        return self._pin(t, super().move(t, xp, rng), xp)

    def select(self, t: int, rng: np.random.Generator, state: SMCState) -> tuple[np.ndarray, np.ndarray]:
        """Conditional resampling: A_i ~ Multinomial(W) for i >= 1, A_0 = ``reference_ancestor``."""
        A = multinomial(rng, state.W)
        A[0] = self.reference_ancestor(t, rng, state)
        return A, np.zeros(self.N)

    def reference_ancestor(self, t: int, rng: np.random.Generator, state: SMCState) -> int:
        """The parent slot of the reference state x*_t: 0, where x*_{t-1} is pinned, or with
        ancestor sampling a draw ∝ W_{t-1,i} M_t(x_{t-1}^i, x*_t) Π_{s>=t} G_s (module docstring)."""
        if not self.ancestor_sampling or t >= len(self.reference):
            return 0
        lw = state.log_weights + transition_log_weights(self.fk, t, state.particles, self.reference[t:], self.N)
        return int(rng.choice(self.N, p=normalise(lw)))

    def result(self, state: SMCState) -> SMCResult:
        """The sweep's result; no evidence (a conditional sweep's estimate is not one of Z)."""
        res = super().result(state)
        return replace(res, log_evidence=float("nan"), log_evidence_increments=np.full(state.t, np.nan),
                       info={**res.info, "selection": "conditional multinomial"})


def draw_trajectory(result: SMCResult, rng: np.random.Generator) -> list[Any]:
    """One path drawn from the final weights, k ~ W, traced back through the genealogy
    (needs ``store_history``): element t is the 1-particle state of its ancestor at step t."""
    k = int(rng.choice(result.num_particles, p=result.weights))
    B = result.lineage()
    return [take(x, B[t, k : k + 1]) for t, x in enumerate(result.history)]


def require_logpt(fk: Any, what: str) -> None:
    if not callable(getattr(fk, "logpt", None)):
        raise TypeError(f"{what} needs the transition log-density {type(fk).__name__}.logpt(t, xp, x) "
                        "(vectorised over particles); define it on the model (or its dynamics)")


def transition_log_weights(fk: Any, t: int, xp: Any, future: Sequence[Any], N: int) -> np.ndarray:
    """log M_t(xp_i, x_t) + Σ_{s >= t} log G_s(path through xp_i) for every particle xp_i and the
    1-particle states ``future`` = (x_t, x_{t+1}, ...). The potentials of a model that can
    (``future_log_weights``: ``Tilted``, whose shapes carry accumulators) are run on from each
    candidate; for any other model only G_t depends on the candidate (log G_t(xp_i, x_t)). The
    states are passed as they are, broadcast against the N particles ``xp`` (copying one N
    times would copy an LLM state's KV cache N times per step)."""
    x_next = future[0]
    with np.errstate(invalid="ignore"):
        if callable(getattr(fk, "future_log_weights", None)):
            potentials = fk.future_log_weights(t, xp, future)
        else:
            potentials = fk.logG(t, xp, x_next)
        return (as_log_potential(_broadcast(fk.logpt(t, xp, x_next), N), N, t, "logpt")
                + as_log_potential(_broadcast(potentials, N), N, t))


def _broadcast(value: Any, N: int) -> Any:
    """A (1,) result of a broadcast evaluation as (N,); other shapes as they are (validated later)."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    return np.broadcast_to(arr, (N,)) if arr.shape == (1,) else arr


def draw_trajectory_backward(result: SMCResult, fk: Any, rng: np.random.Generator) -> list[Any]:
    """One path by backward sampling (module docstring; needs ``store_history`` and ``fk.logpt``):
    x_{T-1} ~ W_{T-1}, then x_t = x_t^i with P(i) ∝ w_{t,i} M_{t+1}(x_t^i, x_{t+1}) Π_{s>t} G_s (the
    potentials of the drawn future after x_t^i: ``transition_log_weights``)."""
    require_logpt(fk, "backward sampling")
    if result.history is None:
        raise ValueError("backward sampling needs the run's history (store_history=True)")
    steps, N = len(result.history), result.num_particles
    k = int(rng.choice(N, p=result.weights))
    path = [take(result.history[-1], np.array([k]))]
    for t in range(steps - 2, -1, -1):
        lw = result.log_weights_history[t] + transition_log_weights(fk, t + 1, result.history[t], path, N)
        k = int(rng.choice(N, p=normalise(lw)))
        path.insert(0, take(result.history[t], np.array([k])))
    return path


def stack_paths(trajectories: Sequence[Sequence[Any]]) -> np.ndarray:
    """Array states only: the paths as one array of shape (paths, T, *event shape)."""
    return np.stack([np.concatenate([np.asarray(x) for x in path]) for path in trajectories])


def particle_gibbs(fk: Any, num_particles: int, num_iterations: int, *, ancestor_sampling: bool = False,
                   backward_sampling: bool = False, reference: Sequence[Any] | None = None,
                   seed: int | None = None, rng: np.random.Generator | None = None,
                   progress: bool = False) -> SMCResult:
    """``num_iterations`` sweeps of particle Gibbs on ``fk``: the last sweep's ``SMCResult``
    with the reference path after each iteration in ``trajectories`` and the ledger of
    every sweep. The first reference is ``reference`` if given, else a path drawn from a
    plain SMC run. ``ancestor_sampling`` / ``backward_sampling`` (module docstring) need
    ``fk.logpt``."""
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, (int, np.integer)) or num_iterations < 1:
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    rng = as_generator(seed, rng)
    if backward_sampling:
        require_logpt(fk, "backward sampling")

    def draw(res: SMCResult) -> list[Any]:
        return draw_trajectory_backward(res, fk, rng) if backward_sampling else draw_trajectory(res, rng)

    trajectories: list[list[Any]] = []
    with recording() as spent:
        if reference is None:
            reference = draw(SMC(fk, num_particles, store_history=True).run(rng))
        for _ in tqdm(range(num_iterations), desc="particle Gibbs", disable=not progress, leave=False):
            result = ConditionalSMC(fk, num_particles, reference, ancestor_sampling=ancestor_sampling).run(rng)
            reference = draw(result)
            trajectories.append(reference)
    return replace(result, trajectories=trajectories, ledger=spent,
                   info={**result.info, "iterations": int(num_iterations), "ancestor_sampling": bool(ancestor_sampling),
                         "backward_sampling": bool(backward_sampling)})


def pg_paper(model: Any, budget: int, *, potential: Any, rng: np.random.Generator | None = None,
             seed: int | None = None, softmax_temperature: float = 1.0, sweeps: int = 4,
             aggregation: str | None = None, selection_rule: str = "argmax_reward",
             allow_fallback: bool = False, progress: bool = False) -> SMCResult:
    """Particle Gibbs with the PF paper's weighting (``paper_tilt``): budget N = S sweeps of
    N // S particles, S = max(1, min(sweeps, N // 2)) (the paper's 4 x 16 = 64); the first
    sweep plain SMC, the other S - 1 conditional on a reference path, with ancestor sampling
    when the model has a transition density (``StepModel`` does). The answer is the last
    sweep's particle with the highest final reward. ``potential``: any potential (a PRM is
    re-read as logit p). N < 4 (S = 1) is refused (it would be plain particle filtering)
    unless ``allow_fallback=True``, which runs the PF paper's filter with all N particles
    instead, recorded in ``info["fallback"]``."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 1:
        raise ValueError(f"sweeps must be a positive integer, got {sweeps!r}")
    S = max(1, min(int(sweeps), budget // 2))
    if S == 1:
        smallest = "the smallest budget for particle Gibbs is N=4 (2 sweeps of 2 particles)" if sweeps > 1 \
            else "use sweeps >= 2"
        return pf_paper_instead(
            "particle_gibbs", f"particle Gibbs (pg_paper) with budget N={budget} and sweeps={sweeps} would run a "
            f"single sweep, i.e. plain particle filtering: {smallest}", model, budget, allow_fallback=allow_fallback,
            potential=potential, softmax_temperature=softmax_temperature, aggregation=aggregation,
            selection_rule=selection_rule, seed=seed, rng=rng, progress=progress)
    fk = paper_tilt(model, potential, softmax_temperature, aggregation=aggregation)
    res = particle_gibbs(fk, budget // S, S - 1, ancestor_sampling=callable(getattr(fk, "logpt", None)),
                         seed=seed, rng=rng, progress=progress)
    return res.for_method("particle_gibbs", selection_rule, fallback=None, sweeps=S,
                          softmax_temperature=softmax_temperature)


METHODS = {"particle_gibbs": pg_paper}
