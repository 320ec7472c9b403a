"""Paired statistics for the study's verdicts: every arm of a seed starts from that seed's offline policy, so arms are
compared by their per-seed differences d_i = X_i − Y_i.

- `sign_flip_p`: the exact sign-flip permutation p-value of the mean difference (all 2^n sign patterns; valid without
  a normality assumption, under the null that each d_i is symmetric about 0). Two-sided, its smallest value is 2 / 2^n:
  0.0625 at 5 seeds, 0.0078 at 8, 0.002 at 10.
- `paired_t_ci`: the mean difference with its paired-t confidence interval.
- `equivalence_p`: two one-sided tests (TOST) that the mean difference lies within ±margin.
- `holm`: Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).
"""

import itertools

import numpy as np
from scipy import stats

EXACT_MAX_N = 20  # 2^20 sign patterns, enumerated in chunks; more seeds than this use a fixed Monte Carlo sample


def _null_sums(d: np.ndarray) -> np.ndarray:
    """Σ s_i d_i for every sign pattern s (exact up to EXACT_MAX_N seeds; else 200,000 random patterns, seed 0)."""
    n = len(d)
    if n <= EXACT_MAX_N:
        head = min(n, 12)
        block = np.array(list(itertools.product((1.0, -1.0), repeat=head)))  # [2^head, head]
        tails = itertools.product((1.0, -1.0), repeat=n - head)
        return np.concatenate([block @ d[:head] + np.dot(tail, d[head:]) for tail in tails])
    signs = np.random.default_rng(0).choice((1.0, -1.0), size=(200_000, n))
    return np.concatenate([[d.sum()], signs @ d])


def sign_flip_p(d, alternative: str = "two-sided") -> float:
    """p-value of the exact sign-flip test on the mean of d: the share of sign patterns whose sum is at least as extreme
    as the observed one (the observed pattern included, so p >= 1 / 2^n). alternative: two-sided, greater, less."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError("sign_flip_p needs a non-empty 1-D array of finite differences")
    null, obs = _null_sums(d), d.sum()
    tol = 1e-9 * max(1.0, np.abs(d).sum())  # sums equal up to float rounding count as ties
    if alternative == "two-sided":
        return float(np.mean(np.abs(null) >= abs(obs) - tol))
    if alternative == "greater":
        return float(np.mean(null >= obs - tol))
    if alternative == "less":
        return float(np.mean(null <= obs + tol))
    raise ValueError(f"unknown alternative {alternative!r}")


def paired_t_ci(d, confidence: float = 0.95) -> tuple:
    """(mean, lower, upper): the mean difference and its paired-t interval (a zero-width one when all d are equal)."""
    d = np.asarray(d, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return mean, mean - float(half), mean + float(half)


def equivalence_p(d, margin: float) -> float:
    """TOST: the larger of the one-sided sign-flip p-values of mean(d) > −margin and mean(d) < +margin. A small p says
    the difference lies within ±margin."""
    d = np.asarray(d, dtype=float)
    return max(sign_flip_p(d + margin, "greater"), sign_flip_p(d - margin, "less"))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values, in the input order: p_(k) · (m − k + 1) for the k-th smallest, made monotone, capped
    at 1."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = scaled
    return out
