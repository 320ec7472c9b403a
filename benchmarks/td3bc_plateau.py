# How many TD3+BC updates until the offline policy's normal return stops rising on a dataset? (docs/protocol.md §4)
"""Runs td3_bc_offline.py for --total-steps updates per seed (one torch thread each, all seeds at once) and tabulates
the normalized return of every evaluation (10 episodes, seeds 10,000 + i), with the mean over seeds and the mean over
the last evaluations of each window.

    python benchmarks/td3bc_plateau.py                      # 2 seeds x 100k updates on the study's medium dataset
    python benchmarks/td3bc_plateau.py --no-run             # only the table, from runs/plateau-td3bc__{seed}/
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    dataset_id: str = "local-medium-b2/hopper/medium-v0"
    """the dataset (the study's medium Hopper data, behaviour seed 2)"""
    seeds: tuple[int, ...] = (1, 2)
    """TD3+BC seeds, run side by side"""
    total_steps: int = 100_000
    """updates per run"""
    eval_freq: int = 5_000
    """updates between evaluations"""
    run: bool = True
    """train (else only read the runs' metrics)"""


def main(args: Args):
    os.chdir(ROOT)
    if args.run:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "td3_bc_offline.py",
                    "--dataset-id",
                    args.dataset_id,
                    "--seed",
                    str(s),
                    "--run-name",
                    f"plateau-td3bc__{s}",
                    "--total-steps",
                    str(args.total_steps),
                    "--eval-freq",
                    str(args.eval_freq),
                    "--eval-episodes",
                    "10",
                    "--no-cuda",
                    "--overwrite",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for s in args.seeds
        ]
        if any(p.wait() for p in procs):
            sys.exit("error: a TD3+BC run failed; run it alone to see why")
    curves = {}
    for s in args.seeds:
        with open(f"runs/plateau-td3bc__{s}/metrics.jsonl") as f:
            curves[s] = {
                r["step"]: r["eval/normalized_score"] for r in map(json.loads, f) if "eval/normalized_score" in r
            }
    steps = sorted(set.intersection(*[set(c) for c in curves.values()]))
    print("| updates | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for step in steps:
        vals = [curves[s][step] for s in args.seeds]
        print(f"| {step} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
