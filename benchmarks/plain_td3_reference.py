# What a plain TD3 reaches at a study's budget: the descriptive reference beside claim 2 (docs/protocol-part2.md §2f).
"""Claim 2 compares fine-tuning with the paper's from-scratch baseline, which is adversarial (adaptive curriculum)
from random networks. Part 1 asked whether that baseline is merely slow, so a study's report also says what this
project's TD3 from scratch *without* δ reaches at the same budget. The runs are ordinary fine-tuning runs:

    python td3_adv_finetune.py --checkpoint <the study's offline checkpoint> --init scratch \\
        --finetune-condition normal --total-steps 100000 --learning-starts 10000 --eval-freq 5000 \\
        --run-name td3-reference-halfcheetah__1 --seed 1          # --init scratch uses none of its weights

This script reads their folders (args.json and metrics.jsonl) and writes one row per run: the online area under the
curve (claim 2's endpoint: mean normalized normal return over the evaluations after step 0), the final evaluation and
the run's wall time (what the reference cost).
study_report.py prints the rows beside claim 2 when the results folder holds the file.

    python benchmarks/plain_td3_reference.py --runs runs/td3-reference-halfcheetah__1 \\
        runs/td3-reference-halfcheetah__2 --output results/study-halfcheetah-100k/plain_td3_reference.csv
"""

import csv
import io
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from robust_o2o.files import write_text  # noqa: E402

FIELDS = (
    "env_id",
    "seed",
    "total_steps",
    "learning_starts",
    "online_auc",
    "final_normalized",
    "final_return",
    "wall_s",
    "run",
)


@dataclass
class Args:
    runs: tuple[str, ...]
    """run folders of td3_adv_finetune.py --init scratch --finetune-condition normal"""
    output: str = "plain_td3_reference.csv"
    """the table to write (put it in the study's results folder)"""


def wall_time(args: dict, rows: list) -> float | None:
    """The run's wall time, training and evaluations, from its last logged steps per second (steps since the run
    started ÷ seconds since then); None for a resumed run, whose last rate covers only its last part."""
    rates = [r for r in rows if "charts/sps" in r]
    if args.get("resume") or not rates:
        return None
    return rates[-1]["step"] / rates[-1]["charts/sps"]


def reference_row(run: str) -> dict:
    """One plain-TD3 run's endpoints, refused unless it is TD3 from scratch without δ and finished."""
    args = json.load(open(os.path.join(run, "args.json")))
    if args.get("init") != "scratch" or args.get("finetune_condition") != "normal":
        raise SystemExit(f"error: {run} is not a plain TD3 run (--init scratch --finetune-condition normal)")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/normal_normalized" in r]
    if not evals or evals[-1]["step"] != args["total_steps"]:
        raise SystemExit(f"error: {run} has not finished its {args['total_steps']} steps; let it finish or --resume it")
    return {
        "env_id": args["env_id"],
        "seed": args["seed"],
        "total_steps": args["total_steps"],
        "learning_starts": args["learning_starts"],
        "online_auc": float(np.mean([r["eval/normal_normalized"] for r in evals if r["step"] > 0])),
        "final_normalized": evals[-1]["eval/normal_normalized"],
        "final_return": evals[-1]["eval/normal_return"],
        "wall_s": wall_time(args, rows),
        "run": os.path.basename(os.path.normpath(run)),
    }


def main(args: Args):
    rows = sorted((reference_row(run) for run in args.runs), key=lambda r: (r["env_id"], r["seed"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.output, buf.getvalue())
    for r in rows:
        print(f"{r['env_id']} seed {r['seed']}: online AUC {r['online_auc']:.1f}, final {r['final_normalized']:.1f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
