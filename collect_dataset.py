# Create D4RL-style offline datasets in Minari format, locally, on Gymnasium MuJoCo v5 envs.
"""Levels, following D4RL's recipe (Fu et al., 2020):

- random:        uniform random actions.
- medium:        a TD3 behaviour policy, trained online until its deterministic evaluation return
                 reaches `--medium-target-return` (about a third of an expert's), then rolled out.
- medium-replay: every transition that behaviour policy's training produced until it reached medium.
- expert:        the same training carried on to `--expert-target-return` (or the step budget).

Each dataset stores `ref_min_score` (a uniform random policy's mean return, measured) and
`ref_max_score` (D4RL's expert constant for the env, or `--ref-max-score`), so
`minari.get_normalized_score` works: 0 = random, 1 = expert.
Terminations and truncations are recorded distinctly; observations hold T+1 entries per episode.
"""

import copy
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

from robust_o2o.cli import Range, UserError, check_name, check_ranges, cli
from robust_o2o.datasets import write_minari_dataset
from robust_o2o.envs import make_env
from robust_o2o.files import save_checkpoint
from robust_o2o.resume import env_state, rng_state, set_env_state, set_rng_state
from robust_o2o.runs import check_resume_args, seed_everything

LEVELS = ("random", "medium", "medium-replay", "expert")
# D4RL's expert reference returns (d4rl/infos.py REF_MAX_SCORE, measured on mujoco-py v2 envs; an
# approximation for v5 envs). Medium targets default to a third of these.
EXPERT_RETURN = {"Hopper": 3234.3, "HalfCheetah": 12135.0, "Walker2d": 4592.3, "Ant": 3879.7}
EXPERT_RETURN.update(InvertedPendulum=1000.0, InvertedDoublePendulum=9350.0)


@dataclass
class Args:
    # what to collect
    env_id: str = "Hopper-v5"
    """Gymnasium environment id (MuJoCo v5 envs: Hopper-v5, HalfCheetah-v5, Ant-v5, Walker2d-v5, ...)"""
    levels: tuple[Literal["random", "medium", "medium-replay", "expert"], ...] = LEVELS
    """which datasets to create: any of random, medium, medium-replay, expert"""
    namespace: str = "local"
    """Minari namespace; datasets are named {namespace}/{env}/{level}-v{version}, e.g. local/hopper/medium-v0"""
    version: Annotated[int, Range(0)] = 0
    """dataset version suffix"""
    num_transitions: Annotated[int, Range(1)] = 1_000_000
    """transitions per random/medium/expert dataset (D4RL: 1M); medium-replay holds what training produced"""
    medium_target_return: Annotated[float | None, Range()] = None
    """deterministic eval return at which the behaviour policy counts as medium (if unset: expert reference / 3)"""
    expert_target_return: Annotated[float | None, Range()] = None
    """eval return at which training stops and the policy counts as expert (if unset: the expert reference)"""
    max_train_steps: Annotated[int, Range(1)] = 1_000_000
    """online TD3 env steps the behaviour policy may train for (a missed target: the best policy, warned, recorded)"""
    strict_targets: bool = False
    """refuse to write a medium/expert dataset whose behaviour policy missed its target, instead of using the best
    policy seen"""
    rollout_noise: Annotated[float, Range(0)] = 0.1
    """std of Gaussian noise (in units of the action half-range) added to medium/expert rollouts"""
    max_episode_steps: Annotated[int | None, Range(1)] = None
    """override the env's time limit (short episodes for tests); stored in the dataset's env spec"""

    # reference scores
    ref_episodes: Annotated[int, Range(1)] = 100
    """episodes of a uniform random policy averaged for ref_min_score"""
    ref_min_score: Annotated[float | None, Range()] = None
    """override the measured random-policy reference return"""
    ref_max_score: Annotated[float | None, Range()] = None
    """override the expert reference return (if unset: D4RL's constant for the env, else the expert policy's
    measured return)"""

    # the TD3 behaviour policy
    learning_rate: Annotated[float, Range(0, open="lo")] = 3e-4
    """Adam learning rate"""
    batch_size: Annotated[int, Range(1)] = 256
    """minibatch size"""
    gamma: Annotated[float, Range(0, 1)] = 0.99
    """discount factor"""
    tau: Annotated[float, Range(0, 1, open="lo")] = 0.005
    """target smoothing coefficient"""
    policy_noise: Annotated[float, Range(0)] = 0.2
    """target policy smoothing noise"""
    noise_clip: Annotated[float, Range(0)] = 0.5
    """target policy smoothing noise clip"""
    exploration_noise: Annotated[float, Range(0)] = 0.1
    """exploration noise during training"""
    learning_starts: Annotated[int, Range(0)] = 25_000
    """uniform-random warm-up steps before learning"""
    policy_frequency: Annotated[int, Range(1)] = 2
    """delayed actor update frequency"""
    eval_freq: Annotated[int, Range(1)] = 5_000
    """env steps between evaluations of the behaviour policy"""
    eval_episodes: Annotated[int, Range(1)] = 10
    """episodes per evaluation"""

    # run management
    overwrite: bool = False
    """replace datasets with the same id"""
    seed: Annotated[int, Range(0)] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA for the behaviour policy's training when available"""
    resume: bool = False
    """continue an interrupted behaviour-policy training (its runs/collect_dataset__{namespace}-{env}-v{version}/)"""
    save_policies: str | None = None
    """directory to save the medium/expert behaviour policies (actor state dicts) into"""


# ALGO LOGIC: a compact TD3 behaviour policy: the stages' Actor (a verbatim copy of td3_bc_offline.py's) and two
# Q-networks that compute what the stages' twin Critic computes (tests/test_contracts.py proves both)
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


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        layers = [nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def rollout(env: gym.Env, policy, num_transitions: int, seed: int):
    """Run `policy(obs) -> action` for exactly `num_transitions` steps; returns Minari episode buffers and
    the returns of the complete episodes. The last episode is cut at the budget and marked truncated."""
    episodes, returns = [], []
    obs, _ = env.reset(seed=seed)
    observations, steps = [obs], []  # steps: (action, reward, terminated, truncated)
    for t in range(num_transitions):
        action = policy(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        last = t == num_transitions - 1
        observations.append(obs)
        steps.append((action, reward, terminated, truncated or (last and not terminated)))
        if terminated or truncated or last:
            actions, rewards, terminations, truncations = (list(column) for column in zip(*steps))
            episodes.append(episode_buffer(observations, actions, rewards, terminations, truncations))
            if terminated or truncated:
                returns.append(float(np.sum(rewards)))
            obs, _ = env.reset()
            observations, steps = [obs], []
    return episodes, returns


def episode_buffer(o, a, r, term, trunc) -> EpisodeBuffer:
    return EpisodeBuffer(
        observations=np.asarray(o, dtype=np.float64),
        actions=np.asarray(a, dtype=np.float32),
        rewards=np.asarray(r, dtype=np.float64),
        terminations=np.asarray(term, dtype=bool),
        truncations=np.asarray(trunc, dtype=bool),
    )


def split_episodes(obs, actions, rewards, next_obs, terminations, truncations, n: int):
    """Turn the first n transitions of a replay buffer (in time order) into episode buffers; a trailing
    unfinished episode is kept and marked truncated (its next observation is stored, so it bootstraps)."""
    episodes, start = [], 0
    for t in range(n):
        if terminations[t] or truncations[t] or t == n - 1:
            cut = slice(start, t + 1)
            truncated = truncations[cut].copy()
            truncated[-1] = truncated[-1] or not terminations[t]
            observations = np.concatenate([obs[cut], next_obs[t : t + 1]])
            episodes.append(episode_buffer(observations, actions[cut], rewards[cut], terminations[cut], truncated))
            start = t + 1
    return episodes


def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device, max_episode_steps=None) -> np.ndarray:
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            ret += float(reward)
            done = terminated or truncated
        returns.append(ret)
    env.close()
    return np.asarray(returns)


def train_behaviour_policy(args: Args, targets: dict, device, state_path: str, resumed: dict | None = None):
    """Online TD3 (CleanRL's td3_continuous_action, compacted) until the eval return reaches targets["medium"] (and
    targets["expert"] if that level is wanted). After every evaluation the whole training state goes to `state_path`;
    `resumed` (such a state) continues it. -> ({level: actor}, the step medium was reached at, replay arrays, log)"""
    env = gym.make(args.env_id, max_episode_steps=args.max_episode_steps)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    env.action_space.seed(args.seed)
    nets = make_td3(obs_dim, act_dim, low, high, args, device)
    actor, bounds = nets["actor"], (torch.as_tensor(low, device=device), torch.as_tensor(high, device=device))
    scale = torch.as_tensor((high - low) / 2.0, device=device)
    n, need_expert = args.max_train_steps, "expert" in args.levels
    columns = {"obs": ((obs_dim,), np.float64), "actions": ((act_dim,), np.float32), "rewards": ((), np.float64)}
    columns.update(next_obs=((obs_dim,), np.float64), terminations=((), bool), truncations=((), bool))
    replay = {key: np.zeros((n, *shape), dtype) for key, (shape, dtype) in columns.items()}
    kept = {"medium": None, "expert": None, "best": None}  # the actors kept: at each target, and the best seen
    medium_step, best_return, log = None, -np.inf, []
    obs, _ = env.reset(seed=args.seed)

    def save_state(steps_done: int):
        state = {key: module.state_dict() for key, module in nets.items()}
        state.update(steps_done=steps_done, rng=rng_state(), env=env_state(env), obs=torch.from_numpy(np.array(obs)))
        state["buffers"] = {key: torch.from_numpy(column[:steps_done].copy()) for key, column in replay.items()}
        state["actors"] = {key: None if a is None else a.state_dict() for key, a in kept.items()}
        state.update(medium_step=medium_step, best_return=best_return, log=log)
        state["args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
        save_checkpoint(state_path, state)

    start = step = 0
    if resumed is not None:
        for key, module in nets.items():
            module.load_state_dict(resumed[key])
        start = resumed["steps_done"]
        for key, column in replay.items():
            column[:start] = resumed["buffers"][key].numpy()
        kept = {key: None if saved is None else copy.deepcopy(actor) for key, saved in resumed["actors"].items()}
        for key, saved in resumed["actors"].items():
            if saved is not None:
                kept[key].load_state_dict(saved)
        medium_step, best_return, log = resumed["medium_step"], resumed["best_return"], resumed["log"]
        obs = resumed["obs"].numpy()
        set_env_state(env, resumed["env"])
        set_rng_state(resumed["rng"])
        tqdm.write(f"resuming the behaviour policy's training at step {start}")
        step = start - 1
    pbar = tqdm(range(start, n), initial=start, total=n, desc=f"TD3 behaviour policy on {args.env_id}", mininterval=2)
    for step in pbar:
        if step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                a = actor(torch.as_tensor(obs, dtype=torch.float32, device=device))
                a = a + torch.randn_like(a) * scale * args.exploration_noise
                action = a.clamp(*bounds).cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(replay, (obs, action, reward, next_obs, terminated, truncated)):
            replay[key][step] = value
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
        if step >= args.learning_starts:
            td3_update(nets, replay, step, args, scale, bounds, device)

        if (step + 1) % args.eval_freq == 0 and step >= args.learning_starts:
            limit = args.max_episode_steps
            evaluation = evaluate(actor, args.env_id, args.eval_episodes, args.seed + 10_000, device, limit)
            ret = float(evaluation.mean())
            log.append({"step": step + 1, "eval_return": ret})
            pbar.set_postfix(eval_return=f"{ret:.1f}")
            if ret > best_return:
                best_return, kept["best"] = ret, copy.deepcopy(actor)
            for level in ("medium", "expert"):
                if kept[level] is None and targets[level] is not None and ret >= targets[level]:
                    kept[level], medium_step = copy.deepcopy(actor), medium_step if level == "expert" else step + 1
                    tqdm.write(f"{level} reached at step {step + 1}: eval return {ret:.1f} >= {targets[level]:.1f}")
            if kept["medium"] is not None and (not need_expert or kept["expert"] is not None):
                break
            save_state(step + 1)
    pbar.close()
    actors, medium_step = settle_targets(args, kept, medium_step, best_return, step + 1, state_path, actor)
    return actors, medium_step, replay, log


def make_td3(obs_dim: int, act_dim: int, low, high, args: Args, device) -> dict:
    """The actor, two Q-networks, their targets and Adams, by the names the training state stores them under."""
    actor = Actor(obs_dim, act_dim, low, high).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    targets = {"actor_target": copy.deepcopy(actor), "qf1_target": copy.deepcopy(qf1), "qf2_target": copy.deepcopy(qf2)}
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.learning_rate)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    return {
        "actor": actor,
        "qf1": qf1,
        "qf2": qf2,
        **targets,
        "q_optimizer": q_optimizer,
        "actor_optimizer": actor_optimizer,
    }


def td3_update(nets: dict, replay: dict, step: int, args: Args, scale, bounds: tuple, device):
    """One TD3 update on a uniform batch of the first step + 1 transitions; targets bootstrap through truncations."""
    idx = torch.randint(0, step + 1, (args.batch_size,))
    keys = ("obs", "actions", "rewards", "next_obs", "terminations")
    s, a, r, s2, d = (torch.as_tensor(replay[key][idx], dtype=torch.float32, device=device) for key in keys)
    actor, qf1, qf2 = nets["actor"], nets["qf1"], nets["qf2"]
    with torch.no_grad():
        noise = (torch.randn_like(a) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip) * scale
        a2 = (nets["actor_target"](s2) + noise).clamp(*bounds)
        y = r + args.gamma * (1 - d) * torch.min(nets["qf1_target"](s2, a2), nets["qf2_target"](s2, a2))
    q_loss = F.mse_loss(qf1(s, a), y) + F.mse_loss(qf2(s, a), y)
    nets["q_optimizer"].zero_grad()
    q_loss.backward()
    nets["q_optimizer"].step()
    if step % args.policy_frequency == 0:
        actor_loss = -qf1(s, actor(s)).mean()
        nets["actor_optimizer"].zero_grad()
        actor_loss.backward()
        nets["actor_optimizer"].step()
        with torch.no_grad():
            for name in ("actor", "qf1", "qf2"):
                for p, tp in zip(nets[name].parameters(), nets[f"{name}_target"].parameters()):
                    tp.lerp_(p, args.tau)


def settle_targets(args, kept: dict, medium_step, best_return: float, steps_done: int, state_path: str, actor):
    """The medium (and expert) actors: those that reached their targets; for a missed target the best policy seen, with
    a warning (or, with --strict-targets, an error). -> ({level: actor}, medium step)"""
    best = kept["best"] if kept["best"] is not None else copy.deepcopy(actor)  # no evaluation ran: the last policy
    wanted = ["medium"] + (["expert"] if "expert" in args.levels else [])
    missed = [level for level in wanted if kept[level] is None]
    best_seen, fix = f"best eval return {best_return:.1f}", "raise --max-train-steps or pass another --seed"
    if args.strict_targets and missed:
        missed_first = f"the behaviour policy missed the {missed[0]} target in {steps_done} steps ({best_seen})"
        raise UserError(f"{missed_first}; delete {state_path}, then {fix}")
    for level in missed:
        tqdm.write(f"WARNING: {level} target not reached in {steps_done} steps; using the best policy ({best_seen})")
        kept[level] = best
    return {level: kept[level] for level in ("medium", "expert")}, medium_step if "medium" not in missed else steps_done


def training_state_path(args: Args) -> str:
    env_name = args.env_id.split("-")[0].lower()
    return os.path.join("runs", f"collect_dataset__{args.namespace}-{env_name}-v{args.version}", "state.pt")


def load_training_state(path: str, args: Args) -> dict | None:
    """With --resume, the interrupted behaviour-policy training to continue (weights_only load), refused if the
    arguments differ; without, None (refused if an interrupted training is there, which would be lost)."""
    if args.resume and not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist; run without --resume")
    if not args.resume:
        if os.path.isfile(path):
            raise UserError(
                f"{path} holds an interrupted behaviour-policy training; pass --resume to continue it, or delete it"
            )
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete it and run without --resume") from None
    keys = ("args", "steps_done", "rng", "env", "obs", "buffers", "actors", "medium_step", "best_return", "log")
    if not isinstance(state, dict) or not all(k in state for k in keys) or not isinstance(state["args"], dict):
        raise UserError(f"{path} is not a behaviour-policy training state; delete it and run without --resume")
    check_resume_args(state["args"], vars(args), ("resume", "overwrite", "cuda", "save_policies"))
    return state


def random_returns(env: gym.Env, episodes: int, seed: int) -> list:
    """Returns of `episodes` complete episodes of a uniform random policy."""
    returns = []
    env.reset(seed=seed)
    for _ in range(episodes):
        ret, done = 0.0, False
        while not done:
            _, r, terminated, truncated, _ = env.step(env.action_space.sample())
            ret, done = ret + float(r), terminated or truncated
        returns.append(ret)
        env.reset()
    return returns


def dataset_id_for(namespace: str, env_id: str, level: str, version: int) -> str:
    return f"{namespace}/{env_id.split('-')[0].lower()}/{level}-v{version}"


def check_args(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    check_name(args.namespace, "--namespace", "the Minari store")
    lo, hi = args.ref_min_score, args.ref_max_score
    if lo is not None and hi is not None and not lo < hi:
        raise UserError(f"need --ref-min-score < --ref-max-score (got {lo} and {hi})")
    if not args.levels:
        raise UserError(f"--levels needs at least one of {' '.join(LEVELS)}")
    make_env(args.env_id).close()  # a Gymnasium MuJoCo env with Box spaces, or one line
    spec = gym.spec(args.env_id)
    name = args.env_id.split("-")[0]
    trained = set(args.levels) - {"random"}
    needs_medium_target = trained and args.medium_target_return is None
    if name not in EXPERT_RETURN and (needs_medium_target or (hi is None and "expert" not in args.levels)):
        raise UserError(
            f"no expert reference return known for {args.env_id}: pass --medium-target-return, "
            f"--expert-target-return and --ref-max-score (or collect the expert level)"
        )
    for level in args.levels:
        dataset_id = dataset_id_for(args.namespace, args.env_id, level, args.version)
        path = minari.storage.get_dataset_path(dataset_id)
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"dataset {dataset_id} already exists at {path}; pass --overwrite to replace it")
    return spec


def main(args: Args):
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id, max_episode_steps=args.max_episode_steps)
    low, high = env.action_space.low, env.action_space.high
    env.action_space.seed(args.seed)
    t0 = time.time()

    # reference scores: a uniform random policy's mean return (D4RL's REF_MIN), and the expert reference
    ref_min = args.ref_min_score
    if ref_min is None:
        ref_min = float(np.mean(random_returns(env, args.ref_episodes, args.seed + 20_000)))
    name = args.env_id.split("-")[0]
    medium_target = args.medium_target_return if args.medium_target_return is not None else EXPERT_RETURN[name] / 3
    expert_target = args.expert_target_return if args.expert_target_return is not None else EXPERT_RETURN.get(name)
    ref_max = args.ref_max_score if args.ref_max_score is not None else EXPERT_RETURN.get(name)

    episodes, meta = {}, {}
    if "random" in args.levels:
        uniform = env.action_space.sample
        episodes["random"], returns = rollout(env, lambda _: uniform(), args.num_transitions, args.seed + 1)
        meta["random"] = {
            "behaviour": "uniform random",
            "episode_return_mean": float(np.mean(returns)) if returns else None,
        }
    state_path = training_state_path(args)
    if set(args.levels) - {"random"}:
        resumed = load_training_state(state_path, args)
        targets = {"medium": medium_target, "expert": expert_target}
        actors, medium_step, replay, log = train_behaviour_policy(args, targets, device, state_path, resumed)
        rng, half_range = np.random.default_rng(args.seed + 2), (high - low) / 2.0
        for level in ("medium", "expert"):
            if level not in args.levels:
                continue
            actor = actors[level]
            limit = args.max_episode_steps
            evaluation = evaluate(actor, args.env_id, args.eval_episodes, args.seed + 10_000, device, limit)

            def policy(obs, actor=actor):  # the actor with Gaussian noise of std rollout_noise × the half-range
                with torch.no_grad():
                    a = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
                noise = rng.normal(size=a.shape) * args.rollout_noise * half_range
                return np.clip(a + noise, low, high).astype(np.float32)

            episodes[level], returns = rollout(env, policy, args.num_transitions, args.seed + 3)
            reached = targets[level] is not None and float(evaluation.mean()) >= targets[level]
            meta[level] = {"behaviour": f"TD3 policy, rollout noise {args.rollout_noise}"}
            meta[level].update(policy_eval_return=float(evaluation.mean()), target_return=targets[level])
            meta[level].update(target_reached=reached, behaviour_seed=args.seed)
            meta[level].update(episode_return_mean=float(np.mean(returns)) if returns else None, training_log=log)
            if level == "expert" and ref_max is None:
                ref_max = float(
                    evaluate(actor, args.env_id, args.ref_episodes, args.seed + 30_000, device, limit).mean()
                )
            if args.save_policies:
                os.makedirs(args.save_policies, exist_ok=True)
                torch.save(actor.state_dict(), os.path.join(args.save_policies, f"{level}_actor.pt"))
        if "medium-replay" in args.levels:
            episodes["medium-replay"] = split_episodes(**replay, n=medium_step)
            meta["medium-replay"] = {"behaviour": "TD3 training transitions until medium", "medium_step": medium_step}
            meta["medium-replay"]["training_log"] = log
    options = {"overwrite": args.overwrite, "max_episode_steps": args.max_episode_steps}
    for level in args.levels:
        dataset_id, data = dataset_id_for(args.namespace, args.env_id, level, args.version), episodes[level]
        description = f"{level} data for {args.env_id}, D4RL-style, made by collect_dataset.py"
        extra = {"level": level, "collect_args": vars(args), **meta[level]}
        path = write_minari_dataset(dataset_id, data, args.env_id, ref_min, ref_max, description, extra, **options)
        print(f"wrote {dataset_id}: {len(data)} episodes, {sum(len(e.rewards) for e in data)} steps -> {path}")
    if os.path.isfile(state_path):  # every dataset is written: the training state has served its purpose
        os.remove(state_path)
        if not os.listdir(os.path.dirname(state_path)):
            os.rmdir(os.path.dirname(state_path))
    print(f"ref_min_score={ref_min:.2f} ref_max_score={ref_max:.2f}; total time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli(main, Args)
