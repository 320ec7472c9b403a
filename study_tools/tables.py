"""The report's tables: the claims' verdicts in words, paired differences, the policy × condition matrix (rliable's IQM
and mean with stratified-bootstrap CIs), and the per-seed CSVs that let a report be rebuilt without the runs."""

import csv
import io
import warnings
from collections import defaultdict

import numpy as np

from study_tools.claims import (
    ALL_CONDITIONS,
    AVERAGED_ENDPOINTS,
    CLAIMS,
    ENDPOINTS,
    EQUIVALENCE_MARGIN,
    EVAL_CONDITIONS,
    KEPT_CONDITIONS,
    OFFLINE,
    SCRATCH,
    SECONDARY,
    SECONDARY_AVERAGED,
    Comparison,
    compare,
    is_averaged,
    min_seeds,
)
from study_tools.loading import seed_ranges


def p_text(p: float) -> str:
    """A p-value to three decimals, or to one significant digit below 0.001 (the exact sign-flip p of 12 seeds that
    all agree is 2 / 2^12 = 0.0005, not 0.000)."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1g}"


def difference_text(r: dict, endpoint: str) -> str:
    """A paired difference and its CI: "+1.2 [-0.3, +2.7]" in normalized points, to two decimals for the retained share
    (a ratio in [0, 1], where one decimal would print "+0.0 [-0.0, +0.1]")."""
    d = 2 if endpoint == "retained" else 1
    ci = f"[{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]" if np.isfinite(r["lo"]) else "[no CI from 1 seed]"
    return f"{r['mean']:+.{d}f} {ci}"


def describe(r: dict, comp: Comparison, alpha: float) -> str:
    difference = difference_text(r, comp.endpoint)
    if comp.test == "equivalence":
        return (
            f"{comp.x} − {comp.y}, {comp.endpoint}: {difference} ({100 * (1 - 2 * alpha):.0f}% CI; "
            f"margin ±{EQUIVALENCE_MARGIN:g}), TOST p = {p_text(r['p'])}, n = {r['n']}"
        )
    return (
        f"{comp.x} − {comp.y}, {comp.endpoint}: {difference}, p = {p_text(r['p'])}, X higher in "
        f"{r['up']} of {r['n']} seeds"
    )


def claims_section(judged: list, confidence: float, alpha: float, first_look_seeds=()) -> list:
    out = [
        "## The paper's claims, checked",
        "",
        "Each claim is judged on its declared primary endpoint by paired per-seed differences X − Y (mean "
        f"[{int(confidence * 100)}% "
        f"paired-t CI]) and the exact sign-flip permutation p; claims with several components need all of them "
        f"(intersection-union: the largest p); Holm's correction across the claims at α = {alpha:g}. Verdicts: "
        f"**supported**, **contradicted** or **inconclusive**, and none from fewer than {min_seeds(alpha)} paired "
        "seeds. "
        f'Endpoints and rule: docs/study.md, "How the claims are judged".',
        "",
    ]
    if first_look_seeds:
        out[-1:] = [
            "",
            f"This is a second look (the protocol's extension rule). A claim decided at the first look (seeds "
            f"{seed_ranges(first_look_seeds)}) keeps that verdict, shown with the first look's numbers, and enters "
            "Holm's step-down with its first-look p; every other claim is judged on every seed. The tables below use "
            "every seed.",
            "",
        ]
    for e in judged:
        c = e["claim"]
        parts = "; ".join(
            describe(r, comp, alpha) if r is not None else f"{comp.x} − {comp.y}: not measured"
            for r, comp in e["results"]
        )
        if e.get("first_look"):
            status = f"Holm-adjusted p = {p_text(e['p_holm'])} at the first look: **{e['verdict']}**, kept"
        elif e["verdict"] is not None:
            status = f"{claim_p_text(e)}Holm-adjusted p = {p_text(e['p_holm'])}: **{e['verdict']}**"
        elif e["p_holm"] is not None:
            status = f"{claim_p_text(e)}Holm-adjusted p = {p_text(e['p_holm'])}; {e['status']}"
        else:
            status = e["status"]
        out.append(f"{c.number}. {c.text} ({e['env']}). {parts}. {status}.")
    return out + [""]


def claim_p_text(e: dict) -> str:
    """Which p of a claim enters Holm's procedure (primary_test), said where it is not its one component's p."""
    n_differences = sum(comp.test == "difference" for _, comp in e["results"])
    if e["side"] == "against":
        return (
            f"Tested for a contradiction: claim p = {p_text(e['p'])} (the smallest p of a difference against the "
            f"claim, times its {n_differences} difference{'s' * (n_differences > 1)}). "
        )
    if len(e["results"]) > 1:
        return f"Claim p = {p_text(e['p'])} (the largest of its components'). "
    return ""


# Descriptive statistics (rliable)
def interval(scores: dict, func, reps: int, confidence: float) -> dict:
    """rliable's stratified bootstrap: name -> (point estimates, lower bounds, upper bounds), reproducibly. With one
    run per array (a one-seed study) every resample is the data itself, so the interval is the point: computed
    directly, as rliable's `reps` identical calls would give it (a test compares the two)."""
    from rliable import library as rly

    arrays = [a for v in scores.values() for a in (v if isinstance(v, tuple | list) else [v])]
    if all(len(a) == 1 for a in arrays):
        points = {k: np.atleast_1d(func(*v) if isinstance(v, tuple | list) else func(v)) for k, v in scores.items()}
        return {k: (p, p.copy(), p.copy()) for k, p in points.items()}
    saved = np.random.get_state()
    np.random.seed(0)  # rliable's stratified resampling draws from NumPy's global generator, not from random_state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arch's note on RandomState
            point, ci = rly.get_interval_estimates(
                scores, func, reps=reps, confidence_interval_size=confidence, random_state=np.random.RandomState(0)
            )
    finally:
        np.random.set_state(saved)
    return {k: (np.atleast_1d(point[k]), np.atleast_1d(ci[k][0]), np.atleast_1d(ci[k][1])) for k in scores}


def iqm_and_mean(x: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])


def score_table(rows: list, envs: list):
    """(policy, condition) -> {env or 'all envs': array [seeds, tasks]} of normalized scores."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["policy"], r["eval_condition"])][(r["env_id"], r["seed"])] = r["normalized_mean"]
    out = {}
    for key, vals in by.items():
        arrs = {}
        for env in envs:
            seeds = sorted(s for e, s in vals if e == env)
            if seeds:
                arrs[env] = np.array([[vals[(env, s)]] for s in seeds])
        common = sorted(set.intersection(*[{s for e, s in vals if e == env} for env in envs]))
        if len(envs) > 1 and common:
            arrs["all envs"] = np.array([[vals[(env, s)] for env in envs] for s in common])
        out[key] = arrs
    return out


def fmt(p, lo, hi, digits=1):
    return f"{p:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


EVALUATION_FIELDS = ("env_id", "policy", "seed", "eval_condition", "mean_return", "normalized_mean", "attack_budget")


def per_seed_tables(rows: list, curves: dict, order=lambda policy: policy) -> tuple:
    """The report's inputs as CSV text: (evaluations, curves), one row per (env, policy, seed, condition) and per
    (env, policy, seed, evaluation step); study.py writes them per chain, the report per study."""
    evaluations = sorted(
        ({k: r[k] for k in EVALUATION_FIELDS} for r in rows),
        key=lambda r: (r["env_id"], order(r["policy"]), r["seed"], ALL_CONDITIONS.index(r["eval_condition"])),
    )
    curve_rows = [
        {"env_id": g, "policy": pol, "seed": seed, **r}
        for (g, pol), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], order(kv[0][1])))
        for seed, run in sorted(runs.items())
        for r in run
    ]
    return to_csv(evaluations), to_csv(curve_rows) if curve_rows else ""


def to_csv(rows: list) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(
        [{k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    )
    return buf.getvalue()


# The report's sections
def matrix_section(groups, policies, est, reps, confidence, budgets, conditions=EVAL_CONDITIONS) -> tuple:
    out, csv_rows = [], []
    kept = conditions == KEPT_CONDITIONS
    for g in groups:
        out += [
            f"## T1{'b' if kept else ''}: policy × evaluation condition, {g}"
            f"{', averaged over the kept policies' if kept else ''} (IQM [{int(confidence * 100)}% CI])",
            "",
            "| policy | seeds | " + " | ".join(conditions) + " |",
            "|---|---|" + "---|" * len(conditions),
        ]
        for pol in policies:
            if (g, pol, conditions[0]) not in est:
                continue
            cells = []
            for c in conditions:
                if (g, pol, c) not in est:
                    cells.append("–")
                    continue
                (iqm, mean), lo, hi, n = est[(g, pol, c)]
                cells.append(fmt(iqm, lo[0], hi[0]) + (" †" if pol == OFFLINE and c == "transfer" else ""))
                csv_rows.append(
                    {
                        "group": g,
                        "policy": pol,
                        "eval_condition": c,
                        "seeds": n,
                        "iqm": iqm,
                        "iqm_lo": lo[0],
                        "iqm_hi": hi[0],
                        "mean": mean,
                        "mean_lo": lo[1],
                        "mean_hi": hi[1],
                    }
                )
            out.append(f"| {pol} | {est[(g, pol, conditions[0])][3]} | " + " | ".join(cells) + " |")
        out.append("")
    if kept:
        return out + [
            "Each fine-tune's kept policies (the last evaluations' checkpoints), each on the held-out episodes of the "
            "final evaluation under the final policy's δ sets, pooled per seed (offline-only: see T1). The claims "
            "read normal and random here; their attack columns are descriptive (the final policy's fresh attack is a "
            "transfer to the others), and robustness is the final policy's (T1). – : no fresh attack on that arm (no "
            "endpoint reads it).",
            "",
        ], csv_rows
    out += [
        "Columns: normal (no δ); random (the study's random δ draws); adversarial (a fresh DE attack on each policy; "
        f"budget: {budgets}); transfer (the δ set precomputed against the offline policy, which fine-tuning trained "
        "on). † For offline-only that set was found against the policy itself: a direct attack at the precomputed "
        f"budget, not a transfer. rliable, {reps} stratified-bootstrap replications; mean and CIs of every cell: "
        "`scores.csv`.",
        "",
    ]
    return out, csv_rows


def paired_section(values: dict, envs: list, confidence: float, alpha: float) -> tuple:
    """Every declared comparison, primary and secondary, with unadjusted p-values (the verdicts' Holm step is above)."""
    out = [
        "## Paired differences per comparison (X − Y per seed, normalized points)",
        "",
        f"| env | role | X | Y | endpoint | seeds | mean difference [{int(confidence * 100)}% CI] | X higher in | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    part2 = is_averaged(values)
    comps = [(f"claim {c.number}", comp) for c in CLAIMS for comp in c.components] + [
        ("secondary", s) for s in (SECONDARY_AVERAGED if part2 else SECONDARY)
    ]
    for env in envs:
        for role, comp in comps:
            r = compare(values, comp, env, confidence, alpha)
            if r is None:
                continue
            test = "TOST p" if comp.test == "equivalence" else "sign-flip p"
            ci = difference_text(r, comp.endpoint) + (
                f" ({100 * (1 - 2 * alpha):.0f}% CI)" if comp.test == "equivalence" else ""
            )
            out.append(
                f"| {env} | {role} | {comp.x} | {comp.y} | {comp.endpoint} | {r['n']} | {ci} | {r['up']} of {r['n']} | "
                f"{test} {p_text(r['p'])} |"
            )
            rows.append(
                {
                    "env_id": env,
                    "role": role,
                    "x": comp.x,
                    "y": comp.y,
                    "endpoint": comp.endpoint,
                    "test": comp.test,
                    "seeds": r["n"],
                    "mean_difference": r["mean"],
                    "lo": r["lo"],
                    "hi": r["hi"],
                    "x_higher": r["up"],
                    "p": r["p"],
                }
            )
    endpoints = AVERAGED_ENDPOINTS if part2 else ENDPOINTS
    return out + ["", "Endpoints: " + "; ".join(f"**{k}**: {v}" for k, v in endpoints.items()) + ".", ""], rows


def attack_budgets(rows: list, manifest: dict) -> str:
    seen = sorted({r["attack_budget"] for r in rows if r.get("attack_budget")})
    if seen:
        return "; ".join(seen)
    overrides = sorted(
        {
            " ".join(c[c.index(f) : c.index(f) + 2])
            for c in manifest.get("commands", {}).values()
            for f in ("--attack-num-perturbations", "--attack-maxiter", "--attack-popsize")
            if f in c
        }
    )
    return (
        "not recorded per row; the evaluation commands overrode the precomputed attack's " + ", ".join(overrides)
        if overrides
        else "the precomputed attack's (not recorded per row)"
    )


def reference_section(reference: list, values: dict, envs: list) -> list:
    """What a plain TD3 (from scratch, without δ) reached at the study's budget, beside claim 2's comparator:
    descriptive, no test."""
    out = []
    for env in envs:
        mine = [r for r in reference if r["env_id"] == env]
        if not mine:
            continue
        scratch = values.get((env, SCRATCH, "online_auc"), {})
        arm = f"; the scratch arm's, {np.mean(list(scratch.values())):.1f} over {len(scratch)} seeds" if scratch else ""
        runs = ", ".join(f"seed {r['seed']}: {r['online_auc']:.1f} (final {r['final_normalized']:.1f})" for r in mine)
        steps, warmup = int(float(mine[0]["total_steps"])), int(float(mine[0]["learning_starts"]))
        walls = [r.get("wall_s") for r in mine]
        cost = (
            f" They took {' and '.join(f'{w:,.0f}' for w in walls)} s of wall time (training and evaluations, from "
            "each run's logged steps per second)."
            if all(w is not None for w in walls)
            else ""
        )
        out += [
            f"**A plain TD3 at the same budget ({env}; descriptive, no test).** Claim 2's comparator is adversarial "
            "from random networks; this project's TD3 from scratch without δ (`td3_adv_finetune.py --init scratch "
            f"--finetune-condition normal`, {steps:,} steps, {warmup:,} warm-up) reached an online area under the "
            f"curve of {runs}{arm}.{cost} From `plain_td3_reference.csv` (`benchmarks/plain_td3_reference.py`).",
            "",
        ]
    return out
