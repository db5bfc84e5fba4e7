"""RPC: Reasoning-pruning Perplexity Consistency ("A Theoretical Study on Bridging Internal
Probability and Self-Consistency for LLM Reasoning", NeurIPS 2025).

N independent generations, as self-consistency draws them; the answer is chosen by the ``rpc``
rule (``ppl_scaling.aggregate``), which scores an answer a by the model's own probability of
its *distinct* sampled paths,

    score(a) = Σ_{distinct x in the sample, answer(x) = a, x kept} p(x),

after Reasoning Pruning drops the low-probability paths (a two-component Weibull mixture fitted
to the N path probabilities; a path goes when it belongs more to the low-mean component and is
below the mean probability). Without pruning (rule ``perplexity_consistency``),
E[score(a)] = Σ_{x -> a} p(x) (1 - (1 - q(x))^N) for N draws from q: the answer marginal p(a)
up to an error that vanishes exponentially in N, where a vote's error vanishes like 1 / N.
p is the model at temperature 1 (``log_p`` of the ``StepModel`` state), whatever q sampled.

    res = rpc(step_model, 16, seed=0)
    res.select(answers)                        # the rpc rule
    res.select(answers, "majority_vote")       # self-consistency on the same samples
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult

from .best_of_n import self_consistency

__all__ = ["rpc", "METHODS"]


def rpc(model: Any, num_particles: int, *, potential: Any = None, seed: int | None = None,
        rng: np.random.Generator | None = None, store_history: bool = False, progress: bool = False) -> SMCResult:
    """``num_particles`` samples of ``model`` (a ``StepModel``) answered by the ``rpc`` rule;
    ``potential`` is ignored (RPC reads the model's own probabilities, no reward model)."""
    res = self_consistency(model, num_particles, seed=seed, rng=rng, store_history=store_history,
                           progress=progress)
    return res.for_method("rpc", "rpc")


METHODS = {"rpc": rpc}
