"""Resampling schemes: pure functions of the normalised weights.

Every scheme has the signature ``scheme(rng, W, M=None) -> A`` where ``W`` are
normalised weights of N particles, ``M`` the number of draws (default N) and ``A``
an int64 array of M ancestor indices in [0, N). Each is unbiased,
E[#{j: A_j = i}] = M W_i, and never picks a particle of weight zero.

Ordering: ``multinomial`` returns i.i.d. draws in random order; the others return
indices sorted by ancestor (offspring of one parent are contiguous).

Schemes and their offspring counts N_i (with r_i = M W_i):
- multinomial: counts ~ Multinomial(M, W).
- stratified:  one uniform per stratum [(j + U_j)/M]; lower variance than multinomial.
- systematic:  one shared uniform [(j + U)/M]; N_i ∈ {⌊r_i⌋, ⌈r_i⌉}.
- residual:    ⌊r_i⌋ copies, the remaining M - Σ⌊r_i⌋ drawn multinomially on the fractional parts.
- ssp:         Srinivasan sampling process (Gerber, Chopin & Whiteley 2019): N_i ∈ {⌊r_i⌋, ⌈r_i⌉},
               built by pairing fractional parts; O(N) with a Python loop (slower, for study).

    A = SCHEMES["systematic"](rng, W)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Scheme = Callable[[np.random.Generator, np.ndarray, "int | None"], np.ndarray]


def _check(W: np.ndarray, M: int | None) -> tuple[np.ndarray, int]:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 1 or W.shape[0] == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {W.shape}")
    total = W.sum()  # inf or NaN iff some weight is
    if not np.isfinite(total) or W.min() < 0:
        raise ValueError("weights must be finite and non-negative")
    if total <= 0:
        raise ValueError("weights sum to zero: nothing to resample")
    M = W.shape[0] if M is None else int(M)
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    return W / total, M


def inverse_cdf(u: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Ancestors for uniforms ``u`` in [0, 1): A_j = min{i : Σ_{k<=i} W_k > u_j · Σ W}.

    Scaling ``u`` by the computed total (not by 1) makes round-off unable to push
    an index past the end, and the strict inequality never selects a zero weight.
    """
    cdf = np.cumsum(W)
    return _in_range(np.searchsorted(cdf, u * cdf[-1], side="right").astype(np.int64), W)


def _in_range(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Ancestors past the end (a uniform that rounds to the total: u = 1 - 2^-53 for the
    last stratum) belong to the last particle of positive weight."""
    if A.size and A.max() >= W.shape[0]:
        np.minimum(A, np.flatnonzero(W > 0)[-1], out=A)
    return A


def multinomial(rng: np.random.Generator, W: np.ndarray, M: int | None = None) -> np.ndarray:
    W, M = _check(W, M)
    return inverse_cdf(rng.random(M), W)


def stratified(rng: np.random.Generator, W: np.ndarray, M: int | None = None) -> np.ndarray:
    W, M = _check(W, M)
    return inverse_cdf((np.arange(M) + rng.random(M)) / M, W)


def systematic(rng: np.random.Generator, W: np.ndarray, M: int | None = None) -> np.ndarray:
    W, M = _check(W, M)
    # Same ancestors as inverse_cdf((arange(M) + U) / M, W), in O(N + M) without a search:
    # K_i = #{j : (j + U)/M < C_i} = ceil(M C_i - U) points fall below the normalised CDF C_i,
    # and A_j = #{i : K_i <= j}.
    cdf = np.cumsum(W)
    K = np.ceil(cdf * (M / cdf[-1]) - rng.random()).astype(np.int64)
    np.clip(K, 0, M, out=K)
    return _in_range(np.cumsum(np.bincount(K, minlength=M + 1)[:M]), W)


def residual(rng: np.random.Generator, W: np.ndarray, M: int | None = None) -> np.ndarray:
    W, M = _check(W, M)
    r = M * W
    counts = np.floor(r).astype(np.int64)
    rest = M - int(counts.sum())
    if rest > 0:
        frac = r - counts
        counts += np.bincount(inverse_cdf(rng.random(rest), frac), minlength=W.shape[0])
    return np.repeat(np.arange(W.shape[0]), counts)


def ssp(rng: np.random.Generator, W: np.ndarray, M: int | None = None) -> np.ndarray:
    W, M = _check(W, M)
    r = M * W
    counts = np.floor(r).astype(np.int64)
    frac = r - counts
    frac[frac < 1e-12] = 0.0
    # Pair the open fractional parts two at a time; each pairing settles one of
    # them to 0 or 1 while keeping both expectations unchanged.
    open_idx = np.flatnonzero(frac > 0)
    if open_idx.size:
        i = open_idx[0]
        for j in open_idx[1:]:
            up = min(1.0 - frac[i], frac[j])    # move mass j -> i
            down = min(frac[i], 1.0 - frac[j])  # move mass i -> j
            if rng.random() * (up + down) < down:
                frac[i], frac[j] = frac[i] + up, frac[j] - up
            else:
                frac[i], frac[j] = frac[i] - down, frac[j] + down
            # whichever of i, j is settled (0 or 1) is fixed; the other stays open
            if min(frac[i], 1.0 - frac[i]) <= min(frac[j], 1.0 - frac[j]):
                counts[i] += int(round(frac[i]))
                frac[i] = 0.0
                i = j
            else:
                counts[j] += int(round(frac[j]))
                frac[j] = 0.0
        deficit = M - int(counts.sum())
        if deficit == 1:  # the last open part is 1 up to round-off
            counts[i] += 1
    if counts.sum() != M:
        raise RuntimeError("ssp resampling: offspring counts do not sum to M (round-off); please report")
    return np.repeat(np.arange(W.shape[0]), counts)


SCHEMES: dict[str, Scheme] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
    "ssp": ssp,
}


def get_scheme(name_or_fn: str | Scheme) -> Scheme:
    """Look a scheme up by name (or pass a callable through)."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return SCHEMES[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown resampling scheme {name_or_fn!r}; choose one of {sorted(SCHEMES)}") from None
