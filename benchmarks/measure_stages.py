"""Measure the stages on this machine; prints a Markdown table (docs/measurements.md).

Dataset creation time, TD3+BC updates/s, and DE's population evaluation against raw single-env stepping, all in
one run:
    python benchmarks/measure_stages.py            # default sizes (about 4 minutes on 2 CPU cores)
    python benchmarks/measure_stages.py --updates 500 --transitions 2000 --train-steps 3000   # quick

Runs each stage script in a subprocess against a throwaway Minari store and run folder.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd, cwd, env):
    t = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.time() - t


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="Hopper-v5")
    p.add_argument("--transitions", type=int, default=100_000, help="transitions in the random dataset")
    p.add_argument("--train-steps", type=int, default=20_000, help="online TD3 steps for the behaviour policy")
    p.add_argument("--updates", type=int, default=10_000, help="TD3+BC updates timed")
    p.add_argument("--de-steps", type=int, default=50_000, help="env steps for each DE stepping measurement")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp / "minari")}
    name = a.env_id.split("-")[0].lower()
    common = [
        str(ROOT / "collect_dataset.py"),
        "--env-id",
        a.env_id,
        "--namespace",
        "bench",
        "--ref-episodes",
        "20",
        "--num-transitions",
        str(a.transitions),
    ]
    t_random = run(common + ["--levels", "random"], tmp, env)
    t_medium = run(
        common
        + [
            "--levels",
            "medium",
            "--max-train-steps",
            str(a.train_steps),
            "--learning-starts",
            str(min(5000, a.train_steps // 2)),
            "--eval-freq",
            "5000",
            "--eval-episodes",
            "5",
            "--medium-target-return",
            "1e9",
        ],
        tmp,
        env,
    )
    run(
        [
            str(ROOT / "td3_bc_offline.py"),
            "--dataset-id",
            f"bench/{name}/medium-v0",
            "--total-steps",
            str(a.updates),
            "--eval-freq",
            str(10 * a.updates),
            "--eval-episodes",
            "1",
            "--log-freq",
            str(max(a.updates // 10, 1)),
            "--run-name",
            "bench",
        ],
        tmp,
        env,
    )
    rows = [json.loads(line) for line in open(tmp / "runs" / "bench" / "metrics.jsonl")]
    ups = [r["charts/updates_per_sec"] for r in rows if "charts/updates_per_sec" in r][1:]  # skip the warm-up window
    ups_mean = sum(ups) / len(ups) if ups else float("nan")
    ckpt_path = str(tmp / "runs" / "bench" / "checkpoint.pt")
    de_rows = measure_de(ckpt_path, a.env_id, a.de_steps)
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n"
    )
    print("| what | figure |\n|---|---|")
    print(
        f"| `random` dataset, {a.transitions:,} transitions of {a.env_id} (+20 reference episodes) | {t_random:.1f} s |"
    )
    print(
        f"| `medium` dataset: {a.train_steps:,} online TD3 steps + {a.transitions:,}-transition rollout | "
        f"{t_medium:.1f} s "
        f"({a.train_steps / t_medium:.0f} training steps/s overall) |"
    )
    print(
        "| TD3+BC updates/s in `td3_bc_offline.py` (default flags), batch 256, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'} "
        f"(mean of {len(ups)} windows of {max(a.updates // 10, 1)}) | {ups_mean:.0f} |"
    )
    base = de_rows[0][1]
    for what, sps in de_rows:
        print(f"| {what} | {sps:,.0f} env steps/s ({sps / base:.2f}×) |")


def measure_de(ckpt_path: str, env_id: str, n: int):
    """Env steps/s: raw stepping with random actions, the serial policy rollout (one unbatched forward per step),
    and de_perturbations' batched population evaluation with 1 worker and with one per core."""
    import de_perturbations as de
    import td3_adv_finetune as ft

    rows = []
    env = gym.make(env_id)
    env.reset(seed=0)
    t = time.time()
    for _ in range(n):
        _, _, te, tr, _ = env.step(env.action_space.sample())
        if te or tr:
            env.reset()
    rows.append((f"raw single-env stepping, random actions ({env_id})", n / (time.time() - t)))
    ckpt = de.load_checkpoint(ckpt_path)
    actor = de.actor_from_checkpoint(ckpt)
    penv = ft.ActionPerturbation(env, 0.3, "multiplicative", "random")
    obs, _ = penv.reset(seed=0)
    t = time.time()
    for _ in range(n):
        with torch.no_grad():
            act = actor((torch.as_tensor(obs, dtype=torch.float32) - ckpt["obs_mean"]) / ckpt["obs_std"]).numpy()
        obs, _, te, tr, _ = penv.step(act)
        if te or tr:
            obs, _ = penv.reset()
    rows.append(
        ("serial policy rollout through the perturbation wrapper (one forward per step)", n / (time.time() - t))
    )
    deltas = np.random.default_rng(0).uniform(-0.3, 0.3, (30, ckpt["act_dim"]))  # popsize 10 × Na = 3
    for workers in sorted({1, os.cpu_count() or 1}):
        ev = de.PopulationEvaluator(ckpt, "multiplicative", None, workers)
        ev.returns(deltas[:2], np.arange(1))  # start the workers
        ev.env_steps, t = 0, time.time()
        while ev.env_steps < n:
            ev.returns(deltas, np.arange(5))
        rows.append(
            (
                f"DE population evaluation: 30 δ × 5 episodes in lockstep, {workers} worker(s)",
                ev.env_steps / (time.time() - t),
            )
        )
        ev.close()
    return rows


if __name__ == "__main__":
    main()
