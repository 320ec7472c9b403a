# The power of the verdicts' test: how often the exact sign-flip test finds a planted paired effect (docs/study.md).
"""Simulates paired studies whose per-seed differences are N(effect, 1) and counts how often the exact two-sided
sign-flip test (paired_stats.sign_flip_p) and, for reference, the paired t-test (the most powerful calibrated test on
normal data) reach p <= alpha. With effect 0 the counts are false-positive rates.

    python benchmarks/sign_flip_power.py                         # 10 seeds, effect 1 SD, 20,000 studies
    python benchmarks/sign_flip_power.py --seeds 5 --effect 0
"""

import itertools
import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paired_stats import sign_flip_p  # noqa: E402


@dataclass
class Args:
    seeds: int = 10
    """paired seeds per simulated study (up to 14 here: every study's 2^n sign patterns are enumerated at once)"""
    effect: float = 1.0
    """the planted mean difference, in standard deviations of the differences"""
    studies: int = 20_000
    """simulated studies"""
    alpha: float = 0.05
    """two-sided level"""
    seed: int = 1
    """random seed of the simulation"""


def main(args: Args):
    d = np.random.default_rng(args.seed).normal(args.effect, 1.0, (args.studies, args.seeds))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=args.seeds)))
    exact = np.empty(args.studies)
    for i in range(0, args.studies, 1000):  # the same p as sign_flip_p, vectorized over studies
        chunk = d[i : i + 1000]
        exact[i : i + 1000] = (np.abs(chunk @ signs.T) >= np.abs(chunk.sum(1))[:, None] - 1e-9).mean(1)
    assert exact[0] == sign_flip_p(d[0])
    t = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    print(
        f"{args.studies} simulated studies, {args.seeds} seeds, effect {args.effect} SD, alpha {args.alpha}: "
        f"exact sign-flip test {np.mean(exact <= args.alpha):.3f}, paired t-test {np.mean(t <= args.alpha):.3f}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
