# Stage 4 of robust offline-to-online RL by adversarial fine-tuning (Ayabe, Kera & Kawamoto, arXiv 2510.13358):
# every policy under normal, random, adversarial (a fresh DE attack on it) and transfer conditions -> tables, plots.
"""The evaluation matrix.

Conditions, each on the same `--eval-episodes` seeded episodes (seeds eval_seed + i; the default 50,000 keeps them
apart from the episodes fine-tuning evaluates on, which the adaptive curriculum reads, and from DE's objective
episodes):
- normal:      δ = 0.
- random:      the fixed random draws stored in the reference perturbations file (episode i uses draw i mod R).
- adversarial: a fresh DE attack against this very policy with every setting the precomputed attack recorded (K,
               popsize, generations, episodes, episode length, seed, polish, ...) unless a flag overrides it (run as
               `de_perturbations.py`, so its semantics are the adversary's own); episode i uses δ_{i mod K}. matrix.csv
               records the budget used (`attack_budget`).
- transfer:    the precomputed set the policy was fine-tuned against: robustness to the attack it trained on. For an
               offline-only policy it is the set found against that very policy (the perturbations.npz next to it), so
               that cell is a direct attack at the precomputed budget, not a transfer (matrix.md marks it).
Outputs in --output-dir: matrix.csv, matrix.md, heatmap.png, curves.png, q_trajectory.png, attacks/*.npz.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from robust_o2o.cli import Range, UserError, check_ranges, cli, die_with_parent
from robust_o2o.evaluation import ConditionEvaluator, normalized_score
from robust_o2o.files import check_recorded_set, sha256_file, write_text
from robust_o2o.formats import check_fit, find_checkpoints, load_checkpoint, load_perturbations
from robust_o2o.perturbation import Perturbation, chosen
from robust_o2o.plots import save_curve_panels, save_figure, save_q_plot
from robust_o2o.video import captioned, check_rendering, record_episode, side_by_side, write_video

EVAL_CONDITIONS = ("normal", "random", "adversarial", "transfer")
KEPT = "@kept"  # the suffix of the rows that pool a fine-tune's kept policies (--kept-episodes)
ALL_CONDITIONS = EVAL_CONDITIONS + tuple(c + KEPT for c in EVAL_CONDITIONS)
# what a fresh attack repeats from the precomputed file besides ε, the model and the δ set
REFERENCE_KEYS = ("perturbation_returns", "maxiter", "popsize", "de_episodes", "mutation", "recombination", "strategy")
REFERENCE_KEYS += ("tol", "de_seed", "polish", "max_episode_steps")
# the final evaluation's first episode seed: disjoint from fine-tuning's (10,000 + i) and DE's (20,000 + ...)
EVAL_SEED = 50_000


@dataclass
class Args:
    # what to evaluate
    checkpoints: tuple[str, ...] = ("runs",)
    """checkpoint files, globs, or folders searched recursively for checkpoint.pt"""
    env_id: str | None = None
    """keep only checkpoints of this env (required when the set mixes envs)"""
    eval_episodes: Annotated[int, Range(1)] = 30
    """episodes per policy and condition (seeds eval_seed + i)"""
    eval_seed: Annotated[int, Range(0)] = EVAL_SEED
    """first evaluation seed (default: apart from the episodes fine-tuning evaluates on, 10,000 + i, and DE's)"""
    perturbation_from: str | None = None
    """a fork's script whose PERTURBATION to apply instead of this script's (docs/forking.md): the checkpoints and δ
    sets must record it, and the fresh attacks apply it too"""

    # the fresh attack on each policy
    attack_num_perturbations: Annotated[int | None, Range(1)] = None
    """K of each fresh attack (if unset: the reference perturbations file's)"""
    attack_maxiter: Annotated[int | None, Range(1)] = None
    """DE generations of each fresh attack (if unset: the reference file's)"""
    attack_popsize: Annotated[int | None, Range(4)] = None
    """DE popsize of each fresh attack (if unset: the reference file's)"""
    num_workers: Annotated[int, Range(0)] = 0
    """processes for the fresh attacks (0: one per core)"""
    fresh_attack: bool = True
    """attack each policy afresh; --no-fresh-attack leaves the adversarial cells out (a policy whose endpoints read no
    attack, as a study's scratch arm: docs/protocol-part2.md). The set found against this very checkpoint with the
    same settings (an offline-only policy's precomputed set) is the fresh attack, and is reused without a rerun"""

    # endpoints averaged over the end of training (td3_adv_finetune.py --keep-checkpoints)
    kept_episodes: Annotated[int, Range(0)] = 0
    """if > 0: evaluate each kept policy of a fine-tune (checkpoint_step{N}.pt) on this many episodes per condition
    (the same seeds), under every condition with the final policy's δ sets; rows `{condition}@kept` pool them"""

    # videos
    capture_video: bool = False
    """record one episode per policy and condition (normal; random: the first stored draw; adversarial: the fresh-attack
    δ that hurts that policy most) into {output-dir}/videos/, and every policy side by side under one δ (MP4 and GIF)"""
    video_size: Annotated[int, Range(16)] = 160
    """frame size of the videos in pixels (off-screen rendering on a CPU costs about 0.1-0.3 s a frame)"""
    video_frame_skip: Annotated[int, Range(1)] = 4
    """env steps between video frames"""

    # outputs and logging
    output_dir: str = "results"
    """where the table, CSV, plots and fresh attacks go"""
    track: bool = False
    """log the table and images to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "robust-o2o"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""


# ALGO LOGIC: the policy and the perturbation model (verbatim copies; tests/test_contracts.py proves they agree)
class Actor(nn.Module):
    """Deterministic policy π(s): 2×hidden ReLU MLP, tanh output rescaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, hidden_dim: int = 256):
        super().__init__()
        hidden = [nn.Linear(obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        self.net = nn.Sequential(*hidden, nn.Linear(hidden_dim, act_dim), nn.Tanh())
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.action_scale + self.action_bias


def perturb_action(action: np.ndarray, delta: np.ndarray, low, high, perturbation_model: str) -> np.ndarray:
    """Executed action ã for the chosen action a under perturbation δ; works row-wise on batches [..., Na]."""
    if perturbation_model == "multiplicative":
        executed = action * (1.0 + delta)
    elif perturbation_model == "additive":
        executed = action + delta * (high - low) / 2.0
    else:
        raise ValueError(f"unknown perturbation model {perturbation_model!r}")
    return np.clip(executed, low, high).astype(action.dtype, copy=False)


# what δ perturbs and how; --perturbation-from takes a fork's instead (robust_o2o/perturbation.py)
PERTURBATION = Perturbation(target="action", models=("multiplicative", "additive"), apply=perturb_action)


def is_finetuned(ckpt: dict) -> bool:
    """Decided by what the checkpoint holds, not by which script wrote it, so a fork under another name counts too."""
    return "finetune_condition" in ckpt


def policy_label(ckpt: dict) -> str:
    """Offline-only, or how it was fine-tuned: from the checkpoint's own record. A fork's stage tag leads its label."""
    fork = "" if ckpt.get("stage") in ("td3_bc_offline", "td3_adv_finetune") else f"{ckpt.get('stage')}: "
    if not is_finetuned(ckpt):
        return f"{fork}offline-only"
    head = "scratch" if ckpt["init"] == "scratch" else "fine-tuned"
    cond = ckpt["finetune_condition"]
    return f"{fork}{head} {cond}" + ("" if cond == "normal" else f" ({ckpt['curriculum']})")


def reference_npz_path(path: str, ckpt: dict) -> str:
    """The precomputed set this policy relates to: the one it was fine-tuned against, else the one beside it."""
    return ckpt.get("perturbations_path") or os.path.join(os.path.dirname(path), "perturbations.npz")


def attack_settings(ref: dict, args: Args) -> dict:
    """de_perturbations.py's flags for a fresh attack (flag -> value): every setting the precomputed attack recorded,
    bar the flags' overrides (K, generations, popsize)."""
    settings = {
        "--epsilon": float(ref["epsilon"]),
        "--perturbation-model": str(ref["perturbation_model"]),
        "--num-perturbations": args.attack_num_perturbations or len(ref["perturbations"]),
        "--maxiter": args.attack_maxiter or int(ref["maxiter"]),
        "--popsize": args.attack_popsize or int(ref["popsize"]),
        "--de-episodes": int(ref["de_episodes"]),
        "--mutation": [float(m) for m in ref["mutation"]],
        "--recombination": float(ref["recombination"]),
        "--strategy": str(ref["strategy"]),
        "--tol": float(ref["tol"]),
        "--de-seed": int(ref["de_seed"]),
        "--polish" if bool(ref["polish"]) else "--no-polish": [],
    }
    if int(ref["max_episode_steps"]) > 0:  # -1: the checkpoint's own limit
        settings["--max-episode-steps"] = int(ref["max_episode_steps"])
    return {**settings, "--eval-episodes": 1, "--random-draws": 1}


def checked_settings(path: str, ref: dict, args: Args) -> dict:
    """attack_settings, refused in one line if a recorded setting is not of its kind (maxiter 'ten', a scalar
    mutation): the fresh attack would repeat it."""
    try:
        return attack_settings(ref, args)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} records a malformed DE setting ({e}); re-create it with de_perturbations.py") from None


def as_argv(settings: dict) -> list:
    return [
        str(x) for flag, value in settings.items() for x in [flag, *(value if isinstance(value, list) else [value])]
    ]


def attack_budget(settings: dict) -> str:
    """The fresh attack's budget in one cell: K runs × generations × population × episodes per candidate."""
    k, maxiter, popsize = settings["--num-perturbations"], settings["--maxiter"], settings["--popsize"]
    return f"K={k} maxiter={maxiter} popsize={popsize} episodes={settings['--de-episodes']}"


def same_attack(ref: dict, path: str, settings: dict) -> bool:
    """The precomputed set was found against this very checkpoint with every setting of `settings`: a fresh attack
    would repeat it (the same policy, DE seed and episodes; protocol part 1 measured it equal in 20 of 20 seeds)."""
    recorded = attack_settings(ref, Args())
    return str(ref.get("checkpoint_sha256", "")) == sha256_file(path) and recorded == settings


def fresh_attack(path: str, settings: dict, args: Args, out_dir: str) -> dict:
    """Run de_perturbations.py against this policy with `settings` (attack_settings). Cached under a key made of
    the checkpoint's hash and the settings, so a different budget never reuses an old attack."""
    fork = (
        [chosen(PERTURBATION, args.perturbation_from).code] if args.perturbation_from else []
    )  # another perturbation, another key
    key = hashlib.sha256(" ".join([sha256_file(path), *as_argv(settings), *fork]).encode()).hexdigest()[:16]
    out = os.path.join(out_dir, "attacks", f"{key}.npz")
    if not os.path.exists(out):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "de_perturbations.py")
        cmd = [sys.executable, script, "--checkpoint", path, "--output", out, *as_argv(settings)]
        cmd += ["--num-workers", str(args.num_workers)]
        cmd += ["--perturbation-from", args.perturbation_from] if args.perturbation_from else []
        if os.path.exists(out + ".state.npz"):  # an attack interrupted with this evaluation continues where it stopped
            cmd.append("--resume")
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)  # dies with the matrix
        if proc.returncode != 0:  # its error line; or the text of tyro's box (a setting it cannot parse)
            lines = [ln.strip("│╭╮╰╯─ ") for ln in proc.stderr.strip().splitlines()] or ["no output"]
            boxed = " ".join(ln for ln in lines if ln and not ln.startswith("For full")) if "╭" in proc.stderr else ""
            why = next((ln for ln in reversed(lines) if ln.startswith("error:")), boxed or lines[-1])
            raise UserError(f"the fresh DE attack on {path} failed: {why.removeprefix('error: ')}")
    return load_perturbations(out)


def kept_paths(path: str, ckpt: dict) -> list:
    """The kept policies of a fine-tune (td3_adv_finetune.py --keep-checkpoints): checkpoint_step{N}.pt beside it for
    each of its last K evaluation steps, every one of which must be there."""
    a = ckpt["args"]
    k, total, freq = int(a.get("keep_checkpoints") or 0), int(a["total_steps"]), int(a["eval_freq"])
    if not k:
        raise UserError(
            f"{path} kept no policies (it ran without --keep-checkpoints); evaluate it without --kept-episodes"
        )
    steps = sorted({*range(freq, total + 1, freq), total})[-k:]
    paths = [os.path.join(os.path.dirname(path), f"checkpoint_step{s}.pt") for s in steps]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{missing[0]} is missing ({len(missing)} of the {k} kept policies); rerun that fine-tune")
    return paths


def kept_returns(path: str, ckpt: dict, conditions: dict, args: Args, model: str, perturbation: Perturbation) -> dict:
    """{condition@kept: episode returns}: every kept policy of the fine-tune on --kept-episodes episodes (the same
    seeds for each) under each condition, with the final policy's δ sets, pooled (each policy weighs the same)."""
    pooled = defaultdict(list)
    for kept_path in kept_paths(path, ckpt):
        kept = load_checkpoint(kept_path)
        returns = evaluate_policy(kept, conditions, args.kept_episodes, args.eval_seed, model, perturbation)
        for cond, r in returns.items():
            pooled[cond + KEPT].append(r)
    return {cond: np.concatenate(r) for cond, r in pooled.items()}


def actor_from_checkpoint(ckpt: dict) -> Actor:
    actor = Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["action_low"], ckpt["action_high"], ckpt["hidden_dim"])
    actor.load_state_dict(ckpt["actor"])
    return actor.eval()


def evaluate_policy(ckpt: dict, conditions: dict, episodes: int, eval_seed: int, model: str, perturbation) -> dict:
    """Per-episode returns under each condition (name -> δ set); episode i of a condition uses δ_{i mod len}."""
    evaluator = ConditionEvaluator(
        ckpt["env_id"],
        ckpt.get("max_episode_steps"),
        conditions,
        episodes=episodes,
        eval_seed=eval_seed,
        perturbation_model=model,
        perturbation=perturbation,
    )
    return evaluator(actor_from_checkpoint(ckpt), ckpt["obs_mean"], ckpt["obs_std"])


def matrix_rows(path: str, ckpt: dict, returns: dict, attack_budget: str) -> list:
    """One matrix.csv row per evaluation condition."""
    ref_min, ref_max = ckpt.get("ref_min_score"), ckpt.get("ref_max_score")
    rows = []
    for cond in [c for c in ALL_CONDITIONS if c in returns]:
        r = returns[cond]
        rows.append(
            {
                "policy": policy_label(ckpt),
                "seed": ckpt["args"]["seed"],
                "env_id": ckpt["env_id"],
                "init": ckpt.get("init", "offline"),
                "finetune_condition": ckpt.get("finetune_condition", ""),
                "curriculum": ckpt.get("curriculum", ""),
                "eval_condition": cond,
                "episodes": len(r),
                "mean_return": float(r.mean()),
                "std_return": float(r.std()),
                "normalized_mean": normalized_score(float(r.mean()), ref_min, ref_max),
                "episode_returns": ";".join(f"{x:.3f}" for x in r),
                "checkpoint": path,
                "attack_budget": attack_budget,
            }
        )
    return rows


class Cell(NamedTuple):
    """One (policy, condition) cell over seeds: raw returns' mean, std and seeds; normalized mean and std (or None)."""

    mean: float
    std: float
    n: int
    norm_mean: float | None
    norm_std: float | None


def summarize(rows: list) -> dict:
    """(label, condition) -> (mean, std, n) over seeds of the raw returns, then mean and std of the normalized ones
    (None without reference scores) -> {(label, condition): Cell}"""
    by = defaultdict(list)
    for r in rows:
        by[(r["policy"], r["eval_condition"])].append(r)
    out = {}
    for key, rs in by.items():
        means = np.array([r["mean_return"] for r in rs])
        norms = [r["normalized_mean"] for r in rs]
        norm = None if any(n is None for n in norms) else np.array(norms, dtype=float)
        normalized = (None, None) if norm is None else (norm.mean(), norm.std())
        out[key] = Cell(means.mean(), means.std(), len(rs), *normalized)
    return out


def markdown_table(summary: dict, labels: list, env_id: str, episodes: int, kept_episodes: int = 0) -> str:
    lines = [
        f"Returns on {env_id}: mean ± std over seeds of each seed's mean over {episodes} episodes; "
        f"normalized score in brackets (0 = random, 100 = expert reference).",
        "",
        *table_lines(summary, labels, EVAL_CONDITIONS),
        "",
        "† offline-only, transfer: the precomputed set was found against this very policy, so this cell is a "
        "direct attack at the precomputed budget, not a transfer.",
    ]
    if any(c.endswith(KEPT) for _, c in summary):
        kept = [label for label in labels if (label, "normal" + KEPT) in summary]
        lines += [
            "",
            f"Averaged over the end of training: each fine-tune's kept policies (the last evaluations' checkpoints), "
            f"{kept_episodes} episodes each on the same seeds, under the final policy's δ sets, pooled per seed.",
            "",
            *table_lines(summary, kept, [c + KEPT for c in EVAL_CONDITIONS]),
        ]
    if any((label, "adversarial") not in summary for label in labels):
        lines += ["", "— not evaluated: no fresh attack on that policy (--no-fresh-attack)."]
    return "\n".join(lines) + "\n"


def table_lines(summary: dict, labels: list, conditions: list) -> list:
    lines = ["| policy | seeds | " + " | ".join(conditions) + " |", "|---|---|" + "---|" * len(conditions)]
    for label in labels:
        cells = []
        for c in conditions:
            cell = summary.get((label, c))
            if cell is None:
                cells.append("—")
                continue
            normalized = "" if cell.norm_mean is None else f" [{cell.norm_mean:.1f} ± {cell.norm_std:.1f}]"
            direct = " †" if c == "transfer" and label.endswith("offline-only") else ""
            cells.append(f"{cell.mean:.1f} ± {cell.std:.1f}{normalized}{direct}")
        lines.append(f"| {label} | {summary[(label, conditions[0])].n} | " + " | ".join(cells) + " |")
    return lines


def plot_heatmap(path, summary, labels, env_id):
    cells = [summary.get((lb, c)) for lb in labels for c in EVAL_CONDITIONS]
    use_norm = all(cell.norm_mean is not None for cell in cells if cell is not None)
    nan = Cell(np.nan, np.nan, 0, np.nan, np.nan)
    vals = np.array([[summary.get((lb, c), nan)[3 if use_norm else 0] for c in EVAL_CONDITIONS] for lb in labels])
    fig, ax = plt.subplots(figsize=(8, max(3.2, 1.4 + 0.55 * len(labels))), dpi=110)
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    for i in range(len(labels)):
        for j in range(len(EVAL_CONDITIONS)):
            color = "w" if vals[i, j] < np.nanmean(vals) else "k"
            text = "—" if np.isnan(vals[i, j]) else f"{vals[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(EVAL_CONDITIONS)), EVAL_CONDITIONS)
    ax.set_yticks(range(len(labels)), labels)
    xlabel = "evaluation condition (adversarial: fresh DE attack on each policy; transfer: the precomputed set)"
    ax.set_xlabel(xlabel, fontsize=8)
    fig.colorbar(im, ax=ax, label="normalized score (0 random, 100 expert)" if use_norm else "episodic return")
    ax.set_title(f"{env_id}: training condition × evaluation condition (mean over seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def load_curves(paths_by_label: dict) -> dict:
    """label -> list of metric rows (eval rows) per seed, read from each fine-tuning run's metrics.jsonl."""
    curves = defaultdict(list)
    for label, paths in paths_by_label.items():
        for p in paths:
            mpath = os.path.join(os.path.dirname(p), "metrics.jsonl")
            fix = f"restore it or leave {p} out of --checkpoints"
            if not os.path.exists(mpath):
                raise UserError(f"no metrics file {mpath} for the learning curve of {p}; {fix}")
            try:
                with open(mpath) as f:
                    evals = [r for r in map(json.loads, f) if "eval/normal_return" in r]
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"metrics file {mpath} is corrupt ({type(e).__name__}); {fix}") from None
            if not evals:
                raise UserError(f"metrics file {mpath} holds no evaluation; {fix}")
            curves[label].append(evals)
    return curves


def mean_curve(runs: list, key: str):
    steps = sorted(set.intersection(*[{r["step"] for r in run} for run in runs]))
    vals = np.array([[next(r[key] for r in run if r["step"] == s) for s in steps] for run in runs])
    return np.array(steps), vals.mean(0), vals.std(0)


def plot_curves(path, curves, summary, env_id):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100, sharey=True)
    conds = ("normal", "random", "adversarial")
    for ax, cond in zip(axes, conds):
        for label, runs in sorted(curves.items()):
            x, m, s = mean_curve(runs, f"eval/{cond}_return")
            ax.plot(x, m, marker=".", ls="--" if label.startswith("scratch") else "-", label=f"{label} (n={len(runs)})")
            ax.fill_between(x, m - s, m + s, alpha=0.15)
        if ("offline-only", cond) in summary:
            ax.axhline(summary[("offline-only", cond)].mean, color="k", ls=":", label="offline-only")
    title = f"{env_id}: learning curves during fine-tuning (mean ± std over seeds)"
    save_curve_panels(fig, axes, conds, "mean episodic return", title, path)


def plot_q(path, curves, env_id):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, runs in sorted(curves.items()):
        x, m, s = mean_curve(runs, "curriculum/q")
        ax.plot(x, m, marker=".", label=label)
        ax.fill_between(x, m - s, m + s, alpha=0.15)
    save_q_plot(fig, ax, f"{env_id}: q at each evaluation (mean ± std over seeds)", path)


def capture_videos(args: Args, ckpts: dict, sets: dict) -> list:
    """One episode per policy and condition, all from the first evaluation seed, then every policy side by side under
    one δ: the precomputed δ that hurts the first offline-only policy most (else the first policy's). -> file paths."""
    out, paths = os.path.join(args.output_dir, "videos"), []

    def episode(ckpt, delta, perturbation_model):
        policy = actor_from_checkpoint(ckpt), ckpt["obs_mean"], ckpt["obs_std"]
        env_spec, size = (ckpt["env_id"], ckpt.get("max_episode_steps")), (args.video_size, args.video_frame_skip)
        return record_episode(*env_spec, *policy, delta, perturbation, perturbation_model, args.eval_seed, *size)

    perturbation = chosen(PERTURBATION, args.perturbation_from)
    for path, ckpt in tqdm(ckpts.items(), desc="videos"):
        ref, attack = sets[path]
        attack = attack if attack is not None else ref  # no fresh attack: the precomputed set's worst δ
        model, name = str(ref["perturbation_model"]), f"{policy_label(ckpt)} s{ckpt['args']['seed']}"
        worst = attack["perturbations"][int(np.argmin(attack["perturbation_returns"]))]
        for cond, delta in zip(EVAL_CONDITIONS[:3], (np.zeros_like(worst), ref["random_deltas"][0], worst)):
            ep = episode(ckpt, delta, model)
            paths.append(os.path.join(out, f"{name.replace(' ', '_').replace('(', '').replace(')', '')}__{cond}.mp4"))
            write_video(paths[-1], captioned(ep, f"{name}, {cond}", delta), ep.fps)
    first = next((p for p, c in ckpts.items() if not is_finetuned(c)), next(iter(ckpts)))
    ref = sets[first][0]
    delta = ref["perturbations"][int(np.argmin(ref["perturbation_returns"]))]
    eps = {p: episode(c, delta, str(ref["perturbation_model"])) for p, c in ckpts.items()}
    captions = {p: f"{policy_label(ckpts[p])} s{ckpts[p]['args']['seed']}" for p in eps}
    frames = side_by_side([captioned(ep, captions[p], delta) for p, ep in eps.items()])
    fps = next(iter(eps.values())).fps
    paths += [os.path.join(out, "side_by_side.mp4"), os.path.join(out, "side_by_side.gif")]
    write_video(paths[-2], frames, fps)
    write_video(paths[-1], frames[::2], fps / 2)  # the GIF at half the frame rate keeps it small
    return paths


def load_policies(args: Args) -> tuple:
    """The checkpoints --checkpoints names, loaded and checked, of one env. -> ({path: checkpoint}, env_id)"""
    paths = find_checkpoints(args.checkpoints)
    if not paths:
        raise UserError(
            f"no checkpoints found in {' '.join(args.checkpoints)}; train some first (`bash run_pipeline.sh`) "
            f"or pass --checkpoints PATH|GLOB|DIR"
        )
    ckpts = {p: load_checkpoint(p) for p in paths}
    if args.env_id is not None:
        ckpts = {p: c for p, c in ckpts.items() if c["env_id"] == args.env_id}
        if not ckpts:
            raise UserError(f"none of the {len(paths)} checkpoints is for {args.env_id}")
    envs = sorted({c["env_id"] for c in ckpts.values()})
    if len(envs) > 1:
        raise UserError(f"the checkpoints mix envs ({', '.join(envs)}); pass --env-id to evaluate one env at a time")
    seen = {}  # (policy, seed) -> path: a copied run is not another seed
    for p, c in ckpts.items():
        other = seen.setdefault((policy_label(c), c["args"]["seed"]), p)
        if other != p:
            raise UserError(f"{other} and {p} are both {policy_label(c)}, seed {c['args']['seed']}: pass one of them")
    return ckpts, envs[0]


def log_to_wandb(args: Args, env_id: str, fields: list, rows: list, videos: list):
    import wandb  # only with --track

    wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=f"{env_id}__evaluate_matrix")
    logged = {"matrix": wandb.Table(columns=fields, data=[[r[k] for k in fields] for r in rows])}
    for v in videos:
        if v.endswith(".mp4"):
            logged[f"videos/{os.path.basename(v)[:-4]}"] = wandb.Video(v, format="mp4")
    for name in ("heatmap", "curves", "q_trajectory"):
        if os.path.exists(os.path.join(args.output_dir, f"{name}.png")):
            logged[name] = wandb.Image(os.path.join(args.output_dir, f"{name}.png"))
    wandb.log(logged)
    wandb.finish()


def main(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    ckpts, env_id = load_policies(args)
    if args.capture_video:
        check_rendering(env_id)
    # every input is checked before anything is written: the perturbation sets (made under the perturbation this
    # matrix applies, as the fine-tunes were), and each fine-tune's learning curve
    perturbation = chosen(PERTURBATION, args.perturbation_from)
    script = args.perturbation_from or os.path.basename(__file__)
    refs = {}
    for p, c in ckpts.items():
        width, npz = perturbation.width(c["obs_dim"], c["act_dim"]), reference_npz_path(p, c)
        refs[p] = load_perturbations(npz, env_id, require=REFERENCE_KEYS)
        perturbation.check(refs[p], f"the δ set {npz}", script)  # what it perturbs first, then its width
        check_fit(refs[p], npz, env_id, width)
        if is_finetuned(c):
            perturbation.check(c, f"the checkpoint {p}", script)
    for p, c in ckpts.items():  # the set a fine-tune trained against, by content: not another under its name
        checked_settings(reference_npz_path(p, c), refs[p], args)
        if "perturbations_sha256" in c:
            check_recorded_set(reference_npz_path(p, c), c["perturbations_sha256"], f"the fine-tune {p}")
    finetuned = defaultdict(list)
    for p, c in ckpts.items():
        if is_finetuned(c):
            finetuned[policy_label(c)].append(p)
    curves = load_curves(finetuned)
    if args.kept_episodes:
        for p in (p for ps in finetuned.values() for p in ps):
            kept_paths(p, ckpts[p])

    rows, sets = [], {}
    for path, ckpt in tqdm(ckpts.items(), desc="policies (fresh attack + evaluation)"):
        ref = refs[path]
        settings = checked_settings(reference_npz_path(path, ckpt), ref, args)
        attack = None
        if args.fresh_attack:
            attack = ref if same_attack(ref, path, settings) else fresh_attack(path, settings, args, args.output_dir)
        sets[path] = ref, attack
        if attack is not None:
            perturbation.check(attack, f"the fresh attack on {path}", script)
        conditions = {"normal": np.zeros((1, ref["perturbations"].shape[1])), "random": ref["random_deltas"]}
        conditions.update({"adversarial": attack["perturbations"]} if attack is not None else {})
        conditions["transfer"] = ref["perturbations"]
        model = str(ref["perturbation_model"])
        returns = evaluate_policy(ckpt, conditions, args.eval_episodes, args.eval_seed, model, perturbation)
        if args.kept_episodes and is_finetuned(ckpt):
            returns.update(kept_returns(path, ckpt, conditions, args, model, perturbation))
        if not all(np.isfinite(r).all() for r in returns.values()):
            raise UserError(f"{path} produced a non-finite return: no table written (a NaN is an error, not a cell)")
        rows += matrix_rows(path, ckpt, returns, attack_budget(settings) if attack is not None else "")
    fields, buf = list(rows[0]), io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    summary = summarize(rows)
    others = sorted({r["policy"] for r in rows} - {"offline-only"}, key=lambda s: (s.startswith("scratch"), s))
    labels = [label for label in ["offline-only", *others] if (label, "normal") in summary]
    table = markdown_table(summary, labels, env_id, args.eval_episodes, args.kept_episodes)
    os.makedirs(args.output_dir, exist_ok=True)  # (the attacks made it, unless every one was cached)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=args.output_dir)  # the output set: all made, then moved in together
    try:
        write_text(os.path.join(tmp, "matrix.csv"), buf.getvalue())
        write_text(os.path.join(tmp, "matrix.md"), table)
        plot_heatmap(os.path.join(tmp, "heatmap.png"), summary, labels, env_id)
        if finetuned:
            plot_curves(os.path.join(tmp, "curves.png"), curves, summary, env_id)
            plot_q(os.path.join(tmp, "q_trajectory.png"), curves, env_id)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    videos = capture_videos(args, ckpts, sets) if args.capture_video else []
    print(table)
    print(
        f"wrote {args.output_dir}/matrix.csv, matrix.md, heatmap.png"
        + (", curves.png, q_trajectory.png" if finetuned else "")
        + (f" and {len(videos)} videos in {args.output_dir}/videos/" if videos else "")
    )
    if args.track:
        log_to_wandb(args, env_id, fields, rows, videos)


if __name__ == "__main__":
    cli(main, Args)
