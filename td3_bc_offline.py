# Stage 1 of robust offline-to-online RL by adversarial fine-tuning (Ayabe, Kera & Kawamoto, arXiv 2510.13358):
# TD3+BC pretraining (Fujimoto & Gu, 2021, arXiv 2106.06860) on a Minari dataset -> checkpoint.
"""TD3+BC: TD3 whose actor loss is  -λ Q1(s, π(s)) + ‖π(s) − a‖²  with  λ = α / mean|Q1(s, π(s))|.

Observations are normalized by the dataset's mean/std (stored in the checkpoint and used when acting).
Targets bootstrap through truncations (time limits), not through terminations.
Outputs in runs/{run_name}/: checkpoint.pt (schema in docs/file_contracts.md), metrics.jsonl, args.json.
"""

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Annotated

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from robust_o2o.cli import Range, UserError, check_ranges, cli
from robust_o2o.datasets import dataset_to_transitions, reading_dataset
from robust_o2o.envs import make_env
from robust_o2o.evaluation import normalized_score
from robust_o2o.fast_path import CudaGraph, FastPathOptions, adam, setup_fast_path
from robust_o2o.files import save_checkpoint
from robust_o2o.formats import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from robust_o2o.resume import load_module_states, module_states, set_rng_state
from robust_o2o.runs import NonFiniteSentinel, Run, RunOptions, already_complete, open_run, seed_everything

# the checkpoints' stage tag: a fork under a new name has its own
STAGE = os.path.splitext(os.path.basename(__file__))[0]


@dataclass
class Args(RunOptions, FastPathOptions):  # the flags the shared plumbing reads (--cuda, --track, ...) come first
    # the paper's knob: α weighs the Q term against the BC term
    alpha: Annotated[float, Range(0)] = 2.5
    """α of TD3+BC: λ = α / mean|Q(s, π(s))| weighs the Q term against the BC term"""

    # data
    dataset_id: str = "local/hopper/medium-v0"
    """Minari dataset id: one made by collect_dataset.py (local/...), or an official one such as
    mujoco/hopper/medium-v0"""
    env_id: str | None = None
    """evaluation env id (if unset: the dataset's own eval env)"""
    download: bool = True
    """download the dataset from Minari's remote if it is not in the local store (never for the local/ namespace)"""
    normalize_obs: bool = True
    """normalize observations by the dataset's mean/std"""

    # TD3
    total_steps: Annotated[int, Range(1)] = 1_000_000
    """gradient updates (the paper pretrains for 5M)"""
    batch_size: Annotated[int, Range(1)] = 256
    """minibatch size"""
    learning_rate: Annotated[float, Range(0, open="lo")] = 3e-4
    """Adam learning rate of actor and critics"""
    gamma: Annotated[float, Range(0, 1)] = 0.99
    """discount factor γ"""
    tau: Annotated[float, Range(0, 1, open="lo")] = 0.005
    """target smoothing coefficient τ"""
    policy_noise: Annotated[float, Range(0)] = 0.2
    """target policy smoothing noise (fraction of the action half-range)"""
    noise_clip: Annotated[float, Range(0)] = 0.5
    """target policy smoothing noise clip (fraction of the action half-range)"""
    policy_frequency: Annotated[int, Range(1)] = 2
    """delayed actor (and target) update frequency"""
    hidden_dim: Annotated[int, Range(1)] = 256
    """width of the 2-hidden-layer actor and critics"""

    # evaluation and logging
    eval_freq: Annotated[int, Range(1)] = 5_000
    """updates between deterministic evaluations (and checkpoints)"""
    eval_episodes: Annotated[int, Range(1)] = 10
    """episodes per evaluation"""
    eval_seed: Annotated[int, Range(0)] = 10_000
    """evaluation episode i is reset with seed eval_seed + i (the same episodes at every evaluation)"""
    log_freq: Annotated[int, Range(1)] = 1_000
    """updates between training-loss rows in metrics.jsonl (the only host syncs between evaluations)"""

    # run management
    exp_name: str = STAGE
    """the name of this experiment (the script's file name, so a fork's runs are named after the fork)"""
    run_name: str | None = None
    """output folder under runs/ (if unset: {dataset}__{exp_name}__{seed})"""
    seed: Annotated[int, Range(0)] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""


# ALGO LOGIC: networks (copied verbatim into every stage script; tests/test_contracts.py proves the copies agree)
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


# ALGO LOGIC: the TD3+BC losses, as functions so tests can check them piece by piece
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


def td3_bc_actor_loss(actor: Actor, critic: Critic, obs, actions, alpha: float):
    """-λ mean Q1(s, π(s)) + mean ‖π(s) − a‖²/Na, λ = α / mean|Q1(s, π(s))| (detached). Returns (loss, λ, bc)."""
    pi = actor(obs)
    q1 = critic.q1(obs, pi)  # Q2 is not needed: do not compute it
    lmbda = alpha / q1.abs().mean().detach()
    bc = F.mse_loss(pi, actions)
    return -lmbda * q1.mean() + bc, lmbda, bc


def soft_update(targets: list, sources: list, tau: float):
    """θ' ← τ θ + (1 − τ) θ' for every parameter of every target network, in one fused foreach call."""
    with torch.no_grad():
        torch._foreach_lerp_(
            [p for m in targets for p in m.parameters()], [p for m in sources for p in m.parameters()], tau
        )


# ALGO LOGIC: one TD3+BC update, in two halves with static shapes; the actor delay stays outside them
def make_update(actor, critic, actor_target, critic_target, actor_optimizer, critic_optimizer, sample_batch, args):
    """-> update_critic() -> (obs, actions, critic_loss, q1_mean) and update_actor(obs, actions) -> (actor_loss, λ, bc).
    They return tensors, never Python numbers: nothing waits for the device. The critic's half samples its own batch
    from the fixed dataset, so with --compile or --cudagraphs the sampling is compiled or captured with the update
    (fine-tuning's cannot: its online buffer grows every step)."""

    def update_critic():
        obs, actions, rewards, next_obs, terminations = sample_batch()
        smoothing = {"policy_noise": args.policy_noise, "noise_clip": args.noise_clip}  # target policy smoothing
        y = td_target(critic_target, actor_target, next_obs, rewards, terminations, gamma=args.gamma, **smoothing)
        q = critic(obs, actions)
        critic_loss = ((q - y) ** 2).mean(1).sum()  # MSE of Q1 plus MSE of Q2
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()
        return obs, actions, critic_loss.detach(), q[0].mean().detach()

    def update_actor(obs, actions):
        actor_loss, lmbda, bc = td3_bc_actor_loss(actor, critic, obs, actions, args.alpha)
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=list(actor.parameters()))  # no gradients for the critic's weights: not needed
        actor_optimizer.step()
        soft_update([actor_target, critic_target], [actor, critic], args.tau)
        return actor_loss.detach(), lmbda, bc.detach()

    if args.compile:  # the fast path (benchmarks/fast_path.py): compile each half, as LeanRL does
        update_critic, update_actor = torch.compile(update_critic), torch.compile(update_actor)
    if args.cudagraphs:  # or capture each half in a CUDA graph once, then replay it
        update_critic, update_actor = CudaGraph(update_critic), CudaGraph(update_actor)
    return update_critic, update_actor


# Data: a Minari dataset -> flat transition tensors
def load_minari_dataset(dataset_id: str, download: bool):
    local = os.path.exists(minari.storage.get_dataset_path(dataset_id))
    hint = (
        f"create it with `python collect_dataset.py --env-id <Env>-v5` (ids local/<env>/<level>-v0), or, online, "
        f"`minari download {dataset_id}`"
    )
    if not local and (not download or dataset_id.startswith("local")):  # local*/ ids are ours: never online
        raise UserError(
            f"dataset '{dataset_id}' is not in the local Minari store ({minari.storage.get_dataset_path()}); {hint}"
        )
    try:
        return minari.load_dataset(dataset_id, download=download and not local)
    except Exception as e:  # unknown remote id, no network, corrupt files: all end in the same advice
        raise UserError(
            f"could not load dataset '{dataset_id}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); {hint}"
        ) from None


def dataset_eval_spec(dataset):
    """The env spec the dataset asks to be evaluated in (its eval env if it stores one, else its own)."""
    return getattr(dataset, "_eval_env_spec", None) or dataset.env_spec


def dataset_env_id(dataset, override: str | None) -> str:
    if override is not None:
        return override
    spec = dataset_eval_spec(dataset)
    if spec is None:
        raise UserError(f"dataset '{dataset.spec.dataset_id}' records no environment; pass --env-id")
    return spec.id


def make_eval_env(dataset, env_id: str) -> gym.Env:
    """The dataset's own eval env (same time limit and kwargs) unless --env-id names another."""
    make_env(env_id).close()  # a MuJoCo env with Box spaces, or one line
    spec = dataset_eval_spec(dataset)
    return gym.make(spec) if spec is not None and spec.id == env_id else gym.make(env_id)


def evaluate(actor: Actor, env: gym.Env, obs_mean, obs_std, episodes: int, seed: int) -> np.ndarray:
    """Deterministic returns of `episodes` episodes; episode i starts from reset(seed=seed + i)."""
    device = obs_mean.device
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            with torch.no_grad():
                o = (torch.as_tensor(obs, dtype=torch.float32, device=device) - obs_mean) / obs_std
                action = actor(o).cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            ret += float(reward)
            done = terminated or truncated
        returns.append(ret)
    return np.asarray(returns)


def actor_from_checkpoint(ckpt: dict, device="cpu") -> Actor:
    actor = Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["action_low"], ckpt["action_high"], ckpt["hidden_dim"])
    actor.load_state_dict(ckpt["actor"])
    return actor.to(device).eval()


# Setup (main reads these by name)
def load_data(args: Args) -> tuple:
    """The dataset's transitions, its env (the dataset's own eval env unless --env-id names another) and reference
    scores, checked against each other. -> (env_id, env, transitions, ref_min, ref_max)"""
    with reading_dataset(args.dataset_id):
        dataset = load_minari_dataset(args.dataset_id, args.download)
        env_id = dataset_env_id(dataset, args.env_id)
        env = make_eval_env(dataset, env_id)
        transitions = dataset_to_transitions(dataset)
        ref_min, ref_max = dataset.storage.metadata.get("ref_min_score"), dataset.storage.metadata.get("ref_max_score")
    if ref_min is not None and ref_max is not None and not ref_min < ref_max:
        raise UserError(
            f"dataset '{args.dataset_id}' has reference scores that cannot normalize a return (ref_min_score "
            f"{ref_min}, ref_max_score {ref_max}); re-create it with collect_dataset.py"
        )
    obs_dim, act_dim = transitions["obs"].shape[1], transitions["actions"].shape[1]
    if env.observation_space.shape != (obs_dim,) or env.action_space.shape != (act_dim,):
        raise UserError(
            f"env {env_id} (obs {env.observation_space.shape}, act {env.action_space.shape}) does not match "
            f"dataset '{args.dataset_id}' (obs ({obs_dim},), act ({act_dim},)); pass the right --env-id"
        )
    return env_id, env, transitions, ref_min, ref_max


def pack_transitions(transitions: dict, normalize_obs: bool, device) -> tuple:
    """The transitions as one [n, obs + act + 1 + obs + 1] tensor (normalized s, a, r, normalized s', terminated).
    -> (that tensor, obs_mean, obs_std)"""
    columns = {key: torch.as_tensor(value, device=device) for key, value in transitions.items()}
    obs_dim = columns["obs"].shape[1]
    if normalize_obs:
        obs_mean, obs_std = columns["obs"].mean(0), columns["obs"].std(0) + 1e-3
    else:
        obs_mean, obs_std = torch.zeros(obs_dim, device=device), torch.ones(obs_dim, device=device)
    obs, next_obs = (columns["obs"] - obs_mean) / obs_std, (columns["next_obs"] - obs_mean) / obs_std
    rewards, terminations = columns["rewards"][:, None], columns["terminations"][:, None]
    return torch.cat([obs, columns["actions"], rewards, next_obs, terminations], 1), obs_mean, obs_std


def make_learner(obs_dim: int, act_dim: int, action_space, args: Args, device) -> dict:
    """Actor, twin critic, their targets and Adams, by the names the checkpoint stores them under."""
    actor = Actor(obs_dim, act_dim, action_space.low, action_space.high, args.hidden_dim).to(device)
    critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
    actor_optimizer = adam(actor.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    critic_optimizer = adam(critic.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    targets = {"actor_target": copy.deepcopy(actor), "critic_target": copy.deepcopy(critic)}
    optimizers = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    return {"actor": actor, "critic": critic, **targets, **optimizers}


def checkpoint_header(args: Args, env: gym.Env, obs_mean, obs_std, ref_min, ref_max) -> dict:
    """What every TD3+BC checkpoint holds besides the networks and the step's results (docs/file_contracts.md)."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "stage": STAGE,
        "env_id": env.spec.id,
        "max_episode_steps": env.spec.max_episode_steps,
        "dataset_id": args.dataset_id,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "hidden_dim": args.hidden_dim,
        "action_low": torch.as_tensor(env.action_space.low),
        "action_high": torch.as_tensor(env.action_space.high),
        "obs_mean": obs_mean.cpu(),
        "obs_std": obs_std.cpu(),
        "ref_min_score": ref_min,
        "ref_max_score": ref_max,
        "args": dataclasses.asdict(args),
    }


def main(args: Args):
    # TRY NOT TO MODIFY: the inputs, checked; the run folder; seeding and the device
    check_ranges(args)  # each field's range is declared next to it in Args
    setup_fast_path(args)
    env_id, env, transitions, ref_min, ref_max = load_data(args)
    run_name = args.run_name or f"{args.dataset_id.replace('/', '-')}__{args.exp_name}__{args.seed}"
    run_dir, resumed = open_run(args, run_name, STAGE, "checkpoint.pt")  # the checkpoint is also the resume state
    if already_complete(resumed, args.total_steps, run_dir):
        return
    run = Run(run_dir, run_name, args, resumed, env_id=env_id)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the whole dataset lives on the training device as one [n, obs + act + 1 + obs + 1] tensor: one gather per batch
    data, obs_mean, obs_std = pack_transitions(transitions, args.normalize_obs, device)
    n_transitions, obs_dim, act_dim = len(data), transitions["obs"].shape[1], transitions["actions"].shape[1]

    def sample_batch():
        """A uniform minibatch (s, a, r, s', terminated); the indices are drawn on the device."""
        rows = data[torch.randint(0, n_transitions, (args.batch_size,), device=device)]
        obs, actions, rewards, next_obs, terminations = rows.split([obs_dim, act_dim, 1, obs_dim, 1], 1)
        return obs, actions, rewards.squeeze(1), next_obs, terminations.squeeze(1)

    modules = make_learner(obs_dim, act_dim, env.action_space, args, device)
    actor = modules["actor"]
    update_critic, update_actor = make_update(**modules, sample_batch=sample_batch, args=args)
    header = checkpoint_header(args, env, obs_mean, obs_std, ref_min, ref_max)

    def save(step: int, eval_return: float, eval_score):  # TRY NOT TO MODIFY: the checkpoint, also the resume state
        results = {"step": step, "eval_return": eval_return, "eval_normalized_score": eval_score}
        resume = {**run.resume_state(), "q_loss_sum": q_loss_sum.cpu()}  # the open loss window too
        save_checkpoint(
            os.path.join(run_dir, "checkpoint.pt"), {**header, **results, **module_states(modules), **resume}
        )

    print(
        f"{args.dataset_id}: {n_transitions} transitions, env {env_id}, obs {obs_dim}, act {act_dim}, device {device}"
    )
    q_loss_sum = torch.zeros((), device=device)
    actor_loss, lmbda, bc = torch.zeros(3, device=device)
    # remembers the first non-finite loss without a sync per step
    sentinel = NonFiniteSentinel(device, "update", run_dir)
    start_step = 0
    if resumed is not None:
        load_module_states(modules, resumed, device, args.cudagraphs)
        q_loss_sum += resumed["q_loss_sum"].to(device)
        set_rng_state(resumed["rng"])
        start_step = resumed["step"]
        print(f"resuming {run_dir} at update {start_step}")
    start_time, t_last, s_last = time.time(), time.time(), start_step
    steps = range(start_step + 1, args.total_steps + 1)
    pbar = tqdm(steps, desc="TD3+BC", initial=start_step, total=args.total_steps, mininterval=2)
    for step in pbar:
        # ALGO LOGIC: training (TD3's delayed actor: one actor and target update per policy_frequency critic updates)
        obs, actions, critic_loss, q1_mean = update_critic()
        q_loss_sum += critic_loss
        if step % args.policy_frequency == 0:
            actor_loss, lmbda, bc = update_actor(obs, actions)
        sentinel.watch(critic_loss + actor_loss, step)

        if step % args.log_freq == 0 or step % args.eval_freq == 0 or step == args.total_steps:
            sentinel.check()  # the only host syncs outside evaluation
        if step % args.log_freq == 0:
            sps = (step - s_last) / (time.time() - t_last)
            t_last, s_last = time.time(), step
            losses = {"actor_loss": actor_loss, "bc_loss": bc, "lambda": lmbda, "q1_mean": q1_mean}
            losses = {f"losses/{name}": value.item() for name, value in losses.items()}
            critic_loss_mean = q_loss_sum.item() / args.log_freq  # over the window since the last log
            run.log({"step": step, "losses/critic_loss": critic_loss_mean, **losses, "charts/updates_per_sec": sps})
            q_loss_sum.zero_()
        if step % args.eval_freq == 0 or step == args.total_steps:
            returns = evaluate(actor, env, obs_mean, obs_std, args.eval_episodes, args.eval_seed)
            score = normalized_score(float(returns.mean()), ref_min, ref_max)
            returns_row = {"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std())}
            elapsed = time.time() - start_time
            run.log({"step": step, **returns_row, "eval/normalized_score": score, "charts/elapsed_sec": elapsed})
            pbar.set_postfix(ret=f"{returns.mean():.1f}", score="n/a" if score is None else f"{score:.1f}")
            save(step, float(returns.mean()), score)
    pbar.close()
    run.close()
    env.close()
    updates_per_sec = (args.total_steps - start_step) / (time.time() - start_time)
    summary = f"final return {returns.mean():.1f}" + ("" if score is None else f", normalized score {score:.1f}")
    print(f"done: {updates_per_sec:.0f} updates/s incl. evaluation; {summary}; checkpoint {run_dir}/checkpoint.pt")


if __name__ == "__main__":
    cli(main, Args)
