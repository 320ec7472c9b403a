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
from typing import Annotated, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from runtime import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, ConditionEvaluator, EpisodeCounters, NonFiniteSentinel, Range,
                     RingBuffer, Run, UserError, accelerate, adam, check_fast_path_args, check_ranges, check_rendering, cli,
                     condition_metrics, default_checkpoint, env_state, finished, load_checkpoint, load_module_states,
                     load_perturbations, module_states, offline_transitions, open_run, reference_scores, rng_state,
                     save_checkpoint, seed_everything, set_env_state, set_rng_state, sha256_file)

STAGE = os.path.splitext(os.path.basename(__file__))[0]  # the checkpoints' stage tag: a fork under a new name has its own


@dataclass
class Args:
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
    checkpoint: Optional[str] = None
    """TD3+BC checkpoint (if unset: the first of DEFAULT_CHECKPOINTS that exists: full-scale, then run_pipeline.sh's)"""
    perturbations: Optional[str] = None
    """.npz from de_perturbations.py (if unset: perturbations.npz next to the checkpoint); gives {δ_a}, ε and the model"""

    # TD3
    total_steps: Annotated[int, Range(1)] = 1_000_000
    """online env steps (the paper fine-tunes for 1M-3M)"""
    learning_starts: Annotated[Optional[int], Range(0)] = None
    """steps before updates begin (if unset: 25k uniform-random steps for scratch; batch size for offline init)"""
    buffer_size: Annotated[Optional[int], Range(1)] = None
    """online replay capacity (if unset: total steps)"""
    batch_size: Annotated[int, Range(1)] = 256
    """minibatch size"""
    learning_rate: Annotated[float, Range(0, open="lo")] = 3e-4
    """Adam learning rate"""
    reset_optimizers: Literal["none", "actor", "both"] = "actor"
    """Adam states that start fresh instead of the checkpoint's: none, the actor's (TD3+BC scaled its gradient by λ), or
    both (docs/td3_adv_finetune.md: the pilot behind the default)"""
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
    ref_min_score: Annotated[Optional[float], Range()] = None
    """override the checkpoint's reference return for normalized score 0"""
    ref_max_score: Annotated[Optional[float], Range()] = None
    """override the checkpoint's reference return for normalized score 100"""

    # fast path (benchmarks/fast_path.py measures it); the defaults are exact fp32 and run anywhere
    compile: bool = False
    """torch.compile the two halves of the update"""
    cudagraphs: bool = False
    """capture the two halves of the update in CUDA graphs (CUDA only; capturable fused Adam; not with --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """torch.set_float32_matmul_precision: highest (fp32), high (TF32 on CUDA), medium (bf16 matmuls: CUDA, CPUs with AMX)"""

    # run management
    exp_name: str = STAGE
    """the name of this experiment (the script's file name, so a fork's runs are named after the fork)"""
    run_name: Optional[str] = None
    """output folder under runs/ (if unset: {env}__{exp_name}__{init}-{condition}-{curriculum}__{seed}__{unix time})"""
    overwrite: bool = False
    """replace an existing run folder of the same name"""
    resume: bool = False
    """continue the run runs/{run_name}/ (give --run-name) from its last state.pt (same arguments; --total-steps may grow)"""
    seed: Annotated[int, Range(0)] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "robust-o2o"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record each evaluation's first adversarial episode (δ_0) into runs/{run_name}/videos/ and W&B (needs MUJOCO_GL=egl)"""


# ALGO LOGIC: networks (copies of td3_bc_offline.py's; tests/test_contracts.py proves the copies agree)
class Actor(nn.Module):
    """Deterministic policy π(s): 2×hidden ReLU MLP, tanh output rescaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, hidden_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, act_dim), nn.Tanh())
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.action_scale + self.action_bias


class VectorizedLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: x [n, B, in] -> [n, B, out]."""

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        bound = 1 / in_features ** 0.5  # the same init as nn.Linear
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [k, B, in] uses the first k of the n layers
        return torch.baddbmm(self.bias[:x.shape[0]], x, self.weight[:x.shape[0]])


class Critic(nn.Module):
    """Twin Q-networks Q1, Q2 (2×hidden ReLU MLPs) evaluated as one batched call: returns [2, B] ([heads, B] if given)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256, n: int = 2):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(VectorizedLinear(obs_dim + act_dim, hidden_dim, n), nn.ReLU(),
                                 VectorizedLinear(hidden_dim, hidden_dim, n), nn.ReLU(), VectorizedLinear(hidden_dim, 1, n))

    def forward(self, obs: torch.Tensor, act: torch.Tensor, heads: Optional[int] = None) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        x = x.unsqueeze(0).expand(heads or self.n, *x.shape) if x.dim() == 2 else x
        return self.net(x).squeeze(-1)


# ALGO LOGIC: the perturbation model (a verbatim copy of de_perturbations.py's; tests prove the copies agree)
PERTURBATION_MODELS = ("multiplicative", "additive")
CONDITIONS = ("normal", "random", "adversarial")


def perturb_action(action: np.ndarray, delta: np.ndarray, low: np.ndarray, high: np.ndarray, model: str) -> np.ndarray:
    """Executed action ã for the chosen action a under perturbation δ; works row-wise on batches [..., Na]."""
    if model == "multiplicative":
        executed = action * (1.0 + delta)
    elif model == "additive":
        executed = action + delta * (high - low) / 2.0
    else:
        raise ValueError(f"unknown perturbation model {model!r}")
    return np.clip(executed, low, high).astype(action.dtype, copy=False)


class ActionPerturbation(gym.ActionWrapper):
    """Injects a per-episode perturbation δ into executed actions.

    At each reset: `reset(options={"delta": δ})` pins δ for that episode; otherwise, with probability q, δ is drawn by
    the condition (random: U([−ε, ε]^Na); adversarial: uniformly from `deltas`; normal: 0), and δ = 0 with
    probability 1 − q. The draw uses the wrapper's own RNG (seeded by reset(seed=...)), never the env's, so the
    env's start states do not depend on the condition. `reset` reports δ in info["delta"]."""

    def __init__(self, env: gym.Env, epsilon: float, model: str = "multiplicative", condition: str = "normal",
                 deltas: Optional[np.ndarray] = None, q: float = 1.0):
        super().__init__(env)
        if condition not in CONDITIONS or model not in PERTURBATION_MODELS:
            raise ValueError(f"condition must be one of {CONDITIONS} and model one of {PERTURBATION_MODELS}")
        if condition == "adversarial" and (deltas is None or len(deltas) == 0):
            raise ValueError("the adversarial condition needs a non-empty set of deltas")
        self.epsilon, self.model, self.condition, self.q = epsilon, model, condition, q
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
        return perturb_action(np.asarray(action), self.delta, self.low, self.high, self.model)


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


class OnlineBuffer(RingBuffer):
    """Ring buffer of online transitions on the training device: normalized s and s', the action the policy CHOSE
    (never the executed, perturbed one), r, and terminated (truncations are stored as 0 so they bootstrap).
    It saves and restores itself (runtime.RingBuffer), also into a larger capacity on a longer resume."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device):
        super().__init__(capacity, {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_obs": (obs_dim,),
                                    "terminations": ()}, device)

    def add(self, obs, chosen_action, reward, next_obs, terminated):
        d, i = self.data, self.ptr
        d["obs"][i], d["next_obs"][i] = obs, next_obs
        d["actions"][i] = torch.as_tensor(chosen_action, device=d["actions"].device)
        d["rewards"][i], d["terminations"][i] = float(reward), float(terminated)
        self.advance()


def td_target(critic_target: Critic, actor_target: Actor, next_obs, reward, termination, gamma: float,
              policy_noise: float, noise_clip: float) -> torch.Tensor:
    """y = r + γ (1 − terminated) min_i Q'_i(s', clip(π'(s') + clip(ε, −c, c)))  with ε ~ N(0, σ²), in action units.
    Truncated transitions have termination = 0, so they bootstrap."""
    with torch.no_grad():
        scale, bias = actor_target.action_scale, actor_target.action_bias
        noise = (torch.randn(reward.shape[0], scale.shape[0], device=reward.device) * policy_noise).clamp(-noise_clip, noise_clip)
        next_action = (actor_target(next_obs) + noise * scale).clamp(bias - scale, bias + scale)
        next_q = critic_target(next_obs, next_action).min(0).values
        return reward + gamma * (1.0 - termination) * next_q


def td3_actor_loss(actor, critic, obs):
    """Plain TD3: −mean Q1(s, π(s)); no behaviour-cloning term."""
    return -critic(obs, actor(obs), heads=1)[0].mean()


def soft_update(targets: list, sources: list, tau: float):
    """θ' ← τ θ + (1 − τ) θ' for every parameter of every target network, in one fused foreach call."""
    with torch.no_grad():
        torch._foreach_lerp_([p for m in targets for p in m.parameters()], [p for m in sources for p in m.parameters()], tau)


# ALGO LOGIC: one TD3 update, in two halves with static shapes; the actor delay stays outside them
def make_update(actor, critic, actor_target, critic_target, actor_optimizer, critic_optimizer, args):
    """-> update_critic(obs, actions, rewards, next_obs, terminations) -> (critic_loss, q1_mean) and update_actor(obs)
    -> actor_loss. They return tensors, never Python numbers: nothing waits for the device."""

    def update_critic(obs, actions, rewards, next_obs, terminations):
        y = td_target(critic_target, actor_target, next_obs, rewards, terminations, args.gamma, args.policy_noise, args.noise_clip)
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

    return accelerate(update_critic, args), accelerate(update_actor, args)


def check_args(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    if not args.q_min <= args.q_init <= args.q_max:
        raise UserError("need --q-min <= --q-init <= --q-max")
    check_fast_path_args(args)


def main(args: Args):
    check_args(args)
    args.checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    ckpt = load_checkpoint(args.checkpoint)
    pert_path = args.perturbations or os.path.join(os.path.dirname(args.checkpoint) or ".", "perturbations.npz")
    pert = load_perturbations(pert_path, ckpt["env_id"], ckpt["act_dim"])
    eps, model, deltas = float(pert["epsilon"]), str(pert["perturbation_model"]), pert["perturbations"]
    env_id, obs_dim, act_dim, max_steps = ckpt["env_id"], ckpt["obs_dim"], ckpt["act_dim"], ckpt.get("max_episode_steps")
    ref_min, ref_max = reference_scores(ckpt, args.ref_min_score, args.ref_max_score, required=args.curriculum == "adaptive")
    scratch = args.init == "scratch"
    learning_starts = args.learning_starts if args.learning_starts is not None else (25_000 if scratch else args.batch_size)
    run_name = args.run_name or (f"{env_id}__{args.exp_name}__{args.init}-{args.finetune_condition}-{args.curriculum}"
                                 f"__{args.seed}__{int(time.time())}")
    run_dir, resumed = open_run(args, run_name, STAGE, "state.pt")
    if finished(resumed, args.total_steps, run_dir):
        return
    if args.capture_video:
        check_rendering(env_id, max_steps)

    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the networks: from the offline checkpoint (the BC term is gone from here on), or fresh for the scratch baseline
    low, high = ckpt["action_low"].numpy(), ckpt["action_high"].numpy()
    actor = Actor(obs_dim, act_dim, low, high, ckpt["hidden_dim"]).to(device)
    critic = Critic(obs_dim, act_dim, ckpt["hidden_dim"]).to(device)
    actor_optimizer = adam(actor.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    critic_optimizer = adam(critic.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    modules = {"actor": actor, "critic": critic, "actor_target": actor_target, "critic_target": critic_target,
               "actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    if scratch:  # TD3 from random init, no offline data, raw observations
        obs_mean, obs_std, offline = torch.zeros(obs_dim, device=device), torch.ones(obs_dim, device=device), None
    else:
        fresh = {"none": (), "actor": ("actor_optimizer",), "both": ("actor_optimizer", "critic_optimizer")}[args.reset_optimizers]
        load_module_states({k: m for k, m in modules.items() if k not in fresh}, ckpt, device, args.cudagraphs)
        obs_mean, obs_std = ckpt["obs_mean"].to(device), ckpt["obs_std"].to(device)
        offline = offline_transitions(ckpt["dataset_id"], obs_mean, obs_std, device)
    update_critic, update_actor = make_update(actor, critic, actor_target, critic_target, actor_optimizer, critic_optimizer, args)
    online = OnlineBuffer(args.buffer_size or args.total_steps, obs_dim, act_dim, device)

    # the training env injects δ per episode with probability q; evaluation plays fixed episodes under every condition
    env = ActionPerturbation(gym.make(env_id, max_episode_steps=max_steps), eps, model, args.finetune_condition, deltas,
                             q=args.q if args.curriculum == "fixed" else args.q_init)
    env.action_space.seed(args.seed)
    evaluator = ConditionEvaluator(env_id, max_steps, {"normal": np.zeros((1, act_dim)), "random": pert["random_deltas"],
                                                       "adversarial": deltas}, args.eval_episodes, args.eval_seed, model, perturb_action)
    run = Run(run_dir, run_name, args, resumed, env_id=env_id, perturbations=pert_path, learning_starts=learning_starts,
              epsilon=eps, perturbation_model=model)

    def evaluate(step: int) -> dict:  # the same episodes under normal, random (the .npz's draws) and adversarial δ
        policy, mean, std = copy.deepcopy(actor).cpu(), obs_mean.cpu(), obs_std.cpu()
        if args.capture_video:
            evaluator.record(run, step, policy, mean, std, "adversarial")
        return condition_metrics(evaluator(policy, mean, std), ref_min, ref_max)

    # what every checkpoint holds besides the networks and the step's results (docs/file_contracts.md)
    header = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "stage": STAGE, "args": dataclasses.asdict(args),
              **{k: ckpt[k] for k in ("env_id", "dataset_id", "obs_dim", "act_dim", "hidden_dim", "action_low", "action_high")},
              "max_episode_steps": max_steps, "obs_mean": obs_mean.cpu(), "obs_std": obs_std.cpu(), "ref_min_score": ref_min,
              "ref_max_score": ref_max, "init": args.init, "finetune_condition": args.finetune_condition, "epsilon": eps,
              "curriculum": args.curriculum, "perturbation_model": model, "perturbations_path": pert_path,
              "perturbations_sha256": sha256_file(pert_path), "initial_checkpoint": args.checkpoint}
    low_t, high_t = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)

    def normalize(o) -> torch.Tensor:
        return (torch.as_tensor(o, dtype=torch.float32, device=device) - obs_mean) / obs_std

    # the loop's state: fresh (with evaluation 0 of the starting policy, which seeds the EMA R̄_0 = R_0), or resumed
    start_step, q = 0, env.q
    critic_loss = q1_mean = actor_loss = torch.zeros((), device=device)
    sentinel = NonFiniteSentinel(device, "step", run_dir)  # remembers the first non-finite loss without a sync per step
    obs, info = env.reset(seed=args.seed)
    counters = EpisodeCounters()
    counters.start(info["delta"])
    if resumed is None:
        row = evaluate(0)
        ema = row["eval/normal_normalized"]
        run.log({"step": 0, **row, "curriculum/q": q, "curriculum/ema": ema})
        obs_n = normalize(obs)
    else:
        load_module_states(modules, resumed, device, args.cudagraphs)
        online.load_state_dict(resumed)
        critic_loss, q1_mean, actor_loss = resumed["losses"].to(device)
        q, ema, row, start_step, obs_n = resumed["q"], resumed["q_ema"], resumed["eval"], resumed["step"], resumed["obs_n"].to(device)
        counters = EpisodeCounters(**resumed["episode"])
        set_env_state(env, resumed["env"])
        set_rng_state(resumed["rng"])
        print(f"resuming {run_dir} at step {start_step}")
    start_time = time.time()
    pbar = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps, desc=STAGE, mininterval=2)
    for step in pbar:
        # ALGO LOGIC: act. The policy chooses a; the wrapper executes ã = perturb(a, δ); the buffer keeps a.
        if scratch and step <= learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                a = actor(obs_n)
                a = (a + torch.randn_like(a) * actor.action_scale * args.exploration_noise).clamp(low_t, high_t)
            action = a.cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        next_obs_n = normalize(next_obs)
        online.add(obs_n, action, reward, next_obs_n, terminated)
        counters.step(reward)
        obs_n = next_obs_n
        if terminated or truncated:
            run.log({"step": step, "charts/episodic_return": counters.episode_return,
                     "charts/episodic_length": counters.episode_len, "charts/perturbed": counters.perturbed, "curriculum/q": q})
            env.q = q  # the curriculum's current q decides whether the next episode is perturbed
            obs, info = env.reset()
            obs_n = normalize(obs)
            counters.start(info["delta"])

        # ALGO LOGIC: TD3 update on a batch with r_off offline rows
        if step > learning_starts:
            k_off = batch_split(args.batch_size, args.r_off, online.size, offline is not None)
            parts = [sample(online.data, online.size, args.batch_size - k_off)] if k_off < args.batch_size else []
            if k_off:
                parts.append(sample(offline, offline["obs"].shape[0], k_off))
            b_obs, b_act, b_rew, b_next, b_term = (torch.cat(x) for x in zip(*parts))
            critic_loss, q1_mean = update_critic(b_obs, b_act, b_rew, b_next, b_term)
            if step % args.policy_frequency == 0:
                actor_loss = update_actor(b_obs)
            sentinel.watch(critic_loss + actor_loss, step)

        # ALGO LOGIC: the curriculum of q, and evaluation (which the adaptive curriculum reads)
        if args.curriculum == "linear":
            q = linear_q(step, args.total_steps, args.q_init, args.q_max)
        if step % args.eval_freq == 0 or step == args.total_steps:
            sentinel.check()
            row = evaluate(step)
            if args.curriculum == "adaptive":
                q, ema = adaptive_q(q, ema, row["eval/normal_normalized"], args.beta, args.eta, args.q_min, args.q_max)
            losses = {"losses/critic_loss": critic_loss.item(), "losses/q1_mean": q1_mean.item(), "losses/actor_loss": actor_loss.item()}
            run.log({"step": step, **row, **losses, "curriculum/q": q, "curriculum/ema": ema,
                     **counters.exposure(), "charts/sps": (step - start_step) / (time.time() - start_time)})
            pbar.set_postfix(normal=f"{row['eval/normal_return']:.0f}", adv=f"{row['eval/adversarial_return']:.0f}", q=f"{q:.2f}")
            result = {**header, "step": step, **module_states(modules), "eval_return": row["eval/normal_return"],
                      "eval_normalized_score": row["eval/normal_normalized"], "eval": row, "q": q, "q_ema": ema}
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), result)
            # what continuing needs besides: the RNGs, the env mid-episode, the online buffer, the counters
            save_checkpoint(os.path.join(run_dir, "state.pt"), {
                **result, "rng": rng_state(), "env": env_state(env), "obs_n": obs_n.cpu(), **online.state_dict(),
                "episode": dataclasses.asdict(counters), "learning_starts": learning_starts,
                "metrics_bytes": run.metrics.tell(), "losses": torch.stack([critic_loss, q1_mean, actor_loss]).cpu()})
    pbar.close()
    run.close()
    print(f"done: {args.total_steps - start_step} steps in {time.time() - start_time:.1f}s; final returns " + ", ".join(
        f"{c} {row[f'eval/{c}_return']:.1f}" for c in CONDITIONS) + f"; q = {q:.3f}; checkpoint {run_dir}/checkpoint.pt")


if __name__ == "__main__":
    cli(main, Args)
