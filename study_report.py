# Aggregate a study's runs over seeds with rliable: IQM and mean with stratified-bootstrap CIs, probability of
# improvement, learning curves and q trajectories with CI bands, and a verdict on each of the paper's claims.
"""Reads only the runs' own files (each policy's matrix.csv from evaluate_matrix.py and each fine-tune's
metrics.jsonl), listed in {results_dir}/study.json, which `study.py` writes; trains nothing. Scores are normalized
(0 = uniform random policy, 100 = expert reference). Every bootstrap uses a fixed random state, so running the report
twice on the same files gives identical tables.

    python study_report.py --results-dir results/study-hopper
"""
import csv
import json
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

from runtime import save_curve_panels, save_q_plot, write_text

EVAL_CONDITIONS = ("normal", "random", "adversarial", "transfer")
CURVE_CONDITIONS = ("normal", "random", "adversarial")  # evaluated during fine-tuning (adversarial: the precomputed set)
OFFLINE = "offline-only"
ADV = "fine-tuned adversarial (adaptive)"
NORMAL_FT = "fine-tuned normal"
RANDOM_FT = "fine-tuned random (adaptive)"
LINEAR, FIXED = "fine-tuned adversarial (linear)", "fine-tuned adversarial (fixed)"
SCRATCH = "scratch adversarial (adaptive)"
ORDER = (OFFLINE, NORMAL_FT, RANDOM_FT, ADV, FIXED, LINEAR, SCRATCH)


@dataclass
class Args:
    results_dir: str = "results/study-medium"
    """the study's results folder: holds study.json (written by study.py); the report goes beside it"""
    runs_root: Optional[str] = None
    """folder the runs' paths in study.json are relative to (if unset: the one study.py ran in)"""
    reps: int = 10_000
    """bootstrap replications for the tables (curves use a fifth of them)"""
    confidence: float = 0.95
    """coverage of the confidence intervals"""


class ReportError(Exception):
    """A problem with the study's files; printed as one line."""


def interval(scores: dict, func, reps: int, confidence: float) -> dict:
    """rliable's stratified bootstrap: name -> (point estimates, lower bounds, upper bounds), reproducibly."""
    from rliable import library as rly
    saved = np.random.get_state()
    np.random.seed(0)  # rliable's stratified resampling draws from NumPy's global generator, not from random_state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arch's note on RandomState
            point, ci = rly.get_interval_estimates(scores, func, reps=reps, confidence_interval_size=confidence,
                                                   random_state=np.random.RandomState(0))
    finally:
        np.random.set_state(saved)
    return {k: (np.atleast_1d(point[k]), np.atleast_1d(ci[k][0]), np.atleast_1d(ci[k][1])) for k in scores}


def iqm_and_mean(x: np.ndarray) -> np.ndarray:
    from rliable import metrics
    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])


def load(results_dir: str, runs_root: Optional[str]):
    path = os.path.join(results_dir, "study.json")
    if not os.path.isfile(path):
        raise ReportError(f"{path} not found; run `python study.py --results-dir {results_dir}` first")
    with open(path) as f:
        manifest = json.load(f)
    root = runs_root or manifest["runs_root"]
    rows, curves, missing = [], defaultdict(dict), []
    for p in manifest["policies"]:
        mpath = os.path.join(root, p["matrix"])
        if not os.path.isfile(mpath):
            missing.append(p)
            continue
        with open(mpath) as f:
            rows += [dict(r, seed=int(r["seed"]), normalized_mean=float(r["normalized_mean"]), mean_return=float(r["mean_return"]))
                     for r in csv.DictReader(f)]
        if p["stage"] == "finetune":
            with open(os.path.join(root, p["run_dir"], "metrics.jsonl")) as f:
                evals = [r for r in map(json.loads, f) if "eval/normal_return" in r]
            label = next(r["policy"] for r in rows if r["checkpoint"].startswith(os.path.normpath(p["run_dir"])))
            curves[(p["env_id"], label)][p["seed"]] = evals
    if not rows:
        raise ReportError(f"no evaluated policy yet among the {len(manifest['policies'])} in {path}; let the study finish")
    return manifest, rows, curves, missing


def score_table(rows: list, envs: list):
    """(policy, condition) -> {env or 'all': array [seeds, tasks]} of normalized scores, on the seeds every env has."""
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


def verdict(lo: float, hi: float) -> str:
    return "supported" if lo > 0.5 else "not supported" if hi < 0.5 else "inconclusive"


def curve_array(runs: dict, key: str):
    """Seeds' eval rows -> (steps present in every seed, array [seeds, steps])."""
    steps = sorted(set.intersection(*[{r["step"] for r in run} for run in runs.values()]))
    return np.array(steps), np.array([[next(r[key] for r in run if r["step"] == s) for s in steps] for run in runs.values()])


def steps_to_reach(run: list, threshold: float) -> Optional[int]:
    return next((r["step"] for r in run if r["eval/normal_return"] >= threshold), None)


def stage_costs(manifest: dict, root: str) -> list:
    """Wall time of each finished stage kind, from the study's markers (runs/_study/{namespace}/*.json), if present."""
    import glob
    by = defaultdict(list)
    for path in glob.glob(os.path.join(root, "runs", "_study", manifest.get("namespace", ""), "*.json")):
        with open(path) as f:
            by[os.path.basename(path).split("__")[0]].append(json.load(f)["wall_s"])
    return [(k, len(by[k]), float(np.mean(by[k])), float(np.min(by[k])), float(np.max(by[k])), float(np.sum(by[k])))
            for k in ("dataset", "pretrain", "attack", "finetune", "evaluate") if by[k]]


def poi_pair(table: dict, x: str, y: str, cond: str, g: str, reps: int, confidence: float):
    """P(X > Y) [CI] of two policies' scores under `cond` in group g, or None if either is missing or unpaired."""
    from rliable import metrics
    kx, ky = table.get((x, cond), {}), table.get((y, cond), {})
    if g not in kx or g not in ky or kx[g].shape != ky[g].shape:
        return None
    (p, lo, hi) = interval({"pair": (kx[g], ky[g])}, metrics.probability_of_improvement, reps // 5, confidence)["pair"]
    return float(p[0]), float(lo[0]), float(hi[0])


def claims_section(table: dict, poi: dict, auc: dict, envs: list, reps: int, confidence: float) -> list:
    """The paper's four claims, each with a verdict from the CIs of a probability of improvement (markdown lines)."""
    from rliable import metrics
    g0 = "all envs" if len(envs) > 1 else envs[0]
    claims = ["## The paper's claims, checked", "",
              "Verdicts: *supported* when the 95% CI of the probability of improvement lies above 0.5, *not supported* "
              "when it lies below, *inconclusive* otherwise.", ""]

    def claim(n, text, key):
        v = poi.get(key)
        if v is None:
            return claims.append(f"{n}. {text}: not measured (a policy is missing).")
        claims.append(f"{n}. {text}: P = {fmt(*v, digits=2)} ({g0}, {key[2]} evaluation): **{verdict(v[1], v[2])}**.")

    claim(1, "Adversarial fine-tuning is more robust than offline-only under adversarial perturbations",
          (ADV, OFFLINE, "adversarial", g0))
    if (envs[0], ADV) in auc and (envs[0], SCRATCH) in auc and auc[(envs[0], ADV)].shape == auc[(envs[0], SCRATCH)].shape:
        p = interval({"pair": (auc[(envs[0], ADV)], auc[(envs[0], SCRATCH)])}, metrics.probability_of_improvement, reps // 5,
                     confidence)["pair"]
        claims.append(f"2. Fine-tuning converges faster than training from scratch (normal return averaged over the "
                      f"evaluations, {envs[0]}): P = {fmt(p[0][0], p[1][0], p[2][0], 2)}: **{verdict(p[1][0], p[2][0])}**.")
    else:
        claims.append("2. Fine-tuning converges faster than training from scratch: not measured (a policy is missing).")
    own = {"normal": NORMAL_FT, "random": RANDOM_FT, "adversarial": ADV}
    parts, wins, losses = [], 0, 0
    for c, mine in own.items():
        others = [p for p in own.values() if p != mine]
        vs = [(o, poi_pair(table, mine, o, c, g0, reps, confidence)) for o in others]
        if any(v is None for _, v in vs):
            parts = None
            break
        for o, v in vs:
            parts.append(f"{c} column, {mine} vs {o}: P = {fmt(*v, digits=2)}")
            wins, losses = wins + (v[1] > 0.5), losses + (v[2] < 0.5)
    if parts is None:
        claims.append("3. Matching the fine-tuning and evaluation conditions gives the strongest robustness: not measured.")
    else:
        v3 = "supported" if wins == 6 else "not supported" if losses else "inconclusive"
        claims.append(f"3. Matching the fine-tuning and evaluation conditions gives the strongest robustness ({g0}; "
                      f"each column should be won by its own condition): **{v3}** ({wins} of 6 comparisons won "
                      f"with confidence, {losses} lost). " + "; ".join(parts) + ".")
    vn, va = poi.get((ADV, LINEAR, "normal", g0)), poi.get((ADV, LINEAR, "adversarial", g0))
    if vn is None or va is None:
        claims.append("4. The adaptive curriculum keeps nominal return better than the linear one at similar robustness: not measured.")
    else:
        v4 = "supported" if vn[1] > 0.5 and va[1] <= 0.5 <= va[2] else "not supported" if vn[2] < 0.5 else "inconclusive"
        claims.append(f"4. The adaptive curriculum keeps nominal return better than the linear one at similar robustness "
                      f"({g0}): P(adaptive > linear) = {fmt(*vn, digits=2)} under normal evaluation and "
                      f"{fmt(*va, digits=2)} under adversarial: **{v4}**.")
    return claims


def band(ax, steps, arr, label, reps: int, confidence: float, ls="-"):
    """IQM over seeds at each step, with its bootstrap CI as a shaded band."""
    res = interval({str(i): arr[:, i:i + 1] for i in range(arr.shape[1])}, iqm_and_mean, max(200, reps // 5), confidence)
    m = np.array([res[str(i)][0][0] for i in range(arr.shape[1])])
    lo, hi = (np.array([res[str(i)][j][0] for i in range(arr.shape[1])]) for j in (1, 2))
    ax.plot(steps, m, ls=ls, marker=".", label=f"{label} (n={arr.shape[0]})")
    ax.fill_between(steps, lo, hi, alpha=0.15)


def plot_curves(results_dir: str, envs: list, curves: dict, policies: list, est: dict, reps: int, confidence: float):
    """Per env: curves{suffix}.png (normalized returns under each condition) and q_trajectory{suffix}.png, IQM with CIs."""
    import matplotlib.pyplot as plt
    C = confidence
    for g in envs:
        suffix = "" if len(envs) == 1 else f"_{g}"
        keys = [k for k in curves if k[0] == g]
        if not keys:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100, sharey=True)
        for ax, cond in zip(axes, CURVE_CONDITIONS):
            for k in sorted(keys, key=lambda k: policies.index(k[1])):
                steps, arr = curve_array(curves[k], f"eval/{cond}_normalized")
                band(ax, steps, arr, k[1], reps, C, "--" if k[1] == SCRATCH else "-")
            if (g, OFFLINE, cond if cond != "adversarial" else "transfer") in est:
                ax.axhline(est[(g, OFFLINE, cond if cond != "adversarial" else "transfer")][0][0], color="k", ls=":", label="offline-only (IQM)")
        save_curve_panels(fig, axes, CURVE_CONDITIONS, "normalized return", f"{g}: learning curves, IQM over seeds with "
                          f"{int(C * 100)}% bootstrap CIs", os.path.join(results_dir, f"curves{suffix}.png"))
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for k in sorted(keys, key=lambda k: policies.index(k[1])):
            if k[1] != NORMAL_FT:
                steps, arr = curve_array(curves[k], "curriculum/q")
                band(ax, steps, arr, k[1], reps, C)
        save_q_plot(fig, ax, f"{g}: q at each evaluation, IQM with {int(C * 100)}% CIs",
                    os.path.join(results_dir, f"q_trajectory{suffix}.png"))


def plot_heatmap(path: str, g: str, policies: list, est: dict, confidence: float):
    """Training condition × evaluation condition in group g: IQM with its CI in each cell."""
    import matplotlib.pyplot as plt
    labels = [p for p in policies if (g, p, "normal") in est]
    vals = np.array([[est[(g, p, c)][0][0] for c in EVAL_CONDITIONS] for p in labels])
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(labels)), dpi=100)
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    for i, p in enumerate(labels):
        for j, c in enumerate(EVAL_CONDITIONS):
            _, lo, hi, _ = est[(g, p, c)]
            ax.text(j, i, f"{vals[i, j]:.1f}\n[{lo[0]:.1f}, {hi[0]:.1f}]", ha="center", va="center", fontsize=8,
                    color="w" if vals[i, j] < vals.mean() else "k")
    ax.set_xticks(range(len(EVAL_CONDITIONS)), EVAL_CONDITIONS)
    ax.set_yticks(range(len(labels)), labels)
    fig.colorbar(im, ax=ax, label="normalized score, IQM over seeds")
    ax.set_title(f"{g}: training condition × evaluation condition, IQM [{int(confidence * 100)}% CI]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def to_csv(rows: list) -> str:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    return buf.getvalue()


def main(args: Args):
    import matplotlib
    matplotlib.use("Agg")

    manifest, rows, curves, missing = load(args.results_dir, args.runs_root)
    envs = [e for e in manifest["env_ids"] if any(r["env_id"] == e for r in rows)]
    table = score_table(rows, envs)
    policies = [p for p in ORDER if any(k[0] == p for k in table)] + sorted({k[0] for k in table} - set(ORDER))
    groups = envs + (["all envs"] if len(envs) > 1 else [])
    R, C = args.reps, args.confidence
    est = {}  # (group, policy, condition) -> ((iqm, mean), lo, hi, n)
    for (pol, cond), arrs in table.items():
        res = interval({g: a for g, a in arrs.items()}, iqm_and_mean, R, C)
        for g, (p, lo, hi) in res.items():
            est[(g, pol, cond)] = (p, lo, hi, arrs[g].shape[0])
    n_total, n_done = len(manifest["policies"]), len(manifest["policies"]) - len(missing)
    status = ("complete: every policy of the study is evaluated" if not missing else
              f"PARTIAL: {n_done} of {n_total} policies evaluated; the study is still running or failed; do not cite")
    out = [f"# Study `{manifest['study']}` ({manifest['scale']} scale, ε = {manifest['epsilon']})", "",
           f"Status: {status}.", "",
           f"Scores are normalized (0 = uniform random policy, 100 = expert reference) and aggregated over seeds with "
           f"rliable: interquartile mean (IQM) and mean, with {int(C * 100)}% stratified-bootstrap confidence intervals "
           f"({R} replications). Reproduce with `python study_report.py --results-dir {args.results_dir}`.", ""]

    # T1: the matrix
    csv_rows = []
    for g in groups:
        out += [f"## T1: policy × evaluation condition, {g} (IQM [95% CI])", "",
                "| policy | seeds | " + " | ".join(EVAL_CONDITIONS) + " |", "|---|---|" + "---|" * len(EVAL_CONDITIONS)]
        for pol in policies:
            if (g, pol, "normal") not in est:
                continue
            cells = []
            for c in EVAL_CONDITIONS:
                (iqm, mean), lo, hi, n = est[(g, pol, c)]
                cells.append(fmt(iqm, lo[0], hi[0]))
                csv_rows.append({"group": g, "policy": pol, "eval_condition": c, "seeds": n, "iqm": iqm, "iqm_lo": lo[0],
                                 "iqm_hi": hi[0], "mean": mean, "mean_lo": lo[1], "mean_hi": hi[1]})
            out.append(f"| {pol} | {est[(g, pol, 'normal')][3]} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Columns: normal (no δ); random (the study's random δ draws); adversarial (a fresh DE attack on each "
            "policy); transfer (the δ set precomputed against the offline policy, which fine-tuning trained on). "
            "Mean and CIs of every cell: `scores.csv`.", ""]

    # Probability of improvement, under the adversarial condition (and the others, for completeness)
    poi_rows = []
    out += ["## Probability of improvement P(X > Y) [95% CI]", "",
            "| X | Y | group | " + " | ".join(EVAL_CONDITIONS) + " |", "|---|---|---|" + "---|" * len(EVAL_CONDITIONS)]
    pairs = [(ADV, OFFLINE), (ADV, NORMAL_FT), (ADV, RANDOM_FT), (ADV, LINEAR), (ADV, FIXED), (ADV, SCRATCH)]
    poi = {}
    for x, y in pairs:
        for g in groups:
            vals = {c: poi_pair(table, x, y, c, g, R, C) for c in EVAL_CONDITIONS}
            if all(v is None for v in vals.values()):
                continue
            poi.update({(x, y, c, g): v for c, v in vals.items()})
            out.append(f"| {x} | {y} | {g} | " + " | ".join("–" if v is None else fmt(*v, digits=2) for v in vals.values()) + " |")
            poi_rows += [{"x": x, "y": y, "group": g, "eval_condition": c, "poi": v[0], "lo": v[1], "hi": v[2]}
                         for c, v in vals.items() if v is not None]
    out.append("")

    # T2: the curricula, and T3: sample efficiency, from the fine-tunes' own evaluations
    out += ["## T2: curricula under adversarial fine-tuning (IQM [95% CI])", "",
            "| env | curriculum | seeds | normal | adversarial (fresh attack) | transfer | final q (mean over seeds) |",
            "|---|---|---|---|---|---|---|"]
    for g in envs:
        for pol in (FIXED, LINEAR, ADV):
            if (g, pol, "normal") not in est:
                continue
            q = [run[-1]["curriculum/q"] for run in curves.get((g, pol), {}).values()]
            cells = [fmt(est[(g, pol, c)][0][0], est[(g, pol, c)][1][0], est[(g, pol, c)][2][0]) for c in ("normal", "adversarial", "transfer")]
            out.append(f"| {g} | {pol.split('(')[1][:-1]} | {est[(g, pol, 'normal')][3]} | " + " | ".join(cells)
                       + (f" | {np.mean(q):.2f} |" if q else " | – |"))
    out += ["", "The q trajectories: `q_trajectory.png`.", "",
            "## T3: sample efficiency (online steps until the normal return reaches the same seed's offline-only policy)", "",
            "| env | policy | seeds reaching it | median steps (reached) | normalized normal return at the last step, IQM [95% CI] | mean over evaluations (area under the curve), IQM [95% CI] |",
            "|---|---|---|---|---|---|"]
    offline_normal = {(r["env_id"], r["seed"]): r["mean_return"] for r in rows if r["policy"] == OFFLINE and r["eval_condition"] == "normal"}
    auc = {}
    for (g, pol), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], policies.index(kv[0][1]) if kv[0][1] in policies else 99)):
        reach = [steps_to_reach(run, offline_normal[(g, s)]) for s, run in sorted(runs.items()) if (g, s) in offline_normal]
        hit = [x for x in reach if x is not None]
        steps, arr = curve_array(runs, "eval/normal_normalized")  # already 0–100, the one scale
        auc[(g, pol)] = arr.mean(1, keepdims=True)
        last = interval({"x": arr[:, -1:]}, iqm_and_mean, R, C)["x"]
        area = interval({"x": auc[(g, pol)]}, iqm_and_mean, R, C)["x"]
        out.append(f"| {g} | {pol} | {len(hit)} of {len(reach)} | {int(np.median(hit)) if hit else '–'} | "
                   f"{fmt(last[0][0], last[1][0], last[2][0])} | {fmt(area[0][0], area[1][0], area[2][0])} |")
    out += ["", "Offline-initialized runs start at the offline policy (step 0 is its evaluation), so they reach it at "
            "step 0 unless fine-tuning first lowers the return; `curves.png` shows every curve.", ""]

    claims = claims_section(table, poi, auc, envs, R, C)
    costs = stage_costs(manifest, args.runs_root or manifest["runs_root"])
    if costs:
        out += ["## What the stages cost", "",
                "Wall time of each finished stage, from the study's markers (`runs/_study/`); each stage ran on one core "
                "with one torch thread, beside one other stage on the same machine.", "",
                "| stage | runs | mean | min | max | total |", "|---|---|---|---|---|---|"]
        out += [f"| {k} | {n} | {m / 60:.1f} min | {lo / 60:.1f} min | {hi / 60:.1f} min | {tot / 3600:.2f} h |"
                for k, n, m, lo, hi, tot in costs]
        out += ["", f"All stages together: {sum(c[5] for c in costs) / 3600:.2f} core-hours.", ""]
    out = out[:6] + claims + [""] + out[6:]

    # Plots: learning curves and q with CI bands, heatmap with CIs
    plot_curves(args.results_dir, envs, curves, policies, est, R, C)
    plot_heatmap(os.path.join(args.results_dir, "heatmap.png"), groups[-1], policies, est, C)

    def write(name: str, text: str):  # atomic: a temporary file, fsync, rename
        write_text(os.path.join(args.results_dir, name), text)

    write("scores.csv", to_csv(csv_rows))
    # the report's inputs, per seed, so a reader can check every aggregate without the runs
    write("evaluations.csv", to_csv(sorted(({k: r[k] for k in ("env_id", "policy", "seed", "eval_condition", "mean_return",
                                                               "normalized_mean")} for r in rows),
                                           key=lambda r: (r["env_id"], policies.index(r["policy"]), r["seed"],
                                                          EVAL_CONDITIONS.index(r["eval_condition"])))))
    keys = ("eval/normal_return", "eval/random_return", "eval/adversarial_return", "curriculum/q")
    write("curves.csv", to_csv([{"env_id": g, "policy": pol, "seed": seed, "step": r["step"],
                                 **{k.split("/")[1]: float(r[k]) for k in keys}}
                                for (g, pol), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], policies.index(kv[0][1])))
                                for seed, run in sorted(runs.items()) for r in run]))
    if poi_rows:
        write("poi.csv", to_csv(poi_rows))
    write("report.md", "\n".join(out) + "\n")
    print("\n".join(out[:6 + len(claims)]))
    print(f"wrote {args.results_dir}/report.md, scores.csv, poi.csv, evaluations.csv, curves.csv and plots ({status})")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ReportError as e:
        sys.exit(f"error: {e}")
