"""The method's evaluation protocol: the one score scale (0 = random, 100 = expert), and a policy's deterministic
returns on fixed episodes under each perturbation condition (normal, random, adversarial), played in lockstep.
Fine-tuning's evaluations (which the adaptive curriculum reads), DE's and the final matrix all use it, each with the
perturbation its script declares (robust_o2o/perturbation.py)."""

import copy

import gymnasium as gym
import numpy as np
import torch

from robust_o2o.cli import UserError
from robust_o2o.perturbation import Perturbation


def normalized_score(ret: float, ref_min, ref_max) -> float | None:
    """D4RL-style score, the one scale of every log and file: 0 = random, 100 = expert (None without reference
    scores)."""
    return None if ref_min is None or ref_max is None else 100.0 * (ret - ref_min) / (ref_max - ref_min)


def reference_scores(ckpt: dict, ref_min=None, ref_max=None, required: bool = False) -> tuple:
    """The returns that normalize scores: the flags' (when given), else the checkpoint's; refuses a pair that cannot
    normalize, and a missing pair when `required` (the adaptive curriculum reads normalized returns)."""
    ref_min = ref_min if ref_min is not None else ckpt.get("ref_min_score")
    ref_max = ref_max if ref_max is not None else ckpt.get("ref_max_score")
    if required and (ref_min is None or ref_max is None):
        raise UserError(
            "the adaptive curriculum needs normalized returns but the checkpoint has no reference scores; "
            "pass --ref-min-score and --ref-max-score"
        )
    if ref_min is not None and ref_max is not None and not ref_min < ref_max:
        raise UserError(
            f"the reference scores must satisfy min < max to normalize returns (got {ref_min} and {ref_max}); "
            f"pass --ref-min-score and --ref-max-score"
        )
    return ref_min, ref_max


def condition_metrics(returns: dict, ref_min, ref_max) -> dict:
    """{condition: returns} -> eval/{condition}_return, _return_std and _normalized (None without reference scores)."""
    return {
        f"eval/{c}_{stat}": value
        for c, r in returns.items()
        for stat, value in (
            ("return", float(r.mean())),
            ("return_std", float(r.std())),
            ("normalized", normalized_score(float(r.mean()), ref_min, ref_max)),
        )
    }


class ConditionEvaluator:
    """A policy's deterministic returns on the same `episodes` episodes (seeds eval_seed + i) under each condition
    (name -> δ set; episode i plays δ_{i mod len}), all in lockstep through `rollout_batch`, under the calling
    script's perturbation (its PERTURBATION) with `perturbation_model`."""

    def __init__(
        self,
        env_id: str,
        max_episode_steps: int | None,
        conditions: dict,
        episodes: int,
        eval_seed: int,
        perturbation_model: str,
        perturbation: Perturbation,
    ):
        self.env_id, self.max_episode_steps, self.conditions, self.episodes = (
            env_id,
            max_episode_steps,
            conditions,
            episodes,
        )
        self.eval_seed, self.perturbation_model, self.perturbation = eval_seed, perturbation_model, perturbation
        n_envs = min(len(conditions) * episodes, MAX_LOCKSTEP_ENVS)
        self.envs = [gym.make(env_id, max_episode_steps=max_episode_steps) for _ in range(n_envs)]
        self.deltas = np.vstack([d[np.arange(episodes) % len(d)] for d in conditions.values()])
        self.seeds = np.tile(eval_seed + np.arange(episodes), len(conditions))

    def __call__(self, actor, obs_mean, obs_std) -> dict:
        """-> {condition: per-episode returns [episodes]}"""
        returns, _ = rollout_batch(
            self.envs, actor, obs_mean, obs_std, self.deltas, self.seeds, self.perturbation_model, self.perturbation
        )
        return {name: returns[i * self.episodes : (i + 1) * self.episodes] for i, name in enumerate(self.conditions)}


MAX_LOCKSTEP_ENVS = 256  # envs stepped together (about 1 MB each for Hopper, benchmarks/evaluation_facts.py)


def rollout_batch(envs, actor, obs_mean, obs_std, deltas, seeds, perturbation_model: str, perturbation: Perturbation):
    """Run one episode per (δ_j, seed_j) in lockstep, one batched policy call per step, under the calling script's
    perturbation (its PERTURBATION: of the executed actions or of the observations the policy sees). More pairs than
    envs play in successive chunks of len(envs), so memory is bounded by the envs given, whatever the episode count.
    Returns (returns [B], env steps taken)."""
    returns, steps = np.zeros(len(seeds)), 0
    for start in range(0, len(seeds), len(envs)):
        chunk = slice(start, start + len(envs))
        returns[chunk], chunk_steps = lockstep(
            envs, actor, obs_mean, obs_std, deltas[chunk], seeds[chunk], perturbation_model, perturbation
        )
        steps += chunk_steps
    return returns, steps


def float64_policy(actor, obs_mean, obs_std):
    """The policy as every evaluator runs it: its float32 weights computed in float64, the actions rounded to float32.
    In float32 a row's action depends on which rows share its batch (actor(x[:B]) and actor(x)[:B] differ by about
    5e-8 on this CPU, and over 1,000 Hopper steps that moved a δ's return by up to 23 %); in float64 such differences
    lie far below float32's resolution, so each (δ, seed) pair's return is the same whatever shares its batch
    (benchmarks/evaluation_facts.py measures both).
    -> obs [B, No] (numpy) -> actions [B, Na] (float32 numpy)"""
    policy = copy.deepcopy(actor).double() if isinstance(actor, torch.nn.Module) else actor
    mean, std = torch.as_tensor(obs_mean, dtype=torch.float64), torch.as_tensor(obs_std, dtype=torch.float64)

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy((torch.as_tensor(obs, dtype=torch.float64) - mean) / std).float().numpy()

    return act


def lockstep(envs, actor, obs_mean, obs_std, deltas, seeds, perturbation_model: str, perturbation: Perturbation):
    """One episode per (δ_j, seed_j) on envs[j], all stepped together. -> (returns [B], env steps taken)"""
    low, high = envs[0].action_space.low, envs[0].action_space.high
    obs_low, obs_high = envs[0].observation_space.low, envs[0].observation_space.high
    act = float64_policy(actor, obs_mean, obs_std)
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    returns, alive, steps = np.zeros(len(seeds)), np.ones(len(seeds), bool), 0
    while alive.any():
        idx = np.flatnonzero(alive)
        actions = act(perturbation.seen(obs[idx], deltas[idx], obs_low, obs_high, perturbation_model))
        executed = perturbation.executed(actions, deltas[idx], low, high, perturbation_model)
        for j, i in enumerate(idx):
            obs[i], reward, terminated, truncated, _ = envs[i].step(executed[j])
            returns[i] += reward
            alive[i] = not (terminated or truncated)
        steps += len(idx)
    return returns, steps
