# Does DE need 2 episodes per candidate, or does 1 rank the δ alike? The pilot behind docs/protocol-part2.md §4.
"""Against one policy and its precomputed perturbations file (DE at 2 episodes per candidate), measures:

1. the ranking: N candidate δ drawn uniformly from [−ε, ε]^Na, each played on DE's own objective episodes (the first
   1 and the first 2 of run 0's) and on M held-out episodes (the final evaluation's seeds, 50,000 + i); Spearman's
   rank correlation of each objective with the held-out return, and the held-out return of the δ each objective
   ranks worst (the one DE would keep);
2. the attack: DE rerun with 1 episode per candidate and every other setting of the file's (K, popsize,
   generations, DE seed), its wall time against the file's, and both δ sets played on the M held-out episodes
   (episode i under δ_(i mod K), as the matrix plays them).

    python benchmarks/de_episodes_pilot.py --checkpoint runs/X/checkpoint.pt   # perturbations.npz beside it
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro
from scipy import stats

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import de_perturbations as de  # noqa: E402
import evaluate_matrix as em  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """the policy (a TD3+BC checkpoint)"""
    perturbations: str | None = None
    """its precomputed set (if unset: perturbations.npz beside the checkpoint)"""
    candidates: int = 60
    """random δ for the ranking check"""
    held_out: int = 30
    """held-out episodes (seeds 50,000 + i)"""
    seed: int = 0
    """seed of the random candidates"""


def main(args: Args):
    npz = args.perturbations or os.path.join(os.path.dirname(args.checkpoint), "perturbations.npz")
    ref, ckpt = np.load(npz), de.load_checkpoint(args.checkpoint)
    eps, model, act_dim = float(ref["epsilon"]), str(ref["perturbation_model"]), int(ckpt["act_dim"])
    steps = int(ref["max_episode_steps"])
    evaluator = de.PopulationEvaluator(ckpt, model, None if steps < 0 else steps, 1)
    held = em.EVAL_SEED + np.arange(args.held_out)
    objective_seeds = int(ref["de_seed"]) + np.arange(2)  # DE's run 0 plays these (run k: de_seed + 1000 k + i)

    deltas = np.random.default_rng(args.seed).uniform(-eps, eps, size=(args.candidates, act_dim))
    t0 = time.time()
    on_objective = evaluator.episode_returns(deltas, objective_seeds)  # [N, 2]
    on_held = evaluator.episode_returns(deltas, held).mean(1)
    print(f"ranking: {args.candidates} random δ (ε = {eps}, {model}) in {time.time() - t0:.0f} s")
    print(
        f"held-out return over the candidates: {on_held.min():.1f} to {on_held.max():.1f} (mean {on_held.mean():.1f})"
    )
    for k in (1, 2):
        objective = on_objective[:, :k].mean(1)
        rho = stats.spearmanr(objective, on_held).statistic
        worst = on_held[np.argmin(objective)]
        print(
            f"  {k} episode(s) per candidate: Spearman {rho:.3f} with the held-out return; the δ it ranks worst has "
            f"held-out return {worst:.1f} (the truly worst: {on_held.min():.1f})"
        )

    with tempfile.TemporaryDirectory() as tmp:
        settings = {**em.attack_settings(ref, em.Args()), "--de-episodes": 1}
        out = os.path.join(tmp, "one_episode.npz")
        cmd = [sys.executable, os.path.join(HERE, "de_perturbations.py"), "--checkpoint", args.checkpoint]
        cmd += ["--output", out, *em.as_argv(settings), "--num-workers", "1"]
        t0 = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.time() - t0
        one = np.load(out)
        sets = {"2 episodes (the file's)": ref["perturbations"], "1 episode": one["perturbations"]}
        print(
            f"attack: DE at 1 episode per candidate: {int(one['env_steps'])} env steps, {wall:.0f} s wall; the file's "
            f"(2 episodes): {int(ref['env_steps'])} env steps, {float(ref['wall_time_sec']):.0f} s"
        )
        for name, found in sets.items():
            returns = np.array(
                [evaluator.returns(found[i % len(found)][None], held[i : i + 1])[0] for i in range(len(held))]
            )
            print(
                f"  {name}: held-out return {returns.mean():.1f} "
                f"(s.e. {returns.std(ddof=1) / np.sqrt(len(returns)):.1f})"
            )
    evaluator.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
