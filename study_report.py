# Aggregate a study over seeds: the paper's claims judged on declared endpoints with paired tests (exact sign-flip
# p-values, Holm's correction, an equivalence test), and rliable's descriptive statistics (IQM and mean with
# stratified-bootstrap CIs, probability of improvement, learning curves and q trajectories with CI bands).
"""Reads either the runs' own files (each policy's matrix.csv from evaluate_matrix.py and each fine-tune's
metrics.jsonl, listed in {results_dir}/study.json, which `study.py` writes) or, where the runs are not on this machine,
the per-seed tables a report wrote before (evaluations.csv and curves.csv in the results folder), so a committed study
is re-judged without training. Scores are normalized (0 = uniform random policy, 100 = expert reference). Every
bootstrap uses a fixed random state and every test is exact, so the same inputs give identical tables.

    python study_report.py --results-dir results/study-hopper

The decision rule (docs/study.md, "How the claims are judged"): each claim has one primary endpoint and comparison,
declared in CLAIMS below before any study ran; the arms of a seed share that seed's offline policy, so each comparison
is a paired difference X − Y per seed. A claim gets a verdict only from at least MIN_SEEDS paired seeds.
"""

import contextlib
import csv
import glob
import io
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

from paired_stats import equivalence_p, holm, paired_t_ci, sign_flip_p
from robust_o2o.cli import UserError
from robust_o2o.files import write_text
from robust_o2o.plots import save_curve_panels, save_q_plot

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


@dataclass
class Args:
    results_dir: str = "results/study-medium"
    """the study's results folder: holds study.json (written by study.py); the report goes beside it"""
    runs_root: str | None = None
    """folder the runs' paths in study.json are relative to (if unset: the one study.py ran in)"""
    source: Literal["auto", "runs", "csv"] = "auto"
    """runs: read the runs' files; csv: the per-seed evaluations.csv and curves.csv in --results-dir; auto: the runs
    when any is on this machine, else the CSVs"""
    reps: int = 10_000
    """bootstrap replications of the descriptive tables (P(X > Y) and the curves' bands use a fifth, at least 200)"""
    confidence: float = 0.95
    """coverage of the confidence intervals"""
    alpha: float = ALPHA
    """family-wise error rate of the verdicts (Holm across the claims); a study that looks at its data twice (its
    protocol's extension rule) uses a smaller one per look, e.g. Pocock's 0.0294 for two looks"""
    seeds: tuple[int, ...] = ()
    """only these seeds (all if unset): e.g. a study's first look, rebuilt once later seeds' chains are in"""
    first_look_seeds: tuple[int, ...] = ()
    """a second look (the protocol's extension rule): the seeds the first look judged. A claim decided on them keeps
    that verdict and enters Holm's step-down with its first-look p; the others are judged on every seed"""
    extensions: tuple[str, ...] = ()
    """results folders of this study's extensions (more seeds run by study.py with a --results-dir of their own, their
    chains/ files copied into this folder's): each one's study.json, and its stage_costs.csv where its runs are not on
    this machine (the report writes it there when they are); their stages' costs join the report's cost section"""
    out_dir: str | None = None
    """folder for the report, its tables and plots (if unset: --results-dir), e.g. to keep a first look beside the
    second; the study's per-seed tables stay in --results-dir and always hold every seed, whatever --seeds selects"""


class ReportError(Exception):
    """A problem with the study's files; printed as one line."""


# Inputs: per-seed evaluations (one row per env, policy, seed, evaluation condition) and learning curves
CURVE_KEYS = {  # curves.csv column <- metrics.jsonl key
    **{f"{c}_{k}": f"eval/{c}_{k}" for c in CURVE_CONDITIONS for k in ("return", "normalized")},
    "q": "curriculum/q",
    "perturbed_episode_fraction": "charts/perturbed_fraction",
    "perturbed_step_fraction": "charts/perturbed_step_fraction",
}


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is unreadable ({type(e).__name__}); run the study again to rewrite it") from None


@contextlib.contextmanager
def reading(path: str, fix: str):
    """Any read of one input file (a missing file, a torn line, a missing column, a value that is not a number) ends
    in one line that names the file and `fix`, instead of a traceback."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError, IndexError, csv.Error, UnicodeDecodeError) as e:
        detail = f"{type(e).__name__}: {str(e).strip()[:120]}" if str(e).strip() else type(e).__name__
        raise ReportError(f"{path} is missing or damaged ({detail}); {fix}") from None


MANIFEST_KEYS = {
    "study": str,
    "scale": str,
    "env_ids": list,
    "epsilon": (int, float),
    "policies": list,
    "runs_root": str,
}
POLICY_KEYS = ("env_id", "seed", "run_dir", "stage", "matrix")


def check_manifest(manifest, path: str):
    """study.json holds what the report reads: its keys, and each policy's."""
    fix = "run the study's command again to rewrite it (finished stages are skipped)"
    if not isinstance(manifest, dict):
        raise ReportError(f"{path} is not a study manifest; {fix}")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise ReportError(f"{path} lacks '{key}' or it is malformed; {fix}")
    for p in manifest["policies"]:
        if not isinstance(p, dict) or any(k not in p for k in POLICY_KEYS):
            raise ReportError(f"{path} lists a policy without {', '.join(POLICY_KEYS)}; {fix}")


def check_finite(rows: list, curves: dict):
    """A NaN or inf among the inputs is not a result: refused, naming the policy and seed, never aggregated."""
    for r in rows:
        if not (np.isfinite(r["mean_return"]) and np.isfinite(r["normalized_mean"])):
            raise ReportError(
                f"non-finite score for {r['policy']}, seed {r['seed']}, {r['eval_condition']}; re-evaluate that "
                f"policy: a NaN is not a result"
            )
    for (env, policy), by_seed in curves.items():
        for seed, run in by_seed.items():
            for row in run:
                bad = [k for k, v in row.items() if v is not None and not np.isfinite(v)]
                if bad:
                    raise ReportError(
                        f"non-finite {bad[0]} in the learning curve of {policy} on {env}, seed {seed}, at step "
                        f"{row['step']}; "
                        f"that fine-tune's log is not a result: rerun it"
                    )


def load_runs(manifest: dict, root: str):
    """The runs' files -> (evaluation rows, curves {(env, policy): {seed: [eval rows]}}, policies not evaluated yet)."""
    rows, curves, missing = [], defaultdict(dict), []
    for p in manifest["policies"]:
        path = os.path.join(root, p["matrix"])
        if not os.path.isfile(path):
            missing.append(p)
            continue
        with reading(path, "re-run evaluate_matrix.py on that policy (or the study's command)"), open(path) as f:
            mine = [
                {
                    "env_id": r["env_id"],
                    "policy": r["policy"],
                    "seed": int(r["seed"]),
                    "eval_condition": r["eval_condition"],
                    "mean_return": float(r["mean_return"]),
                    "normalized_mean": float(r["normalized_mean"]),
                    "attack_budget": r.get("attack_budget", ""),
                }
                for r in csv.DictReader(f)
            ]
        rows += mine
        if p["stage"] == "finetune":
            log = os.path.join(root, p["run_dir"], "metrics.jsonl")
            with reading(log, "the fine-tune's log is its learning curve: rerun that fine-tune"), open(log) as f:
                evals = [r for r in map(json.loads, f) if "eval/normal_return" in r]
                curves[(p["env_id"], mine[0]["policy"])][p["seed"]] = [
                    {"step": int(r["step"]), **{col: number(r.get(key)) for col, key in CURVE_KEYS.items()}}
                    for r in evals
                ]
    return rows, curves, missing


def number(value) -> float | None:
    """A logged value as a float (None stays None: a key that row does not log); a string that is no number raises."""
    return None if value is None else float(value)


def csv_inputs(results_dir: str) -> tuple:
    """The per-seed tables: the finished chains' files (chains/*__evaluations.csv and *__curves.csv, which study.py
    writes as each (env, seed) chain finishes) where there are any, else evaluations.csv and curves.csv."""
    chains = sorted(glob.glob(os.path.join(results_dir, "chains", "*__evaluations.csv")))
    if chains:
        return chains, [p.replace("__evaluations.csv", "__curves.csv") for p in chains]
    return [os.path.join(results_dir, "evaluations.csv")], [os.path.join(results_dir, "curves.csv")]


def load_csvs(results_dir: str):
    """The per-seed tables a report or study wrote -> (evaluation rows, curves). Curves from before the normalized
    columns get them from the linear map that the evaluations show between returns and normalized scores (exact)."""
    rows = []
    evaluation_files, curve_files = csv_inputs(results_dir)
    fix = "restore it from git (`git checkout -- <file>`) or rebuild it from the runs (--source runs)"
    for path in evaluation_files:
        with reading(path, fix), open(path) as f:
            for r in csv.DictReader(f):
                rows.append(
                    {
                        **r,
                        "seed": int(r["seed"]),
                        "mean_return": float(r["mean_return"]),
                        "normalized_mean": float(r["normalized_mean"]),
                        "attack_budget": r.get("attack_budget", ""),
                    }
                )

    def normalized(env: str, ret: float) -> float:  # normalized = a · return + b, read off the evaluations
        pairs = np.array([(r["mean_return"], r["normalized_mean"]) for r in rows if r["env_id"] == env])
        return float(np.polyval(np.polyfit(pairs[:, 0], pairs[:, 1], 1), ret))

    curves = defaultdict(dict)
    for path in (p for p in curve_files if os.path.isfile(p)):
        with reading(path, fix), open(path) as f:
            for r in csv.DictReader(f):
                row = {"step": int(r["step"])}
                for col in CURVE_KEYS:
                    row[col] = float(r[col]) if r.get(col) not in (None, "") else None
                for c in CURVE_CONDITIONS:
                    if row[f"{c}_normalized"] is None:
                        row[f"{c}_normalized"] = normalized(r["env_id"], row[f"{c}_return"])
                curves[(r["env_id"], r["policy"])].setdefault(int(r["seed"]), []).append(row)
    return rows, curves


def missing_curves(rows: list, curves: dict) -> list:
    """Each evaluated fine-tune (every policy but offline-only) whose learning curve is not among the inputs, as
    'policy, env, seed s' (a chain's curves file lost beside its evaluations)."""
    fine_tuned = sorted({(r["env_id"], r["policy"], r["seed"]) for r in rows if r["policy"] != OFFLINE})
    return [f"{pol}, {env}, seed {s}" for env, pol, s in fine_tuned if s not in curves.get((env, pol), {})]


def evaluated(listed: list, rows: list) -> tuple:
    """(n_done, n_total): how many of the policies the manifests list (`listed`, their `policies`) have rows, and how
    many they list. Counted per (env, seed) chain, since a manifest names a policy by its run and a row by its label:
    a chain's listed policies are evaluated as far as its rows name distinct policies. Rows of a chain that no
    manifest lists (an extension's seeds whose manifest was lost with the machine that ran them) count in neither
    number."""
    per_chain = Counter((p["env_id"], p["seed"]) for policies in listed for p in policies)
    labels = {(r["env_id"], r["seed"], r["policy"]) for r in rows}
    have = Counter((env, seed) for env, seed, _ in labels)
    return sum(min(n, have[chain]) for chain, n in per_chain.items()), sum(per_chain.values())


def load(args: Args):
    path = os.path.join(args.results_dir, "study.json")
    if not os.path.isfile(path):
        raise ReportError(f"{path} not found; run `python study.py --results-dir {args.results_dir}` first")
    manifest = read_json(path)
    check_manifest(manifest, path)
    root = args.runs_root or manifest["runs_root"]
    on_disk = any(os.path.isfile(os.path.join(root, p["matrix"])) for p in manifest["policies"])
    source = args.source if args.source != "auto" else ("runs" if on_disk else "csv")
    if source == "runs":
        rows, curves, _ = load_runs(manifest, root)
    else:
        if not all(os.path.isfile(p) for p in csv_inputs(args.results_dir)[0]):
            raise ReportError(
                f"neither the study's runs (under {root}) nor {args.results_dir}/evaluations.csv are here; "
                f"pass --runs-root, or let the study finish"
            )
        rows, curves = load_csvs(args.results_dir)
    if not rows:
        raise ReportError(
            f"no evaluated policy yet among the {len(manifest['policies'])} in {path}; let the study finish"
        )
    check_finite(rows, curves)
    return manifest, source, rows, curves


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


def p_text(p: float) -> str:
    """A p-value to three decimals, or to one significant digit below 0.001 (the exact sign-flip p of 12 seeds that
    all agree is 2 / 2^12 = 0.0005, not 0.000)."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1g}"


def ci_text(r: dict) -> str:
    return f"[{r['lo']:+.1f}, {r['hi']:+.1f}]" if np.isfinite(r["lo"]) else "[no CI from 1 seed]"


def describe(r: dict, comp: Comparison, alpha: float) -> str:
    if comp.test == "equivalence":
        return (
            f"{comp.x} − {comp.y}, {comp.endpoint}: {r['mean']:+.1f} {ci_text(r)} ({100 * (1 - 2 * alpha):.0f}% CI; "
            f"margin ±{EQUIVALENCE_MARGIN:g}), TOST p = {p_text(r['p'])}, n = {r['n']}"
        )
    return (
        f"{comp.x} − {comp.y}, {comp.endpoint}: {r['mean']:+.1f} {ci_text(r)}, p = {p_text(r['p'])}, X higher in "
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


def seed_ranges(seeds) -> str:
    """1 2 3 5 -> '1-3, 5'."""
    seeds, runs = sorted(seeds), []
    for s in seeds:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


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


def curve_array(runs: dict, key: str):
    """Seeds' eval rows -> (steps present in every seed, array [seeds, steps])."""
    steps = sorted(set.intersection(*[{r["step"] for r in run} for run in runs.values()]))
    return np.array(steps), np.array(
        [[next(r[key] for r in run if r["step"] == s) for s in steps] for run in runs.values()]
    )


def q_in_force(run: list, linear: bool) -> float:
    """The mean q over the online steps: q logged at an evaluation holds until the next (fixed, adaptive); the linear
    curriculum's q is interpolated between evaluations."""
    steps, q = np.array([r["step"] for r in run], float), np.array([r["q"] for r in run], float)
    if len(steps) < 2:
        return float(q[0])
    widths = np.diff(steps)
    held = (q[:-1] + q[1:]) / 2 if linear else q[:-1]
    return float((held * widths).sum() / widths.sum())


def exposure(curves: dict, env: str, pol: str) -> dict:
    """Per seed: the mean q in force, and the realized exposure (shares of training episodes and env steps under δ ≠ 0,
    at the last evaluation) where the run logged it."""
    out = {"q": [], "episodes": [], "steps": []}
    for _, run in sorted(curves.get((env, pol), {}).items()):
        out["q"].append(q_in_force(run, "(linear)" in pol))
        last = run[-1]
        if last.get("perturbed_episode_fraction") is not None:
            out["episodes"].append(last["perturbed_episode_fraction"])
        if last.get("perturbed_step_fraction") is not None:
            out["steps"].append(last["perturbed_step_fraction"])
    return out


def mean_ci(values: list, confidence: float) -> str:
    if not values:
        return "not logged"
    m, lo, hi = paired_t_ci(np.array(values), confidence)
    return f"{m:.2f}" if len(values) < 2 else f"{m:.2f} [{max(lo, 0):.2f}, {min(hi, 1):.2f}]"


def steps_to_reach(run: list, threshold: float) -> int | None:
    """The first evaluation after step 0 at which the normal return reaches the threshold."""
    return next((r["step"] for r in run if r["step"] > 0 and r["normal_return"] >= threshold), None)


STAGE_KINDS = ("dataset", "pretrain", "attack", "finetune", "evaluate")


def stage_costs(manifest: dict, root: str, results_dir: str) -> list:
    """What each kind of stage cost, from the study's markers (runs/_study/{namespace}/*.json) when they are here,
    else from the stage_costs.csv an earlier report wrote. -> one dict per kind, times in seconds."""
    return costs_and_source(manifest, root, results_dir)[0]


def costs_and_source(manifest: dict, root: str, results_dir: str) -> tuple:
    """stage_costs() and whether they come from the markers (else from stage_costs.csv). The markers win unless the
    table counts more stages: a study finished on a machine that is gone shares its dataset's stage (the namespace)
    with an extension resumed on a new one, and that one marker must not replace the committed table.

    A marker times every attempt of its stage (study.py keeps them, with those killed when a session ended). Markers
    written before attempts were timed hold the last attempt only; such a stage that ran in more than one attempt
    (more than one command line in its log) is counted as "untimed", and the estimate replaces its time by the mean
    of the stages of its kind whose time is complete (where none is, its last attempt stays)."""
    by = defaultdict(list)
    for path, _, marker in study_markers(manifest, root):
        if "ran_on" in marker:
            continue  # run on a lent machine (benchmarks/device_chains.py): not this machine's core-hours
        if "attempts" in marker:
            attempts, timed = len(marker["attempts"]), True
        else:
            log = os.path.join(os.path.dirname(path), "logs", os.path.basename(path)[: -len(".json")] + ".log")
            attempts, timed = 1, False
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    attempts = max(1, sum(line.startswith("$ ") for line in f))
        by[os.path.basename(path).split("__")[0]].append((marker["wall_s"], marker.get("cpu_s"), attempts, timed))
    saved = read_stage_costs(os.path.join(results_dir, "stage_costs.csv"))
    if not by or sum(map(len, by.values())) < sum(c["runs"] for c in saved):
        return saved, False
    costs = []
    for kind in (k for k in STAGE_KINDS if by[k]):
        wall = np.array([w for w, _, _, _ in by[kind]])
        cpu = [c for _, c, _, _ in by[kind]]
        untimed = np.array([n > 1 and not timed for _, _, n, timed in by[kind]])
        complete = wall[~untimed]
        estimate = complete.sum() + untimed.sum() * complete.mean() if len(complete) else wall.sum()
        costs.append(
            {
                "stage": kind,
                "runs": len(wall),
                "mean_s": float(wall.mean()),
                "min_s": float(wall.min()),
                "max_s": float(wall.max()),
                "total_s": float(wall.sum()),
                "cpu_s": float(sum(cpu)) if None not in cpu else None,
                "resumed": sum(n > 1 for _, _, n, _ in by[kind]),
                "untimed": int(untimed.sum()),
                "estimate_s": float(estimate),
            }
        )
    return costs, True


def study_markers(manifest: dict, root: str) -> list:
    """(path, stage id, marker) of each finished stage of this study (runs/_study/{namespace}/*.json). The namespace's
    markers are shared with every study on the same dataset (an extension's seeds, run beside it), so only the stages
    in the manifest's commands count, where it lists them."""
    folder = os.path.join(root, "runs", "_study", manifest.get("namespace", ""))
    ours = manifest.get("commands")
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        stage = os.path.basename(path)[: -len(".json")].replace("__", ":")
        if not ours or stage in ours:
            out.append((path, stage, read_json(path)))
    return out


def stages_elsewhere(manifest: dict, root: str, results_dir: str) -> list:
    """The study's stages that ran on another machine (benchmarks/device_chains.py adopts them with a marker that
    says where), from the markers when they are here, else from the stages_elsewhere.csv an earlier report wrote.
    -> one dict per stage: stage, env_id, seed, ran_on, wall_s."""
    out = []
    for _, stage, marker in study_markers(manifest, root):
        if "ran_on" in marker:
            parts = stage.split(":")[1:] if stage.startswith("evaluate:") else stage.split(":")
            out.append(
                {
                    "stage": stage,
                    "env_id": parts[1],
                    "seed": int(parts[2]),
                    "ran_on": marker["ran_on"],
                    "wall_s": marker["wall_s"],
                }
            )
    if out or not os.path.isfile(os.path.join(results_dir, "stages_elsewhere.csv")):
        return out
    with open(os.path.join(results_dir, "stages_elsewhere.csv")) as f:
        return [{**r, "seed": int(r["seed"]), "wall_s": float(r["wall_s"])} for r in csv.DictReader(f)]


def read_stage_costs(path: str) -> list:
    """stage_costs.csv as a report wrote it (one written before attempts were timed has only the wall times)."""
    if not os.path.isfile(path):
        return []

    def value(row: dict, key: str) -> float | None:
        return float(row[key]) if row.get(key) else None

    with open(path) as f:
        return [
            {
                "stage": r["stage"],
                "runs": int(r["runs"]),
                **{k: value(r, k) for k in ("mean_s", "min_s", "max_s", "total_s", "cpu_s")},
                "resumed": int(r.get("resumed") or 0),
                "untimed": int(r.get("untimed") or 0),
                "estimate_s": value(r, "estimate_s" if "estimate_s" in r else "total_s"),
            }
            for r in csv.DictReader(f)
        ]


def poi_reps(reps: int) -> int:
    """P(X > Y) is costly to bootstrap (a Mann-Whitney statistic per replication): a fifth of --reps, at least 200."""
    return max(200, reps // 5)


def poi(table: dict, x: str, y: str, cond: str, g: str, reps: int, confidence: float):
    """P(X > Y) [CI] of two policies' scores under `cond` in group g (rliable), or None if either is missing or
    unpaired."""
    from rliable import metrics

    kx, ky = table.get((x, cond), {}), table.get((y, cond), {})
    if g not in kx or g not in ky or kx[g].shape != ky[g].shape:
        return None
    (p, lo, hi) = interval({"pair": (kx[g], ky[g])}, metrics.probability_of_improvement, poi_reps(reps), confidence)[
        "pair"
    ]
    return float(p[0]), float(lo[0]), float(hi[0])


# Plots
def band(ax, steps, arr, label, reps: int, confidence: float, ls="-"):
    """IQM over seeds at each step, with its bootstrap CI as a shaded band."""
    res = interval({str(i): arr[:, i : i + 1] for i in range(arr.shape[1])}, iqm_and_mean, poi_reps(reps), confidence)
    m = np.array([res[str(i)][0][0] for i in range(arr.shape[1])])
    lo, hi = (np.array([res[str(i)][j][0] for i in range(arr.shape[1])]) for j in (1, 2))
    ax.plot(steps, m, ls=ls, marker=".", label=f"{label} (n={arr.shape[0]})")
    ax.fill_between(steps, lo, hi, alpha=0.15)


def plot_curves(results_dir: str, envs: list, curves: dict, policies: list, est: dict, reps: int, confidence: float):
    """Per env: curves{suffix}.png (normalized returns under each condition) and q_trajectory{suffix}.png (IQM with
    CIs; each legend entry gives the arm's realized exposure)."""
    import matplotlib.pyplot as plt

    for g in envs:
        suffix = "" if len(envs) == 1 else f"_{g}"
        keys = sorted((k for k in curves if k[0] == g), key=lambda k: policies.index(k[1]))
        if not keys:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100, sharey=True)
        for ax, cond in zip(axes, CURVE_CONDITIONS):
            for k in keys:
                steps, arr = curve_array(curves[k], f"{cond}_normalized")
                band(ax, steps, arr, k[1], reps, confidence, "--" if k[1].startswith("scratch") else "-")
            ref = (g, OFFLINE, cond if cond != "adversarial" else "transfer")
            if ref in est:
                ax.axhline(est[ref][0][0], color="k", ls=":", label="offline-only (IQM, final evaluation)")
        save_curve_panels(
            fig,
            axes,
            CURVE_CONDITIONS,
            "normalized return",
            f"{g}: learning curves, IQM over seeds with {int(confidence * 100)}% bootstrap CIs",
            os.path.join(results_dir, f"curves{suffix}.png"),
        )
        fig, ax = plt.subplots(figsize=(8, 4.4), dpi=100)
        for k in keys:
            if k[1] == NORMAL_FT:
                continue
            steps, arr = curve_array(curves[k], "q")
            ex = exposure(curves, *k)
            realized = ex["episodes"] and f"realized exposure {np.mean(ex['episodes']):.2f}"
            band(
                ax,
                steps,
                arr,
                f"{k[1]}: {realized or 'mean q in force ' + format(np.mean(ex['q']), '.2f')}",
                reps,
                confidence,
            )
        save_q_plot(
            fig,
            ax,
            f"{g}: q at each evaluation, IQM with {int(confidence * 100)}% CIs",
            os.path.join(results_dir, f"q_trajectory{suffix}.png"),
        )


def plot_heatmap(path: str, g: str, policies: list, est: dict, confidence: float):
    """Training condition × evaluation condition in group g: IQM with its CI in each cell."""
    import matplotlib.pyplot as plt

    labels = [p for p in policies if (g, p, "normal") in est]
    vals = np.array([[est[(g, p, c)][0][0] if (g, p, c) in est else np.nan for c in EVAL_CONDITIONS] for p in labels])
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(labels)), dpi=100)
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    for i, p in enumerate(labels):
        for j, c in enumerate(EVAL_CONDITIONS):
            _, lo, hi, _ = est.get((g, p, c), (None, [np.nan], [np.nan], 0))
            ax.text(
                j,
                i,
                "–" if np.isnan(vals[i, j]) else f"{vals[i, j]:.1f}\n[{lo[0]:.1f}, {hi[0]:.1f}]",
                ha="center",
                va="center",
                fontsize=8,
                color="w" if vals[i, j] < np.nanmean(vals) else "k",
            )
    ax.set_xticks(range(len(EVAL_CONDITIONS)), EVAL_CONDITIONS)
    ax.set_yticks(range(len(labels)), labels)
    fig.colorbar(im, ax=ax, label="normalized score, IQM over seeds")
    ax.set_title(f"{g}: training condition × evaluation condition, IQM [{int(confidence * 100)}% CI]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
            ci = f"{r['mean']:+.1f} {ci_text(r)}" + (
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


def curricula_section(envs, est, curves, confidence) -> list:
    out = [
        "## T2: the arms' perturbation exposure, and the curricula under adversarial fine-tuning",
        "",
        "| env | policy | seeds | normal | robustness | mean q in force | realized exposure: episodes | realized "
        "exposure: env steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in envs:
        for pol in sorted({k[1] for k in curves if k[0] == g}, key=lambda p: ORDER.index(p) if p in ORDER else 99):
            if pol == NORMAL_FT or (g, pol, "normal") not in est:
                continue
            ex = exposure(curves, g, pol)
            (iqm, _), lo, hi, n = est[(g, pol, "normal")]
            rob = est.get((g, pol, "robustness"))
            out.append(
                f"| {g} | {pol} | {n} | {fmt(iqm, lo[0], hi[0])} | "
                + (fmt(rob[0][0], rob[1][0], rob[2][0]) if rob else "–")
                + f" | {mean_ci(ex['q'], confidence)} | {mean_ci(ex['episodes'], confidence)} | "
                f"{mean_ci(ex['steps'], confidence)} |"
            )
    return out + [
        "",
        "Normal and robustness: IQM [CI] over seeds. q in force: the mean over the online steps of the q the "
        "curriculum set (from its trajectory); realized exposure: the share of training episodes and of env steps "
        "that actually ran under δ ≠ 0 (mean over seeds [t-CI]), logged by td3_adv_finetune.py. The q "
        "trajectories: `q_trajectory.png`.",
        "",
    ]


def efficiency_section(curves, policies, reps, confidence) -> list:
    out = [
        "## T3: sample efficiency",
        "",
        "| env | policy | seeds reaching the offline return | median steps (reached) | normal return at the last "
        "step, IQM [CI] | online area under the curve, IQM [CI] |",
        "|---|---|---|---|---|---|",
    ]
    start = {}  # (env, seed) -> the offline policy's normal return on the fine-tunes' own evaluation episodes (step 0)
    for (g, pol), runs in curves.items():
        if not pol.startswith("scratch"):
            for s, run in runs.items():
                start.setdefault((g, s), run[0]["normal_return"])
    for (g, pol), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], policies.index(kv[0][1]))):
        reach = [steps_to_reach(run, start[(g, s)]) for s, run in sorted(runs.items()) if (g, s) in start]
        hit = [x for x in reach if x is not None]
        steps, arr = curve_array(runs, "normal_normalized")
        last = interval({"x": arr[:, -1:]}, iqm_and_mean, reps, confidence)["x"]
        area = interval({"x": arr[:, steps > 0].mean(1, keepdims=True)}, iqm_and_mean, reps, confidence)["x"]
        out.append(
            f"| {g} | {pol} | {len(hit)} of {len(reach)} | {int(np.median(hit)) if hit else '–'} | "
            f"{fmt(last[0][0], last[1][0], last[2][0])} | {fmt(area[0][0], area[1][0], area[2][0])} |"
        )
    return out + [
        "",
        f"Learning curves (`curves.png`): IQM over seeds with {poi_reps(reps)}-replication bootstrap bands. "
        "Reaching: the first evaluation after step 0 at which the normal return is at least the same seed's "
        "offline policy's on the same evaluation episodes (step 0 of its fine-tunes). The online area under the "
        "curve (claim 2's endpoint) averages the evaluations after step 0.",
        "",
    ]


def hours(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 3600:.2f} h"


def costs_section(costs: list, elsewhere: list = (), extensions: list = (), unlisted: list = ()) -> list:
    """The stages' costs; with extensions (more seeds run as studies of their own), one table per study and the sum;
    chains that no manifest lists (unlisted_chains) count by their chains' totals."""
    if not costs and not elsewhere and not extensions and not unlisted:
        return []
    out = [
        "## What the stages cost",
        "",
        "Time of each finished stage over all its attempts (a stage interrupted by a session's end continues from "
        "its resume state), from the study's markers (`runs/_study/`); each stage ran on one core with one torch "
        "thread, beside other stages and other work on the same machine, so its wall time exceeds its CPU time.",
        "",
    ]
    if not extensions and not unlisted:
        return out + cost_table(costs, elsewhere) + [""]
    studies = [("this study's own stages", costs, elsewhere)] + [
        (f"the extension `{e['study']}` (seeds {seed_ranges(e['seeds'])})", e["costs"], e["elsewhere"])
        for e in extensions
    ]
    for label, study_costs, study_elsewhere in studies:
        out += [f"**{label[0].upper() + label[1:]}:**", ""] + cost_table(study_costs, study_elsewhere) + [""]
    every = [c for _, study_costs, _ in studies for c in study_costs]
    by_chains = sum(c["wall_s"] for c in unlisted) / 3600
    total = sum(c["total_s"] for c in every) / 3600 + by_chains
    estimate = sum(c["estimate_s"] for c in every) / 3600 + by_chains
    if unlisted:
        envs = sorted({c["env_id"] for c in unlisted})
        which = "; ".join(
            f"{env} seeds {seed_ranges([c['seed'] for c in unlisted if c['env_id'] == env])}" for env in envs
        )
        machines = ", ".join(sorted({c["machine"] for c in unlisted}))
        out += [
            f"**Chains that no manifest here lists ({which}):** their study.json and stage markers are not here (lost "
            "with the machine that ran them, or never copied), so they count by their chains' own totals "
            f'(`chains/*.json`, each in "The chains" below): {len(unlisted)} chains, '
            f"{sum(c['stages'] for c in unlisted)} stages, {by_chains:.2f} core-hours of stage wall time on "
            f"{machines}.",
            "",
        ]
    parts = [f"its extension{'s' if len(extensions) > 1 else ''}"] * bool(extensions)
    who = " and ".join(parts + ["the chains no manifest lists"] * bool(unlisted))
    return out + [
        f"The study and {who} together: {total:.2f} core-hours of wall time on the study's CPU machines"
        + (f" (about {estimate:.2f} counting the earlier attempts as above)." if estimate > total else "."),
        "",
    ]


def unlisted_chains(results_dir: str, listed: list, seeds=()) -> list:
    """The finished chains (finished_chains) whose (env, seed) none of the listed policies (the manifests' `policies`)
    has: e.g. an extension's first seeds, whose manifest and markers were lost with the machine that ran them before
    they were committed, the extension resumed with the remaining seeds."""
    chains_listed = {(p["env_id"], p["seed"]) for policies in listed for p in policies}
    return [c for c in finished_chains(results_dir, seeds) if (c["env_id"], c["seed"]) not in chains_listed]


def finished_chains(results_dir: str, seeds=()) -> list:
    """The provenance of each finished chain (chains/*.json, written by study.py), in (env, seed) order (seed 10 after
    seed 9, not after seed 1). --seeds: the report's seeds only."""
    chains = [read_json(p) for p in glob.glob(os.path.join(results_dir, "chains", "*.json"))]
    chains = [c for c in chains if not seeds or c["seed"] in seeds]
    return sorted(chains, key=lambda c: (c["env_id"], c["seed"]))


def cost_table(costs: list, elsewhere: list) -> list:
    out = [
        "| stage | runs | mean wall | min | max | wall, all runs | CPU, all runs | run in several attempts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {c['stage']} | {c['runs']} | {c['mean_s'] / 60:.1f} min | {c['min_s'] / 60:.1f} min | "
        f"{c['max_s'] / 60:.1f} min | {hours(c['total_s'])} | {hours(c['cpu_s'])} | {c['resumed']} |"
        for c in costs
    ]
    cpu = [c["cpu_s"] for c in costs]
    total = f"All stages together: {sum(c['total_s'] for c in costs) / 3600:.2f} core-hours of wall time"
    out += ["", total + (f", {sum(cpu) / 3600:.2f} CPU-hours." if None not in cpu else ".")]
    untimed = sum(c["untimed"] for c in costs)
    if untimed:
        out += [
            "",
            f"{untimed} stage(s) ran in several attempts under a study.py that timed only the last attempt, so the "
            f"totals above leave out their earlier attempts. Counting each of them at the mean of the stages of its "
            f"kind whose time is complete, the stages cost about {sum(c['estimate_s'] for c in costs) / 3600:.2f} "
            "core-hours of wall time.",
        ]
    for machine in sorted({e["ran_on"] for e in elsewhere}):
        mine = [e for e in elsewhere if e["ran_on"] == machine]
        kinds = Counter(e["stage"].split(":")[0] for e in mine)
        out += [
            "",
            f"Not in the table: {len(mine)} stage(s) ran on {machine} (benchmarks/device_chains.py; training stages "
            f"with `--cuda --cudagraphs`, DE and evaluations with more workers, each argv otherwise the study's), "
            f"{sum(e['wall_s'] for e in mine) / 60:.1f} min of stage wall time there in all: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + ". The argv each ran with is in its marker (`argv_ran`).",
        ]
    return out


def chains_section(results_dir: str, elsewhere: list = (), seeds=()) -> list:
    """Which commit, machine and time produced each (env, seed) chain (chains/*.json, written by study.py; its machine
    is the driver's, so the stages that ran on another machine are named beside it)."""
    chains = finished_chains(results_dir, seeds)
    if not chains:
        return []
    timed = all(c.get("cpu_s") is not None for c in chains)  # chains/*.json from a study.py that timed attempts
    out = [
        "## The chains: what produced each",
        "",
        "| env | seed | commit | machine | stages | wall time of its stages | CPU time | finished (UTC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {c['env_id']} | {c['seed']} | "
        f"`{c['commit'][:12]}{'+dirty' if c['commit'].endswith('+dirty') else ''}` | "
        f"{c['machine']}{elsewhere_note(c, elsewhere)} | {c['stages']} | {hours(c['wall_s'])} | "
        f"{hours(c.get('cpu_s'))} | "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(c['finished']))} |"
        for c in chains
    ]
    total = f"{len(chains)} chains, {sum(c['wall_s'] for c in chains) / 3600:.2f} core-hours of stages in all"
    if elsewhere:
        total += f" (counting {sum(e['wall_s'] for e in elsewhere) / 3600:.2f} h of stages on another machine)"
    if timed:
        total += f" ({sum(c['cpu_s'] for c in chains) / 3600:.2f} CPU-hours)"
    else:
        total += " (their last attempts only where a stage ran in several: see the section above)"
    return out + ["", total + ", each stage on one core.", ""]


def elsewhere_note(chain: dict, elsewhere: list) -> str:
    mine = [e for e in elsewhere if (e["env_id"], e["seed"]) == (chain["env_id"], chain["seed"])]
    machines = sorted({e["ran_on"] for e in mine})
    return "".join(f"; {sum(e['ran_on'] == m for e in mine)} of its stages on {m}" for m in machines)


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


def load_extension(folder: str, runs_root: str | None, study: dict, results_dir: str) -> dict:
    """An extension of the study (its seeds run by study.py with a results folder of their own): its name, seeds and
    stages' costs, from its markers when its runs are here, else from the stage_costs.csv a report wrote there. It
    must be another folder than the study's, of the study's envs, ε and scale, with no arm the study lacks."""
    path = os.path.join(folder, "study.json")
    if os.path.abspath(folder) == os.path.abspath(results_dir):
        raise ReportError(
            f"--extensions {folder} is the study itself (its policies would count twice); name only the "
            "extensions' own results folders"
        )
    if not os.path.isfile(path):
        raise ReportError(f"--extensions {folder}: {path} not found; name the folder study.py wrote the extension to")
    manifest = read_json(path)
    check_manifest(manifest, path)
    for key in ("env_ids", "epsilon", "scale"):
        if manifest[key] != study[key] and not (key == "env_ids" and set(manifest[key]) <= set(study[key])):
            raise ReportError(
                f"--extensions {folder} was run with {key} {manifest[key]!r}, the study with {study[key]!r}: it is "
                "not an extension of this study; report it on its own"
            )
    arms = {(p.get("init"), p.get("finetune_condition"), p.get("curriculum")) for p in study["policies"]}
    extra = {(p.get("init"), p.get("finetune_condition"), p.get("curriculum")) for p in manifest["policies"]} - arms
    if extra:
        raise ReportError(
            f"--extensions {folder} has an arm the study lacks ({'-'.join(str(x) for x in sorted(extra)[0])}): it is "
            "not an extension of this study; report it on its own"
        )
    root = runs_root or manifest["runs_root"]
    costs, from_markers = costs_and_source(manifest, root, folder)
    if not costs:
        raise ReportError(
            f"--extensions {folder}: no stage costs (neither its runs' markers under {root} nor {folder}/"
            "stage_costs.csv); pass --runs-root, or copy stage_costs.csv from where the report was built"
        )
    return {
        "folder": folder,
        "study": manifest["study"],
        "seeds": manifest.get("seeds", []),
        "costs": costs,
        "elsewhere": stages_elsewhere(manifest, root, folder),
        "from_markers": from_markers,
        "policies": manifest["policies"],
    }


def in_report_order(policies: set) -> list:
    """The arms in the protocol's order (ORDER), then any other policy by name."""
    return [p for p in ORDER if p in policies] + sorted(policies - set(ORDER))


def main(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    if args.reps < 1 or not 0 < args.confidence < 1 or not 0 < args.alpha < 0.5:
        raise ReportError(
            f"--reps must be >= 1, --confidence in (0, 1) and --alpha in (0, 0.5) (got {args.reps}, "
            f"{args.confidence} and {args.alpha})"
        )
    out_dir = args.out_dir or args.results_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f"--out-dir {out_dir} is a file; name a folder")
    manifest, source, rows, curves = load(args)
    extensions = [load_extension(folder, args.runs_root, manifest, args.results_dir) for folder in args.extensions]
    study_rows, study_curves = rows, curves  # every seed: the per-seed tables written beside study.json
    if args.seeds:
        keep = set(args.seeds)
        rows = [r for r in rows if r["seed"] in keep]
        curves = defaultdict(dict, {k: {s: c for s, c in by.items() if s in keep} for k, by in curves.items()})
        if not rows:
            raise ReportError(f"none of --seeds {seed_ranges(args.seeds)} is in this study")
    envs = [e for e in manifest["env_ids"] if any(r["env_id"] == e for r in rows)]
    table = score_table(rows, envs)
    policies = in_report_order({k[0] for k in table})
    groups = envs + (["all envs"] if len(envs) > 1 else [])
    R, C = args.reps, args.confidence
    values = endpoint_values(rows, curves)
    for (env, pol, endpoint), by_seed in values.items():  # robustness joins the descriptive tables
        if endpoint == "robustness" and by_seed:
            table.setdefault((pol, "robustness"), {})[env] = np.array([[by_seed[s]] for s in sorted(by_seed)])
    est = {}  # (group, policy, condition) -> ((iqm, mean), lo, hi, n)
    for (pol, cond), arrs in table.items():
        for g, (p, lo, hi) in interval(dict(arrs), iqm_and_mean, R, C).items():
            est[(g, pol, cond)] = (p, lo, hi, arrs[g].shape[0])
    listed = [manifest["policies"]] + [x["policies"] for x in extensions]  # a second look waits for them all
    n_done, n_total = evaluated(listed, study_rows)
    no_curve = missing_curves(study_rows, study_curves)
    status = (
        "complete: every policy of the study is evaluated"
        if n_done >= n_total
        else f"PARTIAL: {n_done} of {n_total} policies evaluated; the study is still running or failed; do not cite"
    )
    if no_curve:  # claim 2 reads the learning curves: a study without one of them is not complete
        status = (
            f"PARTIAL: {len(no_curve)} fine-tune(s) evaluated without their learning curve (first: {no_curve[0]}); "
            "restore its curves file (chains/*__curves.csv) or its metrics.jsonl; do not cite"
        )
    first_look = None
    if args.first_look_seeds:
        if not any(set(args.first_look_seeds) & set(by_seed) for by_seed in values.values()):
            raise ReportError(f"none of --first-look-seeds {seed_ranges(args.first_look_seeds)} is in this study")
        first_look = judge(on_seeds(values, args.first_look_seeds), envs, C, args.alpha)
    judged = judge(values, envs, C, args.alpha, first_look)
    same_folder = os.path.abspath(out_dir) == os.path.abspath(args.results_dir)
    csv_folder = "per-seed CSVs in this folder" if same_folder else f"per-seed CSVs in `{args.results_dir}`"
    if source != "runs" and csv_inputs(args.results_dir)[0][0].endswith("__evaluations.csv"):  # the chains' own files
        where = "" if same_folder else f" of `{args.results_dir}`"
        csv_folder = f"finished chains' per-seed CSVs{where} (`chains/*__evaluations.csv`, `chains/*__curves.csv`)"
    out = [
        f"# Study `{manifest['study']}` ({manifest['scale']} scale, ε = {manifest['epsilon']})",
        "",
        f"Status: {status}.",
        "",
        *(
            [
                f"The study's driver last ran at commit `{manifest['commit']}` on {manifest['machine']}; each chain's "
                "own "
                f'commit and machine are in "The chains" below.',
                "",
            ]
            if "commit" in manifest
            else []
        ),
        f"Read from the {'runs' if source == 'runs' else csv_folder}. Scores are normalized "
        f"(0 = uniform random policy, 100 = expert reference). Reproduce with `python study_report.py --results-dir "
        f"{args.results_dir}{' --source csv' if args.source == 'csv' else ''}"
        f"{f' --alpha {args.alpha:g}' if args.alpha != ALPHA else ''}"
        f"{' --seeds ' + ' '.join(map(str, args.seeds)) if args.seeds else ''}"
        f"{' --first-look-seeds ' + ' '.join(map(str, args.first_look_seeds)) if args.first_look_seeds else ''}"
        f"{' --extensions ' + ' '.join(args.extensions) if args.extensions else ''}"
        f"{f' --out-dir {args.out_dir}' if args.out_dir else ''}`.",
        "",
    ]
    out += claims_section(judged, C, args.alpha, args.first_look_seeds)
    section, paired_rows = paired_section(values, envs, C, args.alpha)
    out += section
    section, csv_rows = matrix_section(groups, policies, est, R, C, attack_budgets(rows, manifest))
    out += section
    if is_averaged(values):
        section, kept_rows = matrix_section(groups, policies, est, R, C, "", KEPT_CONDITIONS)
        out, csv_rows = out + section, csv_rows + kept_rows
    out += [
        "## Probability of improvement P(X > Y) [CI] (rliable, descriptive)",
        "",
        "| X | Y | group | " + " | ".join(EVAL_CONDITIONS) + " |",
        "|---|---|---|" + "---|" * len(EVAL_CONDITIONS),
    ]
    poi_rows = []
    for x, y in [
        (ADV_FIXED, OFFLINE),
        (ADAPTIVE, OFFLINE),
        (ADV_FIXED, NORMAL_FT),
        (ADV_FIXED, RANDOM_FT),
        (ADAPTIVE, LINEAR),
        (ADAPTIVE, SCRATCH),
    ]:
        for g in groups:
            vals = {c: poi(table, x, y, c, g, R, C) for c in EVAL_CONDITIONS}
            if all(v is None for v in vals.values()):
                continue
            out.append(
                f"| {x} | {y} | {g} | "
                + " | ".join("–" if v is None else fmt(*v, digits=2) for v in vals.values())
                + " |"
            )
            poi_rows += [
                {"x": x, "y": y, "group": g, "eval_condition": c, "poi": v[0], "lo": v[1], "hi": v[2]}
                for c, v in vals.items()
                if v is not None
            ]
    out += [
        "",
        f"{poi_reps(R)} stratified-bootstrap replications. Descriptive only: the verdicts above rest on the paired "
        f"tests.",
        "",
    ]
    out += curricula_section(envs, est, curves, C)
    out += efficiency_section(curves, policies, R, C)
    costs = stage_costs(manifest, args.runs_root or manifest["runs_root"], args.results_dir)
    study_elsewhere = stages_elsewhere(manifest, args.runs_root or manifest["runs_root"], args.results_dir)
    elsewhere = [e for e in study_elsewhere if not args.seeds or e["seed"] in args.seeds]
    out += costs_section(costs, elsewhere, extensions, unlisted_chains(args.results_dir, listed, args.seeds))
    out += chains_section(args.results_dir, elsewhere + [e for x in extensions for e in x["elsewhere"]], args.seeds)

    os.makedirs(out_dir, exist_ok=True)
    plot_curves(out_dir, envs, curves, policies, est, R, C)
    plot_heatmap(os.path.join(out_dir, "heatmap.png"), groups[-1], policies, est, C)

    def write(name: str, text: str, folder: str = out_dir):  # atomic: a temporary file, fsync, rename
        write_text(os.path.join(folder, name), text)

    write("scores.csv", to_csv(csv_rows))
    write("paired.csv", to_csv(paired_rows) if paired_rows else "")
    if source == "runs":  # the report's inputs, per seed, so the report can be rebuilt without the runs
        order = in_report_order({r["policy"] for r in study_rows} | {k[1] for k in study_curves})
        evaluations, curve_table = per_seed_tables(study_rows, study_curves, order.index)
        write("evaluations.csv", evaluations, args.results_dir)
        write("curves.csv", curve_table, args.results_dir)
        if costs:
            write("stage_costs.csv", to_csv(costs), args.results_dir)
        if study_elsewhere:
            write("stages_elsewhere.csv", to_csv(study_elsewhere), args.results_dir)
    for x in (x for x in extensions if x["from_markers"]):  # so the report can be rebuilt without the runs
        write("stage_costs.csv", to_csv(x["costs"]), x["folder"])
        if x["elsewhere"]:
            write("stages_elsewhere.csv", to_csv(x["elsewhere"]), x["folder"])
    if poi_rows:
        write("poi.csv", to_csv(poi_rows))
    write("report.md", "\n".join(out) + "\n")
    print(f"Study {manifest['study']}: {status}.")
    for e in judged:
        print(f"  claim {e['claim'].number} ({e['env']}): {e['status']}")
    print(f"wrote {out_dir}/report.md, paired.csv, scores.csv, poi.csv and plots")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ReportError as e:
        sys.exit(f"error: {e}")
    except UserError as e:  # an atomic write that failed (robust_o2o.files): it names the file
        sys.exit(f"error: {e}; the report is not complete: pass a writable --out-dir")
    except OSError as e:  # a read-only or full --out-dir: one line naming the file (each file is written atomically)
        sys.exit(
            f"error: could not write {e.filename or 'the report'} ({e.strerror or type(e).__name__}); the report is "
            "not complete there: free disk space or pass a writable --out-dir"
        )
    except KeyboardInterrupt:
        sys.exit("error: interrupted; the report is not complete: run it again")
