# The measurements behind three choices of the evaluation and dataset code (robust_o2o/evaluation.py, datasets.py).
"""1. Batch dependence: the same (δ, seed) episodes played together and one at a time, with the policy computed in
   float32 (as before float64_policy) and in float64 (as every evaluator now does): the largest relative difference
   of a return, and the share of episodes that differ.
2. Memory per env: the growth of this process's peak RSS per Hopper env made (sizes MAX_LOCKSTEP_ENVS).
3. Disk per episode: for each local Minari dataset named, (bytes on disk − bytes of its arrays) / episodes (sizes the
   free-space check before a dataset is written).

    python benchmarks/evaluation_facts.py --checkpoint runs/<td3_bc run>/checkpoint.pt \
        --datasets local-quick/hopper/medium-v0
"""

import os
import resource
import sys
from dataclasses import dataclass
from unittest import mock

import gymnasium as gym
import minari
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import de_perturbations as de  # noqa: E402
from robust_o2o import evaluation  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """a TD3+BC (or fine-tuned) checkpoint of a Hopper policy"""
    episode_steps: tuple[int, ...] = (100, 1000)
    """episode limits to measure batch dependence at"""
    datasets: tuple[str, ...] = ()
    """local Minari dataset ids to measure disk per episode on"""


def float32_policy(actor, obs_mean, obs_std):
    """The policy as the evaluators computed it before float64_policy: float32 throughout."""

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor((torch.as_tensor(obs, dtype=torch.float32) - obs_mean) / obs_std).numpy()

    return act


def batch_dependence(ckpt: dict, limit: int):
    ev = de.PopulationEvaluator(ckpt, "multiplicative", limit, 1)
    deltas, seeds = np.random.default_rng(0).uniform(-0.3, 0.3, (8, 3)), np.arange(3) + 10_000
    together = ev.episode_returns(deltas, seeds)
    alone = np.array([[ev.episode_returns(d[None], seeds[j : j + 1])[0, 0] for j in range(3)] for d in deltas])
    rel = np.abs(together - alone) / np.abs(alone)
    return rel.max(), (rel > 0).mean()


def main(args: Args):
    torch.set_num_threads(1)
    ckpt = de.load_checkpoint(args.checkpoint)
    for precision in ("float32", "float64"):
        policy = float32_policy if precision == "float32" else evaluation.float64_policy
        with mock.patch.object(evaluation, "float64_policy", policy):  # the evaluator itself, its policy swapped
            for limit in args.episode_steps:
                worst, share = batch_dependence(ckpt, limit)
                print(
                    f"{precision}, {limit}-step episodes: largest relative difference {worst:.3g}, {share:.0%} differ"
                )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    envs = [gym.make("Hopper-v5") for _ in range(500)]
    print(f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / len(envs):.0f} KiB of peak RSS per env")
    fields = ("observations", "actions", "rewards", "terminations", "truncations")
    for dataset_id in args.datasets:
        ds = minari.load_dataset(dataset_id)
        arrays = sum(getattr(ep, f).nbytes for ep in ds.iterate_episodes() for f in fields)
        path = minari.storage.get_dataset_path(dataset_id)
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        print(f"{dataset_id}: {(disk - arrays) / ds.total_episodes / 1024:.1f} KiB per episode besides its arrays")


if __name__ == "__main__":
    main(tyro.cli(Args))
