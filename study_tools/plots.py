"""The report's figures: learning curves and q trajectories with CI bands, and the policy × condition heatmap."""

import os

import numpy as np

from robust_o2o.plots import save_curve_panels, save_q_plot
from study_tools.claims import CURVE_CONDITIONS, EVAL_CONDITIONS, NORMAL_FT, OFFLINE
from study_tools.curves import curve_array, exposure, poi_reps
from study_tools.tables import interval, iqm_and_mean


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
