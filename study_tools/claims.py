"""The paper's claims as the study judges them (docs/study.md, "How the claims are judged"; docs/protocol.md and
protocol-part2.md): the arms, the declared endpoints, each claim's primary comparisons, and the decision rule (paired
per-seed differences, exact sign-flip p-values, intersection-union within a claim, Holm across the claims, TOST for an
equivalence). The statistics themselves are in paired_stats.py; this module says what is compared and how it is
decided, and reads nothing from disk."""

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from paired_stats import equivalence_p, holm, paired_t_ci, sign_flip_p

EVAL_CONDITIONS = ("normal", "random", "adversarial", "transfer")
KEPT = "@kept"  # rows that pool a fine-tune's kept policies (evaluate_matrix.py --kept-episodes): protocol part 2
KEPT_CONDITIONS = tuple(c + KEPT for c in EVAL_CONDITIONS)
ALL_CONDITIONS = EVAL_CONDITIONS + KEPT_CONDITIONS
# evaluated during fine-tuning (adversarial: the precomputed set)
CURVE_CONDITIONS = (
    "normal",
    "random",
    "adversarial",
)
OFFLINE = "offline-only"
NORMAL_FT = "fine-tuned normal"
RANDOM_FT = "fine-tuned random (fixed)"
ADV_FIXED = "fine-tuned adversarial (fixed)"
LINEAR = "fine-tuned adversarial (linear)"
ADAPTIVE = "fine-tuned adversarial (adaptive)"
SCRATCH = "scratch adversarial (adaptive)"
ORDER = (OFFLINE, NORMAL_FT, RANDOM_FT, ADV_FIXED, LINEAR, ADAPTIVE, SCRATCH)

# The decision rule, declared before the runs (docs/protocol.md repeats it)
ALPHA = 0.05  # family-wise error rate over the claims' primary tests (Holm); --alpha for a study that looks twice

EQUIVALENCE_MARGIN = 5.0  # claim 4's "similar robustness": the mean difference lies within ±5 normalized points

ENDPOINTS = {
    "normal": "normalized return of the final policy under normal evaluation (no δ)",
    "random": "normalized return of the final policy under the random δ draws",
    "robustness": "normalized return of the final policy under the worse of its fresh DE attack and the transferred "
    "(precomputed) δ set, per seed",
    "online_auc": "mean normalized normal return over the fine-tune's evaluations after step 0 (the area under the "
    "online learning curve; step 0 is the offline policy by construction and is left out; scratch's uniform warm-up "
    "counts as online steps)",
}


# Part 2 (docs/protocol-part2.md §2a): where the matrices hold {condition}@kept rows, the claims' normal and random
# endpoints average the fine-tune's kept policies (the last 4 evaluations), on held-out episodes; robustness stays
# on the final policy, the one its fresh attack was found against
AVERAGED_ENDPOINTS = {
    "normal": "normalized return without δ, averaged over a fine-tune's kept policies (the last 4 evaluations' "
    "checkpoints, 10 held-out episodes each; offline-only: its one policy's final evaluation)",
    "random": "the same under the study's random δ draws",
    "robustness": ENDPOINTS["robustness"] + " (as in part 1: a fresh attack is specific to the policy it was found "
    "against, so it is not averaged over the kept ones)",
    "online_auc": ENDPOINTS["online_auc"],
    "retained": "robustness ÷ normal of the final policy, per seed: the share of its normal return a policy keeps "
    "under attack (secondary)",
    "normal (final)": "part 1's normal endpoint: the final policy alone (secondary)",
    "random (final)": "part 1's random endpoint: the final policy alone (secondary)",
}


@dataclass(frozen=True)
class Comparison:
    x: str
    y: str
    endpoint: str
    test: Literal["difference", "equivalence"] = "difference"  # difference: X > Y; equivalence: |X − Y| < margin


@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    components: tuple  # every component must hold for the claim to be supported (an intersection-union test)


CLAIMS = (
    Claim(
        1,
        "Adversarial fine-tuning is more robust than offline-only under adversarial perturbations",
        (Comparison(ADV_FIXED, OFFLINE, "robustness"),),
    ),
    Claim(2, "Fine-tuning converges faster than training from scratch", (Comparison(ADAPTIVE, SCRATCH, "online_auc"),)),
    Claim(
        3,
        "Matching the fine-tuning and evaluation conditions gives the strongest robustness (fixed q, each "
        "evaluation condition won by its own training condition)",
        (
            Comparison(NORMAL_FT, RANDOM_FT, "normal"),
            Comparison(NORMAL_FT, ADV_FIXED, "normal"),
            Comparison(RANDOM_FT, NORMAL_FT, "random"),
            Comparison(RANDOM_FT, ADV_FIXED, "random"),
            Comparison(ADV_FIXED, NORMAL_FT, "robustness"),
            Comparison(ADV_FIXED, RANDOM_FT, "robustness"),
        ),
    ),
    Claim(
        4,
        "The adaptive curriculum keeps nominal return better than the linear one at similar robustness",
        (Comparison(ADAPTIVE, LINEAR, "normal"), Comparison(ADAPTIVE, LINEAR, "robustness", "equivalence")),
    ),
)


def min_seeds(alpha: float) -> int:
    """The fewest paired seeds at which an exact two-sided sign-flip test (smallest p = 2 / 2^n) can pass Holm's first
    step over the claims (alpha / 4): 8 at α = 0.05 (2 / 2^8 = 0.0078 ≤ 0.0125; 7 seeds give 0.0156), and never fewer
    than 5."""
    return max(5, int(np.ceil(np.log2(2 * len(CLAIMS) / alpha))))


MIN_SEEDS = min_seeds(ALPHA)
SECONDARY = (  # reported with unadjusted p-values; no verdict rests on them
    Comparison(ADAPTIVE, OFFLINE, "robustness"),
    Comparison(LINEAR, OFFLINE, "robustness"),
    Comparison(ADAPTIVE, ADV_FIXED, "robustness"),
    Comparison(ADAPTIVE, OFFLINE, "normal"),
    Comparison(ADV_FIXED, OFFLINE, "normal"),
    Comparison(NORMAL_FT, OFFLINE, "robustness"),
)
FINAL = {"normal": "normal (final)", "random": "random (final)"}  # part 1's endpoints, in part 2's report
SECONDARY_AVERAGED = (  # part 2: the retained share, and every primary difference on part 1's endpoints
    SECONDARY
    + (Comparison(ADV_FIXED, OFFLINE, "retained"), Comparison(ADV_FIXED, NORMAL_FT, "retained"))
    + tuple(
        Comparison(comp.x, comp.y, FINAL[comp.endpoint])
        for claim in CLAIMS
        for comp in claim.components
        if comp.endpoint in FINAL and comp.test == "difference"
    )
)


# Endpoints per (env, policy, seed)
def endpoint_values(rows: list, curves: dict) -> dict:
    """{(env, policy, endpoint): {seed: value}} for the endpoints above and every evaluation condition."""
    out = defaultdict(dict)
    for r in rows:
        out[(r["env_id"], r["policy"], r["eval_condition"])][r["seed"]] = r["normalized_mean"]
    for (env, pol, cond), by_seed in list(out.items()):
        if cond == "adversarial":
            transfer = out.get((env, pol, "transfer"), {})
            out[(env, pol, "robustness")] = {s: min(v, transfer[s]) for s, v in by_seed.items() if s in transfer}
    if any(cond.endswith(KEPT) for _, _, cond in out):
        averaged(out)
    for (env, pol), runs in curves.items():
        out[(env, pol, "online_auc")] = {
            s: float(np.mean([r["normal_normalized"] for r in run if r["step"] > 0]))
            for s, run in runs.items()
            if any(r["step"] > 0 for r in run)
        }
    return out


def is_averaged(values: dict) -> bool:
    """Part 2's endpoints: the matrices held rows that pool the fine-tunes' kept policies."""
    return any(endpoint == "normal (final)" for _, _, endpoint in values)


def averaged(out: dict):
    """Part 2's endpoints in place (docs/protocol-part2.md §2a): normal and random from the rows that pool a
    fine-tune's kept policies, where it has them (offline-only has one policy: its final evaluation); robustness from
    the final policy, as in part 1; part 1's final-policy normal and random kept as "normal (final)" and "random
    (final)"; the retained share, robustness ÷ normal of the final policy."""
    for env, pol in {(e, p) for e, p, _ in out}:
        final = {c: out.get((env, pol, c), {}) for c in ("normal", "random", "robustness")}
        out[(env, pol, "normal (final)")], out[(env, pol, "random (final)")] = final["normal"], final["random"]
        out[(env, pol, "retained")] = {
            s: v / final["normal"][s] for s, v in final["robustness"].items() if final["normal"].get(s, 0) > 0
        }
        kept = {c: out.get((env, pol, c + KEPT), {}) for c in ("normal", "random")}
        if kept["normal"]:
            out[(env, pol, "normal")], out[(env, pol, "random")] = kept["normal"], kept["random"]


def compare(values: dict, comp: Comparison, env: str, confidence: float, alpha: float = ALPHA) -> dict | None:
    """The paired test of one comparison in one env: n, the mean difference X − Y with its CI, and p. None if an arm
    is missing. difference: paired-t CI at `confidence`, exact two-sided sign-flip p; equivalence: TOST against
    ±EQUIVALENCE_MARGIN, with the matching (1 − 2α) CI."""
    x, y = values.get((env, comp.x, comp.endpoint)), values.get((env, comp.y, comp.endpoint))
    if not x or not y:
        return None
    seeds = sorted(set(x) & set(y))
    if not seeds:
        return None
    d = np.array([x[s] - y[s] for s in seeds])
    if comp.test == "equivalence":
        mean, lo, hi = paired_t_ci(d, 1 - 2 * alpha)
        p = equivalence_p(d, EQUIVALENCE_MARGIN)
    else:
        mean, lo, hi = paired_t_ci(d, confidence)
        p = sign_flip_p(d)
    return {"n": len(seeds), "mean": mean, "lo": lo, "hi": hi, "p": p, "up": int((d > 0).sum())}


def primary_test(results: list) -> tuple:
    """A claim's one p-value for Holm's procedure, and the side it speaks for. With every difference in the claimed
    direction, the claim holds only if every component does: p = the largest component p (intersection-union test).
    Otherwise the smallest p among the differences that point against the claim, times their number of differences
    (Bonferroni within the claim), tests a contradiction."""
    diffs = [r for r, comp in results if comp.test == "difference"]
    against = [r for r in diffs if r["mean"] < 0]
    if not against:
        return max(r["p"] for r, _ in results), "for"
    return min(1.0, min(r["p"] for r in against) * len(diffs)), "against"


def on_seeds(values: dict, seeds) -> dict:
    """The endpoint values of the given seeds only (a study's first look)."""
    keep = set(seeds)
    return {key: {s: v for s, v in by_seed.items() if s in keep} for key, by_seed in values.items()}


def judge(values: dict, envs: list, confidence: float, alpha: float = ALPHA, first_look: list | None = None) -> list:
    """Every claim in every env: its components' paired tests and, from MIN_SEEDS paired seeds, a verdict under Holm's
    correction across all the judged claims. -> [{claim, env, results, status, verdict, p, p_holm}]

    first_look: judge() of the study's first look, for its second (the extension rule). A claim decided there keeps
    its first-look entry (results, p, Holm-adjusted p, verdict) and stays in Holm's family with that p, so the claims
    still open are tested in the step-down that the decided ones began: the sequentially rejective Holm procedure
    over the four claims, each look at the same α."""
    decided = {
        (e["claim"].number, e["env"]): e for e in first_look or () if e["verdict"] in ("supported", "contradicted")
    }
    judged = []
    for env in envs:
        for claim in CLAIMS:
            if (claim.number, env) in decided:
                judged.append({**decided[(claim.number, env)], "first_look": True})
                continue
            results = [(compare(values, comp, env, confidence, alpha), comp) for comp in claim.components]
            entry = {"claim": claim, "env": env, "results": results, "verdict": None, "p": None, "p_holm": None}
            if any(r is None for r, _ in results):
                missing = sorted(
                    {
                        name
                        for r, comp in results
                        if r is None
                        for name in (comp.x, comp.y)
                        if not values.get((env, name, comp.endpoint))
                    }
                )
                entry["status"] = f"not measured: no paired {', '.join(missing) or 'seeds'}"
            else:
                entry["p"], entry["side"] = primary_test(results)
            judged.append(entry)
    tested = [e for e in judged if e["p"] is not None]  # the family: every measured claim, judged or not
    for e, p_holm in zip(tested, holm([e["p"] for e in tested]) if tested else []):
        if e.get("first_look"):
            continue  # decided at the first look: that verdict stands
        e["p_holm"] = float(p_holm)
        n = min(r["n"] for r, _ in e["results"])
        if n < min_seeds(alpha):  # the p-values are shown; a verdict needs the minimum of seeds
            e["status"] = f"not judged: {n} paired seed(s), a verdict needs at least {min_seeds(alpha)}"
        else:
            e["verdict"] = "inconclusive" if p_holm > alpha else "supported" if e["side"] == "for" else "contradicted"
            e["status"] = e["verdict"]
    return judged


def in_report_order(policies: set) -> list:
    """The arms in the protocol's order (ORDER), then any other policy by name."""
    return [p for p in ORDER if p in policies] + sorted(policies - set(ORDER))
