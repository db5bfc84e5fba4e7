"""Multi-temperature sampling ("On the Role of Temperature Sampling in Test-Time Scaling", 2025):
the budget N is split across temperatures τ_1..τ_K (n_k samples at τ_k, as evenly as possible,
the remainder to the first ones), since different temperatures solve different problems. The
paper votes within and across temperatures: rule ``group_vote`` (each temperature's majority
answer is one vote; ``info["groups"]`` holds the temperature of every sample).

The pool is a draw from the mixture Σ_k (n_k / N) q_k, q_k the proposal at τ_k (the tempered,
truncated, renormalised next-token distributions of ``StepModel``). Multiple importance sampling
with the balance heuristic (Veach 1997) weights every sample, whatever temperature drew it, by

    w(x) = p(x) / Σ_k (n_k / N) q_k(x),

p the model at temperature 1, so that (1 / N) Σ_i w(x_i) f(x_i) is unbiased for E_p[f] with the
counts n_k fixed: the weighted vote (``weighted_majority``, the default rule) estimates the
model's own answer distribution from samples of every temperature, ``majority_vote`` is the
plain pooled vote, and exp(log_evidence) = mean w estimates Σ_x p(x) = 1 (less what truncation
cuts). On the toy task at N = 8 (2 samples per temperature) ``group_vote`` measured 0.08 below
the weighted vote (benchmarks/RESULTS.md).
q_k(x) for the temperatures that did not draw x needs the full next-token distributions along x:
one re-scoring pass per sample (``lm.next_token_logprobs`` on its prefixes; counted in the ledger).

    res = multi_temperature(step_model, 16, temperatures=(0.6, 0.8, 1.0, 1.2), seed=0)
    res.info["groups"]           # the temperature that drew each particle
    res.select(answers)          # the weighted (MIS) vote;  res.select(answers, "group_vote"): the paper's
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from ppl_scaling.ledger import record, recording
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import smc
from ppl_scaling.state import take, where
from ppl_scaling.weights import summarise

__all__ = ["multi_temperature", "split_budget", "path_log_probs", "METHODS"]

DEFAULT_TEMPERATURES = (0.6, 0.8, 1.0, 1.2)


def split_budget(num_particles: int, num_temperatures: int) -> list[int]:
    """n_k: ``num_particles`` split as evenly as possible, the remainder to the first ones."""
    base, extra = divmod(int(num_particles), int(num_temperatures))
    return [base + (k < extra) for k in range(num_temperatures)]


def path_log_probs(model: Any, token_ids: Sequence[Sequence[int]],
                   temperatures: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """log p(x) and log q_τ(x) (shape (K, N)) of the generations ``token_ids`` after ``model``'s
    prompt, for every τ in ``temperatures``, under ``model``'s truncation controls: each
    sample's prefixes are read in one ``lm.next_token_logprobs`` call."""
    import torch

    from ppl_scaling.models.lm import process_logprobs

    lm = model.lm
    log_p, log_q = np.zeros(len(token_ids)), np.zeros((len(temperatures), len(token_ids)))
    for i, ids in enumerate(token_ids):
        if not ids:
            continue
        rows = [list(model.prompt_ids) + list(ids[:j]) for j in range(len(ids))]
        with recording() as own:
            logits = lm.next_token_logprobs(rows)
        if own.forward_passes == 0:   # a custom LM that records nothing: one call, whole rows read
            record(forward_passes=1, prefill_tokens=sum(len(r) for r in rows))
        tok = torch.as_tensor(list(ids), device=logits.device).unsqueeze(1)
        for k, tau in enumerate(temperatures):
            lq, lp = process_logprobs(logits, tau, model.top_p, model.top_k, model.min_p)
            log_q[k, i] = float(lq.gather(1, tok).double().sum())
        log_p[i] = float(lp.gather(1, tok).double().sum())
    return log_p, log_q


def _concat(parts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """The batches ``parts`` (of ``sizes`` particles) as one batch, in order (``take`` / ``where``)."""
    N, out, start = sum(sizes), None, 0
    for part, n in zip(parts, sizes):
        idx, mask = np.zeros(N, dtype=np.int64), np.zeros(N, dtype=bool)
        idx[start:start + n], mask[start:start + n] = np.arange(n), True
        block = take(part, idx)
        out = block if out is None else where(mask, block, out)
        start += n
    return out


def multi_temperature(model: Any, num_particles: int, *, potential: Any = None,
                      temperatures: Sequence[float] = DEFAULT_TEMPERATURES, seed: int | None = None,
                      rng: np.random.Generator | None = None, progress: bool = False) -> SMCResult:
    """``num_particles`` generations of ``model`` (a ``StepModel``) split across ``temperatures``,
    weighted by the balance heuristic towards the model p (module docstring); ``potential`` is
    ignored (no reward model)."""
    from ppl_scaling.models.lm import check_sampling

    temps = [check_sampling(t)[0] for t in temperatures]
    if not temps:
        raise ValueError("multi_temperature needs at least one temperature")
    if getattr(model, "twist", None) is not None:
        raise NotImplementedError("multi_temperature samples the plain tempered proposals; use a StepModel "
                                  "without twist")
    if isinstance(num_particles, bool) or not isinstance(num_particles, (int, np.integer)) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    rng = as_generator(seed, rng)
    counts = split_budget(num_particles, len(temps))
    used = [(t, n) for t, n in zip(temps, counts) if n > 0]
    with recording() as spent:
        parts = []
        for tau, n in used:
            at_tau = copy.copy(model)   # the same LM, prompt cache and settings, sampled at tau
            at_tau.temperature = tau
            parts.append(smc(at_tau, n, ess_threshold=0.0, rng=rng, progress=progress).particles)
        x = _concat(parts, [n for _, n in used])
        log_p, log_q = path_log_probs(model, x.token_ids, [t for t, _ in used])
    share = np.log(np.array([n for _, n in used], dtype=np.float64) / num_particles)
    lw = log_p - np.logaddexp.reduce(log_q + share[:, None], axis=0)
    lse, _, ess = summarise(lw)
    log_z = lse - float(np.log(num_particles))
    drawn_at = np.repeat([t for t, _ in used], [n for _, n in used])
    res = SMCResult(particles=x, log_weights=lw, log_evidence=log_z, ess=np.array([ess]),
                    resampled=np.zeros(1, dtype=bool), log_evidence_increments=np.array([log_z]),
                    done=np.asarray(x.finished, dtype=bool), ledger=spent,
                    info={"num_particles": int(num_particles), "selection": "none", "model": type(model).__name__})
    return res.for_method("multi_temperature", "weighted_majority", temperatures=tuple(temps), counts=tuple(counts),
                          groups=drawn_at)


METHODS = {"multi_temperature": multi_temperature}
