# Stage 3 of robust offline-to-online RL by adversarial fine-tuning (Ayabe, Kera & Kawamoto, arXiv 2510.13358):
# online TD3 from the TD3+BC checkpoint, perturbations injected into executed actions with probability q.
"""Adversarial fine-tuning.

- Start: actor, critics and targets from the TD3+BC checkpoint (`--init offline`), with the same observation
  normalization; or random networks (`--init scratch`, the paper's from-scratch baseline, uniform warm-up as TD3).
- Loss: plain TD3 (the BC term is dropped).
- Replay: each batch draws a fraction r_off from the offline dataset and the rest from online transitions.
- Perturbation: at each training episode's start, with probability q, a δ is chosen for the whole episode
  (adversarial: uniformly from the DE set {δ_a}; random: U([−ε, ε]^Na)). The buffer stores the action the
  policy chose, a, not the executed ã: the critic then learns what a choice leads to under the fault, and the
  actor learns choices that compensate for it.
- Curriculum for q: fixed, linear (q_init → q_max) or adaptive:
      R̄_n = β R_n + (1 − β) R̄_{n−1},   q ← clip(q + η (R̄_n − R̄_{n−1}) / 100, q_min, q_max)
  with R_n the normalized score of evaluation n under the normal condition (0 = random, 100 = expert: the one scale
  of every log and file; the /100 makes η a step per random-to-expert span, i.e. η is applied to R on a [0, 1] scale).
"""

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from robust_o2o.cli import Range, UserError, check_ranges, cli
from robust_o2o.datasets import offline_transitions
from robust_o2o.evaluation import ConditionEvaluator, condition_metrics, reference_scores
from robust_o2o.fast_path import CudaGraph, FastPathOptions, adam, setup_fast_path
from robust_o2o.files import save_checkpoint, sha256_file
from robust_o2o.formats import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_fit,
    default_checkpoint,
    load_checkpoint,
    load_perturbations,
)
from robust_o2o.perturbation import Perturbation
from robust_o2o.replay import RingBuffer
from robust_o2o.resume import env_state, load_module_states, module_states, set_env_state, set_rng_state
from robust_o2o.runs import NonFiniteSentinel, Run, RunOptions, already_complete, open_run, seed_everything
from robust_o2o.video import check_rendering, record_condition

# the checkpoints' stage tag: a fork under a new name has its own
STAGE = os.path.splitext(os.path.basename(__file__))[0]


@dataclass
class Args(RunOptions, FastPathOptions):  # the flags the shared plumbing reads (--cuda, --track, ...) come first
    # the paper's knobs: condition, curriculum of q (β, η), r_off; ε and {δ_a} come from --perturbations
    init: Literal["offline", "scratch"] = "offline"
    """offline: start from the checkpoint; scratch: random networks, no offline data (the from-scratch baseline)"""
    finetune_condition: Literal["normal", "random", "adversarial"] = "adversarial"
    """perturbations injected while fine-tuning: normal, random or adversarial"""
    curriculum: Literal["fixed", "linear", "adaptive"] = "adaptive"
    """schedule of q: fixed, linear or adaptive"""
    q: Annotated[float, Range(0, 1)] = 0.5
    """q for the fixed curriculum"""
    q_init: Annotated[float, Range(0, 1)] = 0.1
    """initial q of the linear and adaptive curricula"""
    q_min: Annotated[float, Range(0, 1)] = 0.0
    """lower bound of q (adaptive)"""
    q_max: Annotated[float, Range(0, 1)] = 1.0
    """final q of the linear curriculum and upper bound of the adaptive one"""
    beta: Annotated[float, Range(0, 1, open="lo")] = 0.9
    """β: EMA weight of the newest evaluation in the adaptive curriculum"""
    eta: Annotated[float, Range(0)] = 0.7
    """η: adaptive step size, per random-to-expert span of normalized return (100 points); the paper tunes it per env"""
    r_off: Annotated[float, Range(0, 1)] = 0.1
    """r_off: fraction of every batch drawn from the offline dataset (ignored for --init scratch)"""

    # inputs
    checkpoint: str | None = None
    """TD3+BC checkpoint (if unset: the first of DEFAULT_CHECKPOINTS that exists: full-scale, then run_pipeline.sh's)"""
    perturbations: str | None = None
    """.npz from de_perturbations.py (if unset: perturbations.npz beside the checkpoint): {δ_a}, ε and the model"""

    # TD3
    total_steps: Annotated[int, Range(1)] = 1_000_000
    """online env steps (the paper fine-tunes for 1M-3M)"""
    learning_starts: Annotated[int | None, Range(0)] = None
    """steps before updates begin (if unset: 25k uniform-random steps for scratch; batch size for offline init)"""
    buffer_size: Annotated[int | None, Range(1)] = None
    """online replay capacity (if unset: total steps)"""
    batch_size: Annotated[int, Range(1)] = 256
    """minibatch size"""
    learning_rate: Annotated[float, Range(0, open="lo")] = 3e-4
    """Adam learning rate"""
    reset_optimizers: Literal["none", "actor", "both"] = "actor"
    """Adam states reset: none, the actor's (TD3+BC scaled its gradient by λ) or both (docs/td3_adv_finetune.md)"""
    gamma: Annotated[float, Range(0, 1)] = 0.99
    """discount factor γ"""
    tau: Annotated[float, Range(0, 1, open="lo")] = 0.005
    """target smoothing coefficient τ"""
    exploration_noise: Annotated[float, Range(0)] = 0.1
    """Gaussian exploration noise (fraction of the action half-range)"""
    policy_noise: Annotated[float, Range(0)] = 0.2
    """target policy smoothing noise"""
    noise_clip: Annotated[float, Range(0)] = 0.5
    """target policy smoothing noise clip"""
    policy_frequency: Annotated[int, Range(1)] = 2
    """delayed actor (and target) update frequency"""

    # evaluation
    eval_freq: Annotated[int, Range(1)] = 10_000
    """env steps between evaluations (each under normal, random and adversarial conditions) and checkpoints"""
    eval_episodes: Annotated[int, Range(1)] = 10
    """episodes per condition and evaluation (seeds eval_seed + i)"""
    eval_seed: Annotated[int, Range(0)] = 10_000
    """first evaluation seed (the same episodes as the other stages)"""
    keep_checkpoints: Annotated[int, Range(0)] = 0
    """also keep the last K evaluations' policies (checkpoint_step{N}.pt), for evaluate_matrix.py --kept-episodes"""
    ref_min_score: Annotated[float | None, Range()] = None
    """override the checkpoint's reference return for normalized score 0"""
    ref_max_score: Annotated[float | None, Range()] = None
    """override the checkpoint's reference return for normalized score 100"""

    # run management
    exp_name: str = STAGE
    """the name of this experiment (the script's file name, so a fork's runs are named after the fork)"""
    run_name: str | None = None
    """output folder under runs/ (if unset: {env}__{exp_name}__{init}-{condition}-{curriculum}__{seed}__{unix time})"""
    seed: Annotated[int, Range(0)] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    capture_video: bool = False
    """record each evaluation's first adversarial episode (δ_0) into runs/{run_name}/videos/ and W&B (MUJOCO_GL=egl)"""


# ALGO LOGIC: networks (copies of td3_bc_offline.py's; tests/test_contracts.py proves the copies agree)
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


class VectorizedLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: x [n, B, in] -> [n, B, out]."""

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        bound = 1 / in_features**0.5  # the same init as nn.Linear
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [k, B, in] uses the first k of the n layers
        return torch.baddbmm(self.bias[: x.shape[0]], x, self.weight[: x.shape[0]])


class Critic(nn.Module):
    """Twin Q-networks Q1, Q2 (2×hidden ReLU MLPs) evaluated as one batched call."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256, n: int = 2):
        super().__init__()
        self.n = n
        hidden = [VectorizedLinear(obs_dim + act_dim, hidden_dim, n), nn.ReLU()]
        hidden += [VectorizedLinear(hidden_dim, hidden_dim, n), nn.ReLU()]
        self.net = nn.Sequential(*hidden, VectorizedLinear(hidden_dim, 1, n))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """[Q1(s, a), Q2(s, a)] as one [2, B] tensor."""
        x = torch.cat([obs, act], -1)
        return self.net(x.expand(self.n, *x.shape)).squeeze(-1)

    def q1(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Q1(s, a) alone [B], through the first of the batched layers only (the actor loss needs no Q2)."""
        return self.net(torch.cat([obs, act], -1)[None]).squeeze(-1)[0]


# ALGO LOGIC: the perturbation model (a verbatim copy of de_perturbations.py's; tests prove the copies agree)
PERTURBATION_MODELS = ("multiplicative", "additive")
CONDITIONS = ("normal", "random", "adversarial")


def perturb_action(action: np.ndarray, delta: np.ndarray, low, high, perturbation_model: str) -> np.ndarray:
    """Executed action ã for the chosen action a under perturbation δ; works row-wise on batches [..., Na]."""
    if perturbation_model == "multiplicative":
        executed = action * (1.0 + delta)
    elif perturbation_model == "additive":
        executed = action + delta * (high - low) / 2.0
    else:
        raise ValueError(f"unknown perturbation model {perturbation_model!r}")
    return np.clip(executed, low, high).astype(action.dtype, copy=False)


# what δ perturbs and how: this script applies it, and the other stages do given --perturbation-from (docs/forking.md)
PERTURBATION = Perturbation(target="action", models=PERTURBATION_MODELS, apply=perturb_action)


class ActionPerturbation(gym.ActionWrapper):
    """Injects a per-episode perturbation δ into executed actions.

    At each reset: `reset(options={"delta": δ})` pins δ for that episode; otherwise, with probability q, δ is drawn by
    the condition (random: U([−ε, ε]^Na); adversarial: uniformly from `deltas`; normal: 0), and δ = 0 with
    probability 1 − q. The draw uses the wrapper's own RNG (seeded by reset(seed=...)), never the env's, so the
    env's start states do not depend on the condition. `reset` reports δ in info["delta"]."""

    def __init__(self, env, epsilon, perturbation_model="multiplicative", condition="normal", deltas=None, q=1.0):
        super().__init__(env)
        if condition not in CONDITIONS or perturbation_model not in PERTURBATION_MODELS:
            raise ValueError(f"condition must be one of {CONDITIONS} and model one of {PERTURBATION_MODELS}")
        if condition == "adversarial" and (deltas is None or len(deltas) == 0):
            raise ValueError("the adversarial condition needs a non-empty set of deltas")
        self.epsilon, self.perturbation_model, self.condition, self.q = epsilon, perturbation_model, condition, q
        self.deltas = None if deltas is None else np.asarray(deltas, dtype=np.float64)
        self.low, self.high = env.action_space.low, env.action_space.high
        self.delta = np.zeros(env.action_space.shape, dtype=np.float64)
        self.rng = np.random.default_rng()

    def draw_delta(self) -> np.ndarray:
        if self.condition == "normal" or self.rng.random() >= self.q:
            return np.zeros_like(self.delta)
        if self.condition == "random":
            return self.rng.uniform(-self.epsilon, self.epsilon, size=self.delta.shape)
        return self.deltas[self.rng.integers(len(self.deltas))].copy()

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        if seed is not None:
            self.rng = np.random.default_rng([seed, 0x5EED])
        pinned = options.pop("delta", None)
        self.delta = np.asarray(pinned, dtype=np.float64) if pinned is not None else self.draw_delta()
        obs, info = self.env.reset(seed=seed, options=options or None)
        return obs, {**info, "delta": self.delta.copy()}

    def action(self, action):
        return perturb_action(np.asarray(action), self.delta, self.low, self.high, self.perturbation_model)


# ALGO LOGIC: the curricula for q
def linear_q(step: int, total_steps: int, q_init: float, q_max: float) -> float:
    """q rises linearly from q_init at step 0 to q_max at the last step."""
    return q_init + (q_max - q_init) * min(step / max(total_steps, 1), 1.0)


def adaptive_q(q: float, ema_prev: float, R: float, beta: float, eta: float, q_min: float, q_max: float):
    """One update after evaluation n, R in normalized points: R̄_n = β R_n + (1 − β) R̄_{n−1};
    q ← clip(q + η (R̄_n − R̄_{n−1}) / 100). -> (q, R̄_n)"""
    ema = beta * R + (1.0 - beta) * ema_prev
    return float(np.clip(q + eta * (ema - ema_prev) / 100, q_min, q_max)), float(ema)


# ALGO LOGIC: replay with a fixed offline share r_off per batch
def batch_split(batch_size: int, r_off: float, n_online: int, has_offline: bool) -> int:
    """How many of a batch's rows come from the offline data: round(r_off · B); all of them while fewer than B
    online transitions exist (the first updates after an offline start); none without offline data."""
    if not has_offline:
        return 0
    if n_online < batch_size:
        return batch_size
    return int(round(r_off * batch_size))


def sample(data: dict, size: int, k: int) -> tuple:
    """k uniform rows of the first `size` entries of a transition store."""
    idx = torch.randint(0, size, (k,), device=data["obs"].device)
    return tuple(data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminations"))


def mixed_batch(online: "OnlineBuffer", offline: dict | None, batch_size: int, r_off: float) -> tuple:
    """A batch (s, a, r, s', terminated): batch_split(...) offline rows after the online ones."""
    n_offline = batch_split(batch_size, r_off, online.size, has_offline=offline is not None)
    parts = [sample(online.data, online.size, batch_size - n_offline)] if n_offline < batch_size else []
    if n_offline:
        parts.append(sample(offline, offline["obs"].shape[0], n_offline))
    return tuple(torch.cat(column) for column in zip(*parts))


class OnlineBuffer(RingBuffer):
    """Online transitions on the training device: normalized s and s', the action the policy CHOSE (never the
    executed, perturbed one), r, and terminated (truncations are stored as 0 so they bootstrap). Saved with state.pt."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device):
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_obs": (obs_dim,), "terminations": ()}
        super().__init__("online", capacity, shapes, device)

    def add(self, obs, chosen_action, reward, next_obs, terminated):
        row, i = self.data, self.ptr
        row["obs"][i], row["next_obs"][i] = obs, next_obs
        row["actions"][i] = torch.as_tensor(chosen_action, device=row["actions"].device)
        row["rewards"][i], row["terminations"][i] = float(reward), float(terminated)
        self.advance()


# ALGO LOGIC: the TD3 losses
def td_target(critic_target, actor_target, next_obs, reward, termination, gamma, policy_noise, noise_clip):
    """y = r + γ (1 − terminated) min_i Q'_i(s', clip(π'(s') + clip(ε, −c, c)))  with ε ~ N(0, σ²), in action units.
    Truncated transitions have termination = 0, so they bootstrap."""
    with torch.no_grad():
        scale, bias = actor_target.action_scale, actor_target.action_bias
        noise = torch.randn(reward.shape[0], scale.shape[0], device=reward.device) * policy_noise
        noise = noise.clamp(-noise_clip, noise_clip)
        next_action = (actor_target(next_obs) + noise * scale).clamp(bias - scale, bias + scale)
        next_q = critic_target(next_obs, next_action).min(0).values
        return reward + gamma * (1.0 - termination) * next_q


def td3_actor_loss(actor: Actor, critic: Critic, obs: torch.Tensor) -> torch.Tensor:
    """Plain TD3: −mean Q1(s, π(s)); no behaviour-cloning term."""
    return -critic.q1(obs, actor(obs)).mean()


def soft_update(targets: list, sources: list, tau: float):
    """θ' ← τ θ + (1 − τ) θ' for every parameter of every target network, in one fused foreach call."""
    with torch.no_grad():
        torch._foreach_lerp_(
            [p for m in targets for p in m.parameters()], [p for m in sources for p in m.parameters()], tau
        )


# ALGO LOGIC: one TD3 update, in two halves with static shapes; the actor delay stays outside them
def make_update(actor, critic, actor_target, critic_target, actor_optimizer, critic_optimizer, args: "Args"):
    """-> update_critic(obs, actions, rewards, next_obs, terminations) -> (critic_loss, q1_mean) and update_actor(obs)
    -> actor_loss. They return tensors, never Python numbers: nothing waits for the device. Unlike TD3+BC's update,
    the critic's half takes its batch: the online buffer grows every step, so its sampling cannot be captured."""

    def update_critic(obs, actions, rewards, next_obs, terminations):
        smoothing = {"policy_noise": args.policy_noise, "noise_clip": args.noise_clip}  # target policy smoothing
        y = td_target(critic_target, actor_target, next_obs, rewards, terminations, gamma=args.gamma, **smoothing)
        q = critic(obs, actions)
        critic_loss = ((q - y) ** 2).mean(1).sum()  # MSE of Q1 plus MSE of Q2
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()
        return critic_loss.detach(), q[0].mean().detach()

    def update_actor(obs):
        actor_loss = td3_actor_loss(actor, critic, obs)
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=list(actor.parameters()))  # no gradients for the critic's weights: not needed
        actor_optimizer.step()
        soft_update([actor_target, critic_target], [actor, critic], args.tau)
        return actor_loss.detach()

    if args.compile:  # the fast path (benchmarks/fast_path.py): compile each half, as LeanRL does
        update_critic, update_actor = torch.compile(update_critic), torch.compile(update_actor)
    if args.cudagraphs:  # or capture each half in a CUDA graph once, then replay it
        update_critic, update_actor = CudaGraph(update_critic), CudaGraph(update_actor)
    return update_critic, update_actor


# Setup and bookkeeping (main reads them by name)
def check_args(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    if not args.q_min <= args.q_init <= args.q_max:
        raise UserError("need --q-min <= --q-init <= --q-max")
    setup_fast_path(args)


def load_inputs(args: Args) -> tuple:
    """The TD3+BC checkpoint and the DE perturbations made for it -> (checkpoint, perturbations, perturbations path)."""
    args.checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    checkpoint = load_checkpoint(args.checkpoint)
    if args.capture_video:  # before any file is written
        check_rendering(checkpoint["env_id"], checkpoint.get("max_episode_steps"))
    path = args.perturbations or os.path.join(os.path.dirname(args.checkpoint) or ".", "perturbations.npz")
    width = PERTURBATION.width(checkpoint["obs_dim"], checkpoint["act_dim"])
    perturbations = load_perturbations(path, checkpoint["env_id"])
    PERTURBATION.check(perturbations, f"the δ set {path}", f"{STAGE}.py")  # what it perturbs first, then its width
    check_fit(perturbations, path, checkpoint["env_id"], width)
    return checkpoint, perturbations, path


def resolve_learning_starts(args: Args) -> int:
    """--learning-starts, or TD3's 25k uniform-random steps for scratch and one batch for an offline start."""
    if args.learning_starts is not None:
        return args.learning_starts
    return 25_000 if args.init == "scratch" else args.batch_size


def make_training_env(args: Args, env_id: str, max_steps: int | None, perturbations: dict, q: float) -> gym.Env:
    """The env, wrapped to inject δ per episode with probability q under the fine-tuning condition."""
    epsilon, perturbation_model = float(perturbations["epsilon"]), str(perturbations["perturbation_model"])
    env = gym.make(env_id, max_episode_steps=max_steps)
    deltas = perturbations["perturbations"]
    env = ActionPerturbation(env, epsilon, perturbation_model, args.finetune_condition, deltas, q=q)
    env.action_space.seed(args.seed)
    return env


def make_evaluator(args: Args, env_id: str, max_steps: int | None, perturbations: dict) -> ConditionEvaluator:
    """The same episodes under normal (δ = 0), random (the .npz's draws) and adversarial ({δ_a}) conditions."""
    deltas, model = perturbations["perturbations"], str(perturbations["perturbation_model"])
    normal, random = np.zeros((1, deltas.shape[1])), perturbations["random_deltas"]
    conditions = {"normal": normal, "random": random, "adversarial": deltas}
    return ConditionEvaluator(env_id, max_steps, conditions, args.eval_episodes, args.eval_seed, model, PERTURBATION)


def default_run_name(args: Args, env_id: str) -> str:
    arm = f"{args.init}-{args.finetune_condition}-{args.curriculum}"
    return f"{env_id}__{args.exp_name}__{arm}__{args.seed}__{int(time.time())}"


def make_learner(ckpt: dict, args: Args, device) -> tuple:
    """Actor, twin critic, targets and Adams: the checkpoint's for --init offline (bar the Adams --reset-optimizers
    names), with its obs statistics and offline data; fresh, raw, none for scratch. -> (modules, mean, std, data)"""
    obs_dim, act_dim, hidden_dim = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]
    actor = Actor(obs_dim, act_dim, ckpt["action_low"], ckpt["action_high"], hidden_dim).to(device)
    critic = Critic(obs_dim, act_dim, hidden_dim).to(device)
    targets = {"actor_target": copy.deepcopy(actor), "critic_target": copy.deepcopy(critic)}
    modules = {"actor": actor, "critic": critic, **targets}
    modules["actor_optimizer"] = adam(actor.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    modules["critic_optimizer"] = adam(critic.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    if args.init == "scratch":  # TD3 from random init, no offline data, raw observations
        return modules, torch.zeros(obs_dim, device=device), torch.ones(obs_dim, device=device), None
    fresh = {"none": (), "actor": ("actor_optimizer",), "both": ("actor_optimizer", "critic_optimizer")}
    kept = {name: module for name, module in modules.items() if name not in fresh[args.reset_optimizers]}
    load_module_states(kept, ckpt, device, capturable=args.cudagraphs)
    obs_mean, obs_std = ckpt["obs_mean"].to(device), ckpt["obs_std"].to(device)
    return modules, obs_mean, obs_std, offline_transitions(ckpt["dataset_id"], obs_mean, obs_std, device)


def checkpoint_header(args: Args, ckpt: dict, obs_mean, obs_std, ref_min, ref_max, perturbations: dict, path: str):
    """What every fine-tuning checkpoint holds besides the networks and the step's results (docs/file_contracts.md)."""
    copied = ("env_id", "dataset_id", "obs_dim", "act_dim", "hidden_dim", "action_low", "action_high")
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "stage": STAGE,
        "args": dataclasses.asdict(args),
        **{key: ckpt[key] for key in copied},
        "max_episode_steps": ckpt.get("max_episode_steps"),
        "obs_mean": obs_mean.cpu(),
        "obs_std": obs_std.cpu(),
        "ref_min_score": ref_min,
        "ref_max_score": ref_max,
        **{key: getattr(args, key) for key in ("init", "finetune_condition", "curriculum")},
        "epsilon": float(perturbations["epsilon"]),
        **PERTURBATION.record(str(perturbations["perturbation_model"])),
        "perturbations_path": path,
        "perturbations_sha256": sha256_file(path),
        "initial_checkpoint": args.checkpoint,
    }


def save_policy(run_dir: str, checkpoint: dict, args: Args):
    """checkpoint.pt, and a copy as checkpoint_step{N}.pt at each of the last --keep-checkpoints evaluations."""
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint)
    evaluations = sorted({*range(args.eval_freq, args.total_steps + 1, args.eval_freq), args.total_steps})
    if args.keep_checkpoints and checkpoint["step"] in evaluations[-args.keep_checkpoints :]:
        save_checkpoint(os.path.join(run_dir, f"checkpoint_step{checkpoint['step']}.pt"), checkpoint)


def restore(resumed: dict, modules: dict, online: OnlineBuffer, env: gym.Env, device, args: Args) -> tuple:
    """A resumed run's networks, buffer, env and RNGs, as state.pt left them. -> (counters, norm_obs, losses)"""
    load_module_states(modules, resumed, device, capturable=args.cudagraphs)
    online.load_state_dict(resumed)
    set_env_state(env, resumed["env"])
    set_rng_state(resumed["rng"])
    print(f"resuming at step {resumed['step']}")
    return EpisodeCounters(**resumed["episode"]), resumed["norm_obs"].to(device), resumed["losses"].to(device)


def evaluation_summary(m: dict) -> dict:
    """The checkpoint's headline: the normal condition's mean return and normalized score."""
    return {"eval_return": m["eval/normal_return"], "eval_normalized_score": m["eval/normal_normalized"]}


@dataclass
class EpisodeCounters:
    """The training episodes' bookkeeping: the current episode's return, length and whether its δ ≠ 0, and the
    realized exposure so far (episodes and env steps under a non-zero δ). Saved and restored by name."""

    episode_return: float = 0.0
    episode_len: int = 0
    perturbed: bool = False
    episodes: int = 0
    perturbed_episodes: int = 0
    steps: int = 0
    perturbed_steps: int = 0

    def start(self, delta: np.ndarray):
        self.episode_return, self.episode_len, self.perturbed = 0.0, 0, bool(np.any(delta))
        self.episodes, self.perturbed_episodes = self.episodes + 1, self.perturbed_episodes + int(self.perturbed)

    def step(self, reward: float):
        self.episode_return, self.episode_len = self.episode_return + float(reward), self.episode_len + 1
        self.steps, self.perturbed_steps = self.steps + 1, self.perturbed_steps + int(self.perturbed)

    def episode_metrics(self) -> dict:
        names = ("charts/episodic_return", "charts/episodic_length", "charts/perturbed")
        return dict(zip(names, (self.episode_return, self.episode_len, self.perturbed)))

    def exposure(self) -> dict:
        """Fractions of the training episodes (the current one included) and env steps that ran under δ ≠ 0."""
        episodes, steps = self.perturbed_episodes / max(self.episodes, 1), self.perturbed_steps / max(self.steps, 1)
        return {"charts/perturbed_fraction": episodes, "charts/perturbed_step_fraction": steps}


def main(args: Args):
    # TRY NOT TO MODIFY: the inputs, checked; the run folder; seeding and the device
    check_args(args)
    ckpt, perturbations, npz_path = load_inputs(args)
    env_id, max_steps = ckpt["env_id"], ckpt.get("max_episode_steps")
    ref_min, ref_max = reference_scores(ckpt, args.ref_min_score, args.ref_max_score, args.curriculum == "adaptive")
    learning_starts = resolve_learning_starts(args)
    run_name = args.run_name or default_run_name(args, env_id)
    run_dir, resumed = open_run(args, run_name, STAGE, "state.pt")
    if already_complete(resumed, args.total_steps, run_dir):
        return
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the networks from the offline checkpoint (the BC term is gone from here on), or fresh for the scratch baseline
    modules, obs_mean, obs_std, offline = make_learner(ckpt, args, device)
    actor = modules["actor"]
    update_critic, update_actor = make_update(**modules, args=args)
    online = OnlineBuffer(args.buffer_size or args.total_steps, ckpt["obs_dim"], ckpt["act_dim"], device)

    # the training env injects δ per episode with probability q; evaluation plays fixed episodes under every condition
    q = args.q if args.curriculum == "fixed" else args.q_init
    env = make_training_env(args, env_id, max_steps, perturbations, q)
    evaluator = make_evaluator(args, env_id, max_steps, perturbations)
    header = checkpoint_header(args, ckpt, obs_mean, obs_std, ref_min, ref_max, perturbations, npz_path)
    run = Run(run_dir, run_name, args, resumed, env_id=env_id, perturbations=npz_path, learning_starts=learning_starts)
    low, high = ckpt["action_low"].to(device), ckpt["action_high"].to(device)  # the action bounds

    def normalize(obs) -> torch.Tensor:
        return (torch.as_tensor(obs, dtype=torch.float32, device=device) - obs_mean) / obs_std

    def evaluate(step: int) -> dict:
        policy, mean, std = copy.deepcopy(actor).cpu(), obs_mean.cpu(), obs_std.cpu()
        if args.capture_video:
            record_condition(evaluator, run, step, policy, mean, std, "adversarial")
        return condition_metrics(evaluator(policy, mean, std), ref_min, ref_max)

    def save(step: int):  # TRY NOT TO MODIFY: checkpoint.pt, the policy and its evaluation; state.pt, all of the run
        losses = torch.stack([critic_loss, q1_mean, actor_loss]).cpu()
        results = {"step": step, "eval": eval_metrics, "q": q, "q_ema": ema, **evaluation_summary(eval_metrics)}
        checkpoint = {**header, **results, **module_states(modules)}
        save_policy(run_dir, checkpoint, args)
        loop = {"env": env_state(env), "norm_obs": norm_obs.cpu(), "episode": dataclasses.asdict(counters)}
        state = {**checkpoint, **loop, **online.state_dict(), "losses": losses, "learning_starts": learning_starts}
        save_checkpoint(os.path.join(run_dir, "state.pt"), {**state, **run.resume_state()})

    # the loop's state: fresh (with evaluation 0 of the starting policy, which seeds the EMA R̄_0 = R_0), or resumed
    start_step, counters = 0, EpisodeCounters()
    critic_loss, q1_mean, actor_loss = torch.zeros(3, device=device)
    sentinel = NonFiniteSentinel(device, "step", run_dir)  # remembers the first non-finite loss without a sync per step
    obs, info = env.reset(seed=args.seed)
    norm_obs = normalize(obs)
    counters.start(info["delta"])
    if resumed is None:
        eval_metrics = evaluate(0)
        ema = eval_metrics["eval/normal_normalized"]
        run.log({"step": 0, **eval_metrics, "curriculum/q": q, "curriculum/ema": ema})
    else:  # TRY NOT TO MODIFY: continue exactly where state.pt left off
        counters, norm_obs, (critic_loss, q1_mean, actor_loss) = restore(resumed, modules, online, env, device, args)
        start_step, q, ema, eval_metrics = resumed["step"], resumed["q"], resumed["q_ema"], resumed["eval"]
    start_time, steps = time.time(), range(start_step + 1, args.total_steps + 1)
    pbar = tqdm(steps, initial=start_step, total=args.total_steps, desc=STAGE, mininterval=2)
    for step in pbar:
        # ALGO LOGIC: act. The policy chooses a; the wrapper executes ã = perturb(a, δ); the buffer keeps a.
        if args.init == "scratch" and step <= learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                a = actor(norm_obs)
                a = (a + torch.randn_like(a) * actor.action_scale * args.exploration_noise).clamp(low, high)
            action = a.cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        norm_next_obs = normalize(next_obs)
        online.add(norm_obs, action, reward, norm_next_obs, terminated)
        counters.step(reward)
        norm_obs = norm_next_obs
        if terminated or truncated:
            run.log({"step": step, **counters.episode_metrics(), "curriculum/q": q})
            env.q = q  # the curriculum's current q decides whether the next episode is perturbed
            obs, info = env.reset()
            norm_obs = normalize(obs)
            counters.start(info["delta"])

        # ALGO LOGIC: TD3 update on a batch with r_off offline rows
        if step > learning_starts:
            batch = mixed_batch(online, offline, args.batch_size, args.r_off)  # (s, a, r, s', terminated)
            critic_loss, q1_mean = update_critic(*batch)
            if step % args.policy_frequency == 0:
                actor_loss = update_actor(batch[0])
            sentinel.watch(critic_loss + actor_loss, step)

        # ALGO LOGIC: the curriculum of q, and evaluation (which the adaptive curriculum reads)
        if args.curriculum == "linear":
            q = linear_q(step, args.total_steps, q_init=args.q_init, q_max=args.q_max)
        if step % args.eval_freq == 0 or step == args.total_steps:
            sentinel.check()
            eval_metrics = evaluate(step)
            if args.curriculum == "adaptive":
                R = eval_metrics["eval/normal_normalized"]
                q, ema = adaptive_q(q, ema, R, beta=args.beta, eta=args.eta, q_min=args.q_min, q_max=args.q_max)
            losses = {"critic_loss": critic_loss, "q1_mean": q1_mean, "actor_loss": actor_loss}
            charts = {**counters.exposure(), "charts/sps": (step - start_step) / (time.time() - start_time)}
            losses = {f"losses/{name}": value.item() for name, value in losses.items()}
            run.log({"step": step, **eval_metrics, **losses, "curriculum/q": q, "curriculum/ema": ema, **charts})
            pbar.set_postfix(normal=f"{eval_metrics['eval/normal_return']:.0f}", q=f"{q:.2f}")
            save(step)
    pbar.close()
    run.close()
    final = ", ".join(f"{c} {eval_metrics[f'eval/{c}_return']:.1f}" for c in CONDITIONS)
    print(f"done: {time.time() - start_time:.1f}s; final returns {final}; q = {q:.3f}; {run_dir}/checkpoint.pt")


if __name__ == "__main__":
    cli(main, Args)
