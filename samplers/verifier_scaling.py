"""Scaling the verifier: sampled verdicts and voting at a fixed total compute (DeepSeek-GRM,
"Inference-Time Scaling for Generalist Reward Modeling", 2025; "J1: Exploring Simple Test-Time
Scaling for LLM-as-a-Judge", 2025; Singhi et al. 2025, "When To Solve, When To Verify").

A generative verifier answers "is this solution correct?" with a sampled judgement. Read the
verifier ``potential`` as its probability of saying yes, phi(x) = exp(potential.complete(x))
(an ``LLMJudge``: P(Yes); a PRM read as log p: p), so each of the ``verifications`` V judgements
of solution x_i is an independent draw

    v_ij ~ Bernoulli(phi(x_i)),   j = 1..V,     y_i = Σ_j v_ij  (the yes-votes)

and the answers are voted with the solutions' yes-shares as weights (DeepSeek-GRM's voting of
sampled rewards): answer = argmax_a Σ_{i: answer(i) = a} y_i / V (``log_weights`` = log(y_i / V),
rule ``weighted_majority``; with no yes-vote at all, or V = 0, the plain majority vote).
With per-verdict rates TPR / FPR a strict majority of the V verdicts accepts a correct
solution w.p. P(Bin(V, TPR) > V/2) and a wrong one w.p. P(Bin(V, FPR) > V/2)
(``ppl_scaling.metrics.majority_verdict_rate``).

The split of compute is the parameter: a budget of C generation-equivalents with a verification
costing ``verify_cost`` = lambda solutions buys S = max(1, floor(C / (1 + lambda V))) solutions
("When To Solve, When To Verify": C = S (1 + lambda V)); V = 0 is self-consistency at the same
compute. ``info``: solutions S, verifications V, ``yes_votes`` y, ``compute`` = S (1 + lambda V).
The ledger holds what ran: S generations and one verifier call per solution (the verdicts are
drawn from its phi).

    res = verifier_scaling(StepModel(lm, prompt, ...), 16, potential=judge, verifications=3, seed=0)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.ledger import recording
from ppl_scaling.potentials import as_potential
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import smc

__all__ = ["verifier_scaling", "split", "METHODS"]


def split(budget: int, verifications: int, verify_cost: float = 1.0) -> int:
    """Solutions S = max(1, floor(budget / (1 + verify_cost * verifications))) that a budget of
    ``budget`` generation-equivalents buys with ``verifications`` verdicts per solution."""
    if isinstance(verifications, bool) or not isinstance(verifications, (int, np.integer)) or verifications < 0:
        raise ValueError(f"verifications must be a non-negative integer, got {verifications!r}")
    if not (np.isfinite(verify_cost) and verify_cost >= 0):
        raise ValueError(f"verify_cost must be finite and >= 0, got {verify_cost!r}")
    return max(1, int(np.floor(budget / (1.0 + verify_cost * verifications) + 1e-9)))


def verifier_scaling(model: Any, budget: int, *, potential: Any, verifications: int = 3, verify_cost: float = 1.0,
                     seed: int | None = None, rng: np.random.Generator | None = None,
                     progress: bool = False) -> SMCResult:
    """S solutions of ``model`` and V = ``verifications`` sampled verdicts of each by ``potential``,
    S from the ``budget`` split (``split``); answer by the verdict-weighted vote (module docstring)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    S, rng = split(budget, verifications, verify_cost), as_generator(seed, rng)
    with recording() as spent:
        res = smc(model, S, ess_threshold=0.0, rng=rng, progress=progress)
        if verifications:
            view = model.view(len(res.ess) - 1, res.particles) if hasattr(model, "view") else res.particles
            phi = np.exp(as_potential(potential, "verifier").score(view, np.ones(S, dtype=bool)))
            yes = rng.binomial(verifications, phi)
            with np.errstate(divide="ignore"):
                log_weights = np.log(yes / verifications)
        else:
            yes, log_weights = np.zeros(S, dtype=np.int64), np.zeros(S)
    out = SMCResult(particles=res.particles, log_weights=log_weights, log_evidence=float("nan"), ess=res.ess,
                    resampled=res.resampled, log_evidence_increments=np.full(len(res.ess), np.nan), done=res.done,
                    ledger=spent, info={**res.info, "selection": "verdict vote"})
    return out.for_method("verifier_scaling", "weighted_majority", solutions=S, verifications=int(verifications),
                          yes_votes=yes, compute=S * (1.0 + verify_cost * verifications))


METHODS = {"verifier_scaling": verifier_scaling}
