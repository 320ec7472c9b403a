"""Learning-curve statistics: the curricula's q in force and exposure, sample efficiency (steps to reach a level, the
area under the curve) and rliable's probability of improvement."""

import numpy as np

from paired_stats import paired_t_ci
from study_tools.claims import NORMAL_FT, ORDER
from study_tools.tables import fmt, interval, iqm_and_mean


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
