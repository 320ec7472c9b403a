# The power calculation behind part 2's seeds and looks (docs/protocol-part2.md §3), from part 1's committed rows.
"""Reads the Hopper study's per-seed rows (results/study-hopper-100k/chains/), and prints:

0. per fine-tuned arm, the spread across seeds of the normal endpoint under each definition, and how far the final
   evaluation sits below the run's best periodic evaluation;
1. each primary comparison's paired effect (mean difference, SD of the differences, dz = mean / SD) under part 1's
   endpoints (the final policy's evaluation) and under part 2's (averaged over the last K evaluations; here from the
   fine-tunes' periodic evaluations, the only part-1 record of the end of training: normal and random as logged,
   robustness as the worse of the precomputed set over those evaluations and the final fresh attack, a proxy for
   part 2's definition, which plays both sets on held-out episodes);
2. the chance of each verdict per claim (under part 1's endpoints, "final"; every endpoint averaged, "averaged"; and
   part 2's as in force, "mixed": normal and random averaged, robustness on the final policy) in a study of n seeds
   whose per-seed arm values are drawn from a normal distribution with part 1's means and covariance across a
   claim's arms (so the arms' correlations stay; a bootstrap over part 1's seeds would repeat seeds, and repeated
   seeds make an exact sign-flip test liberal), judged by the report's own rule: exact sign-flip p-values,
   intersection-union within a claim, Holm across the four at α;
3. the calibration of the contradiction test at the boundary (every arm of a claim equal in mean: part 1's arms
   re-centred), for part 1's two-sided test and for a one-sided one.

    python benchmarks/part2_power.py                        # about a minute on 2 cores
    python benchmarks/part2_power.py --seeds 8 10 12 --reps 4000 --alpha 0.05
"""

import csv
import glob
import itertools
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paired_stats
from study_tools import claims


@dataclass
class Args:
    chains: str = "results/study-hopper-100k/chains"
    """part 1's per-seed rows (one evaluations and one curves file per chain)"""
    seeds: tuple[int, ...] = (8, 10, 12, 14)
    """study sizes to simulate (up to 14: every study's sign patterns are enumerated exactly)"""
    reps: int = 2000
    """simulated studies per size"""
    alpha: float = 0.05
    """family-wise level of the verdicts (Holm over the four claims)"""
    last_k: int = 4
    """evaluations averaged at the end of training (part 2's endpoints)"""
    seed: int = 0
    """random seed of the bootstrap"""


def load(chains: str, last_k: int) -> dict:
    """{definition: {(policy, endpoint): {seed: value}}} for part 1's endpoints ("final"), every one averaged
    ("averaged") and part 2's as in force ("mixed")."""
    evals, curves = defaultdict(dict), defaultdict(lambda: defaultdict(list))
    for path in glob.glob(os.path.join(chains, "*__evaluations.csv")):
        for r in csv.DictReader(open(path)):
            evals[(r["policy"], r["eval_condition"])][int(r["seed"])] = float(r["normalized_mean"])
    for path in glob.glob(os.path.join(chains, "*__curves.csv")):
        for r in csv.DictReader(open(path)):
            row = (int(r["step"]), *(float(r[f"{c}_normalized"]) for c in ("normal", "random", "adversarial")))
            curves[r["policy"]][int(r["seed"])].append(row)
    final, averaged, gaps = {}, {}, {}
    for (pol, cond), by_seed in evals.items():
        if cond in ("normal", "random"):
            final[(pol, cond)] = averaged[(pol, cond)] = dict(by_seed)
    for pol in {p for p, _ in evals}:
        fresh, transfer = evals[(pol, "adversarial")], evals[(pol, "transfer")]
        final[(pol, "robustness")] = {s: min(v, transfer[s]) for s, v in fresh.items() if s in transfer}
        averaged[(pol, "robustness")] = dict(final[(pol, "robustness")])  # offline-only: one policy, as in part 2
    for pol, runs in curves.items():
        tail = {s: sorted(run)[-last_k:] for s, run in runs.items()}
        averaged[(pol, "normal")] = {s: float(np.mean([r[1] for r in t])) for s, t in tail.items()}
        averaged[(pol, "random")] = {s: float(np.mean([r[2] for r in t])) for s, t in tail.items()}
        fresh = evals[(pol, "adversarial")]
        averaged[(pol, "robustness")] = {
            s: min(float(np.mean([r[3] for r in t])), fresh[s]) for s, t in tail.items() if s in fresh
        }
        gaps[pol] = [max(r[1] for r in run) - sorted(run)[-1][1] for run in runs.values()]
        auc = {s: float(np.mean([r[1] for r in run if r[0] > 0])) for s, run in runs.items()}
        final[(pol, "online_auc")] = averaged[(pol, "online_auc")] = auc
    mixed = dict(averaged)  # part 2 as in force: normal and random averaged, robustness on the final policy (§2a)
    mixed.update({k: v for k, v in final.items() if k[1] == "robustness"})
    return {"final": final, "averaged": averaged, "mixed": mixed, "gaps": gaps}


def effects(values: dict) -> list:
    """(claim, comparison, n, mean, SD, dz) of every component of every claim."""
    out = []
    for claim in claims.CLAIMS:
        for comp in claim.components:
            x, y = values[(comp.x, comp.endpoint)], values[(comp.y, comp.endpoint)]
            d = np.array([x[s] - y[s] for s in sorted(set(x) & set(y))])
            out.append((claim.number, comp, len(d), d.mean(), d.std(ddof=1), d.mean() / d.std(ddof=1)))
    return out


def sign_patterns(n: int) -> np.ndarray:
    return np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # [2^n, n]


def p_values(d: np.ndarray, signs: np.ndarray, side: str) -> np.ndarray:
    """Exact sign-flip p of each row of d [reps, n] (as paired_stats.sign_flip_p), vectorized over rows."""
    null, obs, tol = d @ signs.T, d.sum(1, keepdims=True), 1e-9 * np.maximum(1.0, np.abs(d).sum(1, keepdims=True))
    if side == "two-sided":
        return (np.abs(null) >= np.abs(obs) - tol).mean(1)
    if side == "greater":
        return (null >= obs - tol).mean(1)
    return (null <= obs + tol).mean(1)


def arm_model(values: dict, claim) -> tuple:
    """The claim's arms (policy, endpoint), and their per-seed values' mean and covariance over the seeds every arm
    has."""
    arms = sorted({(c.x, c.endpoint) for c in claim.components} | {(c.y, c.endpoint) for c in claim.components})
    seeds = sorted(set.intersection(*[set(values[a]) for a in arms]))
    x = np.array([[values[a][s] for a in arms] for s in seeds])
    return arms, x.mean(0), np.cov(x, rowvar=False)


def verdicts(values: dict, n: int, reps: int, alpha: float, rng, directional: bool = False, boundary=None) -> dict:
    """{claim: (P supported, P contradicted)} over `reps` studies of n seeds, each seed's arm values drawn from the
    normal model of part 1's (arm_model), judged as study_report judges: each component's exact sign-flip p (TOST for
    an equivalence), the claim's p by primary_test's rule, Holm over the claims at α. directional: the contradiction
    test one-sided. boundary: a claim number whose arms get one common mean per endpoint (each arm's spread and the
    seeds' correlations kept, every difference zero in mean: the boundary between the claim and its contradiction)."""
    signs = sign_patterns(n)
    claim_p, side = {}, {}
    for claim in claims.CLAIMS:
        arms, mean, cov = arm_model(values, claim)
        if claim.number == boundary:
            for endpoint in {e for _, e in arms}:
                same = [i for i, (_, e) in enumerate(arms) if e == endpoint]
                mean[same] = mean[same].mean()
        draw = rng.multivariate_normal(mean, cov, size=(reps, n))  # [reps, n, arms]
        ps, means = [], []
        for comp in claim.components:
            d = draw[..., arms.index((comp.x, comp.endpoint))] - draw[..., arms.index((comp.y, comp.endpoint))]
            if comp.test == "equivalence":
                m = claims.EQUIVALENCE_MARGIN
                p = np.maximum(p_values(d + m, signs, "greater"), p_values(d - m, signs, "less"))
                ps.append((p, None, "equivalence"))
            else:
                ps.append((p_values(d, signs, "two-sided"), p_values(d, signs, "less"), "difference"))
                means.append(d.mean(1))
        differences = [(p2, pl) for p2, pl, kind in ps if kind == "difference"]
        against = np.stack([m < 0 for m in means])  # [components, reps]
        for_p = np.max(np.stack([p for p, _, _ in ps]), axis=0)
        against_p = np.stack([pl if directional else p2 for p2, pl in differences])
        contra = np.min(np.where(against, against_p, np.inf), axis=0) * len(differences)
        any_against = against.any(0)
        claim_p[claim.number] = np.where(any_against, np.minimum(1.0, contra), for_p)
        side[claim.number] = np.where(any_against, "against", "for")
    numbers = [c.number for c in claims.CLAIMS]
    p = np.stack([claim_p[k] for k in numbers], axis=1)  # [reps, claims]
    adjusted = np.stack([paired_stats.holm(row) for row in p])
    out = {}
    for j, k in enumerate(numbers):
        decided = (adjusted[:, j] <= alpha) & (n >= claims.min_seeds(alpha))
        out[k] = (float(np.mean(decided & (side[k] == "for"))), float(np.mean(decided & (side[k] == "against"))))
    return out


def main(args: Args):
    data = load(args.chains, args.last_k)
    print(f"Part 1's fine-tuned arms (Hopper-v5, {args.chains}); normalized points\n")
    print("| arm | seeds | SD of normal: final | SD of normal: averaged | final below the run's best, mean |")
    print("|---|---|---|---|---|")
    for pol, gaps in sorted(data["gaps"].items()):
        f, a = data["final"][(pol, "normal")], data["averaged"][(pol, "normal")]
        sd_f, sd_a = np.std(list(f.values()), ddof=1), np.std(list(a.values()), ddof=1)
        print(f"| {pol} | {len(gaps)} | {sd_f:.1f} | {sd_a:.1f} ({sd_a / sd_f - 1:+.0%}) | {np.mean(gaps):.1f} |")
    print("\nPart 1's paired effects; dz = mean / SD of the differences\n")
    print("| claim | comparison | endpoint | n | final: mean, SD, dz | averaged (last 4): mean, SD, dz |")
    print("|---|---|---|---|---|---|")
    for (num, comp, n, m, sd, dz), (_, _, _, m2, sd2, dz2) in zip(effects(data["final"]), effects(data["averaged"])):
        kind = " (equivalence)" if comp.test == "equivalence" else ""
        row = f"| {num} | {comp.x} − {comp.y} | {comp.endpoint}{kind} | {n} | {m:+.1f}, {sd:.1f}, {dz:+.2f} |"
        print(f"{row} {m2:+.1f}, {sd2:.1f}, {dz2:+.2f} |")
    rng = np.random.default_rng(args.seed)
    print(f"\nChance of each verdict, {args.reps} simulated studies per size, α = {args.alpha:g} (Holm over 4 claims)")
    print(
        "| endpoints | seeds | "
        + " | ".join(f"claim {c.number}: supported / contradicted" for c in claims.CLAIMS)
        + " |"
    )
    print("|---|---|" + "---|" * len(claims.CLAIMS))
    for definition in ("final", "averaged", "mixed"):
        for n in args.seeds:
            v = verdicts(data[definition], n, args.reps, args.alpha, rng)
            print(f"| {definition} | {n} | " + " | ".join(f"{s:.2f} / {c:.2f}" for s, c in v.values()) + " |")
    print("\nAt the boundary (each claim's arms re-centred to equal means; part 2's averaged endpoints): chance of a")
    print("verdict, which is an error either way. Part 1's two-sided contradiction test against a one-sided one.")
    print("| claim | seeds | two-sided: supported / contradicted | one-sided: supported / contradicted |")
    print("|---|---|---|---|")
    for claim in claims.CLAIMS:
        for n in args.seeds[:2]:
            k, at = claim.number, dict(boundary=claim.number)
            two = verdicts(data["averaged"], n, args.reps, args.alpha, np.random.default_rng(args.seed + n), **at)[k]
            one = verdicts(data["averaged"], n, args.reps, args.alpha, np.random.default_rng(args.seed + n), True, **at)
            one = one[k]
            print(f"| {claim.number} | {n} | {two[0]:.3f} / {two[1]:.3f} | {one[0]:.3f} / {one[1]:.3f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
