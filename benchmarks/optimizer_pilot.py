# Which Adam states should fine-tuning start from? A pilot at the medium scale, paired by seed.
"""TD3+BC scales the actor's gradient by λ = α / mean|Q|, so the actor's Adam second moments at the end of pretraining
are far smaller than the plain TD3 gradient that fine-tuning follows with. This pilot fine-tunes the same offline
policies (one per seed) three ways, `--reset-optimizers none | actor | both`, with everything else equal, and compares
the dip (the lowest normalized normal return in the first 10k online steps) and the return at the last step, paired
by seed (paired_stats.py: mean difference with a paired-t CI, exact sign-flip p).

    python benchmarks/optimizer_pilot.py --phase prepare      # per seed: TD3+BC (20k updates), DE (K = 3, 10 gens)
    python benchmarks/optimizer_pilot.py --phase finetune     # 3 variants x seeds, 30k steps each, --jobs at a time
    python benchmarks/optimizer_pilot.py --phase report       # -> results/optimizer-pilot/pilot.csv and pilot.md

It needs the medium dataset of the study (`python study.py --behaviour-seed 2 ...` makes it, or collect_dataset.py
with the study's medium arguments). Every stage is the stage script's own command, one torch thread each.
"""

import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from paired_stats import paired_t_ci, sign_flip_p  # noqa: E402

VARIANTS = ("none", "actor", "both")


@dataclass
class Args:
    phase: Literal["prepare", "finetune", "report", "all"] = "all"
    """which part to run: prepare (TD3+BC and DE per seed), finetune (every variant), report, or all of them"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds: one offline policy each, fine-tuned once per variant"""
    dataset_id: str = "local-medium-b2/hopper/medium-v0"
    """the medium dataset (the study's, behaviour seed 2)"""
    total_steps: int = 30_000
    """online steps of each fine-tune (the medium scale's)"""
    eval_freq: int = 2_500
    """steps between evaluations (finer than the study's 5,000, to see the dip)"""
    dip_window: int = 10_000
    """the dip is the lowest normal return at an evaluation in (0, dip_window]"""
    jobs: int = 2
    """stage processes at a time, one torch thread each"""
    cuda: bool = False
    """fine-tune on the GPU with --cudagraphs (prepare always runs on the CPU)"""
    out_dir: str = "results/optimizer-pilot"
    """where the report's pilot.csv and pilot.md go"""


def offline_run(seed: int) -> str:
    return f"pilot-offline__{seed}"


def finetune_run(variant: str, seed: int) -> str:
    return f"pilot-finetune__{variant}__{seed}"


def run_all(commands: list, jobs: int):
    """Run the commands, `jobs` at a time, each with one torch thread; stop at the first failure."""
    env, started = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, time.time()
    os.makedirs("runs/_pilot_logs", exist_ok=True)
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = open(f"runs/_pilot_logs/{name}.log", "w")
            running.append(
                (name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            )
        time.sleep(1)
        for item in list(running):
            name, proc, log, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
                if proc.returncode != 0:
                    for _, other, _, _ in running:
                        other.kill()
                    sys.exit(f"error: {name} failed; see runs/_pilot_logs/{name}.log")
    print(f"{len(commands)} runs in {(time.time() - started) / 60:.1f} min, {jobs} at a time", flush=True)


def prepare(args: Args):
    py = sys.executable
    pretrain = [
        (
            offline_run(s),
            [
                py,
                "td3_bc_offline.py",
                "--dataset-id",
                args.dataset_id,
                "--seed",
                str(s),
                "--run-name",
                offline_run(s),
                "--total-steps",
                "20000",
                "--eval-freq",
                "5000",
                "--eval-episodes",
                "10",
                "--no-cuda",
                "--overwrite",
            ],
        )
        for s in args.seeds
    ]
    run_all(pretrain, args.jobs)
    attack = [
        (
            f"de__{s}",
            [
                py,
                "de_perturbations.py",
                "--checkpoint",
                f"runs/{offline_run(s)}/checkpoint.pt",
                "--epsilon",
                "0.3",
                "--seed",
                str(s),
                "--num-perturbations",
                "3",
                "--maxiter",
                "10",
                "--num-workers",
                "1",
            ],
        )
        for s in args.seeds
    ]
    run_all(attack, args.jobs)


def finetune(args: Args):
    device = ["--cuda", "--cudagraphs"] if args.cuda else ["--no-cuda"]
    commands = [
        (
            finetune_run(v, s),
            [
                sys.executable,
                "td3_adv_finetune.py",
                "--checkpoint",
                f"runs/{offline_run(s)}/checkpoint.pt",
                "--seed",
                str(s),
                "--run-name",
                finetune_run(v, s),
                "--reset-optimizers",
                v,
                "--total-steps",
                str(args.total_steps),
                "--eval-freq",
                str(args.eval_freq),
                "--eval-episodes",
                "10",
                "--overwrite",
                *device,
            ],
        )
        for s in args.seeds
        for v in VARIANTS
    ]
    run_all(commands, args.jobs)


def report(args: Args):
    rows = []
    for s in args.seeds:
        for v in VARIANTS:
            path = os.path.join(ROOT, "runs", finetune_run(v, s), "metrics.jsonl")
            with open(path) as f:
                evals = [r for r in map(json.loads, f) if "eval/normal_normalized" in r]
            dip = min(r["eval/normal_normalized"] for r in evals if 0 < r["step"] <= args.dip_window)
            final = next(r for r in evals if r["step"] == args.total_steps)
            rows.append(
                {
                    "seed": s,
                    "reset_optimizers": v,
                    "start": evals[0]["eval/normal_normalized"],
                    "dip": dip,
                    "final": final["eval/normal_normalized"],
                    "final_adversarial": final["eval/adversarial_normalized"],
                }
            )
    value = {(r["reset_optimizers"], r["seed"], k): r[k] for r in rows for k in ("dip", "final", "final_adversarial")}
    lines = [
        f"Optimizer-state pilot: {len(args.seeds)} seeds x `--reset-optimizers` {{{', '.join(VARIANTS)}}}, "
        f"{args.total_steps} online steps, evaluations every {args.eval_freq} (10 episodes each); normalized scores.",
        "",
        "| endpoint | "
        + " | ".join(f"{v}: mean" for v in VARIANTS)
        + " | actor − none [95% CI], p | both − none [95% CI], p |",
        "|---|" + "---|" * (len(VARIANTS) + 2),
    ]
    names = {
        "dip": f"dip (lowest normal return, steps 1-{args.dip_window})",
        "final": f"normal return at {args.total_steps}",
        "final_adversarial": f"adversarial (precomputed set) at {args.total_steps}",
    }
    for key, name in names.items():
        means = [np.mean([value[(v, s, key)] for s in args.seeds]) for v in VARIANTS]
        cells = []
        for v in ("actor", "both"):
            d = np.array([value[(v, s, key)] - value[("none", s, key)] for s in args.seeds])
            mean, lo, hi = paired_t_ci(d)
            cells.append(
                f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}], p = {sign_flip_p(d):.3f} ({int((d > 0).sum())} of {len(d)} "
                "seeds up)"
            )
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in means) + " | " + " | ".join(cells) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows([{k: (f"{x:.4f}" if isinstance(x, float) else x) for k, x in r.items()} for r in rows])
    with open(os.path.join(args.out_dir, "pilot.csv"), "w") as f:
        f.write(buf.getvalue())
    with open(os.path.join(args.out_dir, "pilot.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args: Args):
    os.chdir(ROOT)
    if args.phase in ("prepare", "all"):
        prepare(args)
    if args.phase in ("finetune", "all"):
        finetune(args)
    if args.phase in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
