"""Compute-optimal scaling (Snell et al. 2024): a cheap pilot judges the problem's difficulty,
a policy learned on validation problems picks the method and budget for it.

    policy = Policy.read("policy.json")          # written by `ppl-scaling allocate` (ppl_scaling.allocation)
    res = compute_optimal(model, 1, potential=prm, policy=policy, extract=extract_answer, seed=0)
    res.info["compute_optimal"]                  # the pilot's agreement, the bin, the method and budget run

The pilot (``policy.pilot``: by default self-consistency with 4 samples) runs first; its
agreement, the share of its samples that give the most common answer (``key`` groups
answers; a sample without an answer agrees with nothing), selects the bin, and the bin's
(method, N) runs next with the same generator — or, when the policy chose the pilot
itself, the pilot's result is the answer. Both runs are recorded in the ledger, so the
compute is the pilot's plus the chosen method's. ``budget`` is not used: the policy sets
the budgets (evaluation rows keep it as their label).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

from ppl_scaling.allocation import Policy, agreement, bin_of
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator

__all__ = ["compute_optimal", "METHODS"]


def compute_optimal(model: Any, budget: int, *, potential: Any = None, policy: Policy | str | Path,
                    extract: Callable[[str], Any], key: Callable[[Any], Hashable] | None = None,
                    options_for: Callable[[str], dict[str, Any]] | None = None,
                    seed: int | None = None, rng: np.random.Generator | None = None) -> SMCResult:
    """Run the pilot, then the policy's (method, N) for its agreement bin (module docstring).
    ``options_for(method)``: the options each method runs with (the evaluation harness passes
    the task's: its judge, verifiers, beam width, ...); default: none."""
    from . import METHODS   # the registry holds this method too: imported when called

    policy = policy if isinstance(policy, Policy) else Policy.read(policy)
    rng = as_generator(seed, rng)

    def run(method: str, n: int) -> SMCResult:
        options = {} if options_for is None else options_for(method)
        return METHODS[method](model, n, potential=potential, rng=rng, **options)

    pilot = run(*policy.pilot)
    signal = agreement([extract(c) for c in pilot.particles.completions()], key)
    method, size = policy.choice(signal)
    chosen = pilot if (method, size) == tuple(policy.pilot) else run(method, size)
    info = {"agreement": signal, "bin": bin_of(signal, policy.edges), "method": method, "budget": size,
            "pilot": list(policy.pilot)}
    return chosen.for_method("compute_optimal", chosen.info.get("selection_rule", "argmax_weight"),
                             compute_optimal=info)


METHODS = {"compute_optimal": compute_optimal}
