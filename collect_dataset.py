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
from robust_o2o.files import save_checkpoint
from robust_o2o.resume import env_state, rng_state, set_env_state, set_rng_state
from robust_o2o.runs import check_resume_args, seed_everything

LEVELS = ("random", "medium", "medium-replay", "expert")
# D4RL's expert reference returns (d4rl/infos.py REF_MAX_SCORE, measured on mujoco-py v2 envs; an
# approximation for v5 envs). Medium targets default to a third of these.
EXPERT_RETURN = {
    "Hopper": 3234.3,
    "HalfCheetah": 12135.0,
    "Walker2d": 4592.3,
    "Ant": 3879.7,
    "InvertedPendulum": 1000.0,
    "InvertedDoublePendulum": 9350.0,
}


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
    """budget of online TD3 env steps for the behaviour policy; if a target is not reached, the best policy is used
    (warned, recorded)"""
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
    """continue an interrupted behaviour-policy training from
    runs/collect_dataset__{namespace}-{env}-v{version}/state.pt"""
    save_policies: str | None = None
    """directory to save the medium/expert behaviour policies (actor state dicts) into"""


# ALGO LOGIC: a compact TD3 behaviour policy: the stages' Actor (a verbatim copy of td3_bc_offline.py's) and two
# Q-networks that compute what the stages' twin Critic computes (tests/test_contracts.py proves both)
class Actor(nn.Module):
    """Deterministic policy π(s): 2×hidden ReLU MLP, tanh output rescaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, hidden_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, act_dim),
            nn.Tanh(),
        )
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.action_scale + self.action_bias


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    return gym.make(env_id, **kwargs)


def rollout(env: gym.Env, policy, num_transitions: int, seed: int):
    """Run `policy(obs) -> action` for exactly `num_transitions` steps; returns Minari episode buffers and
    the returns of the complete episodes. The last episode is cut at the budget and marked truncated."""
    episodes, returns = [], []
    obs, _ = env.reset(seed=seed)
    o, a, r, term, trunc = [obs], [], [], [], []
    for t in range(num_transitions):
        action = policy(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        last = t == num_transitions - 1
        o.append(obs)
        a.append(action)
        r.append(reward)
        term.append(terminated)
        trunc.append(truncated or (last and not terminated))
        if terminated or truncated or last:
            episodes.append(episode_buffer(o, a, r, term, trunc))
            if terminated or truncated:
                returns.append(float(np.sum(r)))
            obs, _ = env.reset()
            o, a, r, term, trunc = [obs], [], [], [], []
    return episodes, returns


def episode_buffer(o, a, r, term, trunc) -> EpisodeBuffer:
    return EpisodeBuffer(
        observations=np.asarray(o, dtype=np.float64),
        actions=np.asarray(a, dtype=np.float32),
        rewards=np.asarray(r, dtype=np.float64),
        terminations=np.asarray(term, dtype=bool),
        truncations=np.asarray(trunc, dtype=bool),
    )


def split_episodes(obs, actions, rewards, next_obs, terms, truncs, n: int):
    """Turn the first n transitions of a replay buffer (in time order) into episode buffers; a trailing
    unfinished episode is kept and marked truncated (its next observation is stored, so it bootstraps)."""
    episodes, start = [], 0
    for t in range(n):
        if terms[t] or truncs[t] or t == n - 1:
            tr = truncs[start : t + 1].copy()
            tr[-1] = tr[-1] or not terms[t]
            episodes.append(
                episode_buffer(
                    np.concatenate([obs[start : t + 1], next_obs[t : t + 1]]),
                    actions[start : t + 1],
                    rewards[start : t + 1],
                    terms[start : t + 1],
                    tr,
                )
            )
            start = t + 1
    return episodes


def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device, max_episode_steps=None) -> np.ndarray:
    env = make_env(env_id, max_episode_steps)
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


def train_behaviour_policy(
    args: Args,
    medium_target: float,
    expert_target: float | None,
    device,
    state_path: str | None = None,
    resumed: dict | None = None,
):
    """Online TD3 (CleanRL's td3_continuous_action, compacted). Returns the medium and expert actors,
    the number of steps at which medium was reached, the replay contents, and a training log.
    After every evaluation the whole training state goes to `state_path`; `resumed` (such a state) continues it."""
    env = make_env(args.env_id, args.max_episode_steps)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    env.action_space.seed(args.seed)
    actor = Actor(obs_dim, act_dim, low, high).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    actor_target, qf1_target, qf2_target = copy.deepcopy(actor), copy.deepcopy(qf1), copy.deepcopy(qf2)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.learning_rate)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    scale = torch.as_tensor((high - low) / 2.0, device=device)
    low_t, high_t = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)

    n = args.max_train_steps
    b_obs = np.zeros((n, obs_dim), np.float64)
    b_next = np.zeros((n, obs_dim), np.float64)
    b_act = np.zeros((n, act_dim), np.float32)
    b_rew = np.zeros(n, np.float64)
    b_term = np.zeros(n, bool)
    b_trunc = np.zeros(n, bool)

    need_expert = "expert" in args.levels
    medium_actor = expert_actor = None
    medium_step, best_return, best_actor, log = None, -np.inf, None, []
    obs, _ = env.reset(seed=args.seed)
    nets = {
        "actor": actor,
        "qf1": qf1,
        "qf2": qf2,
        "actor_target": actor_target,
        "qf1_target": qf1_target,
        "qf2_target": qf2_target,
        "q_optimizer": q_optimizer,
        "actor_optimizer": actor_optimizer,
    }
    buffers = {
        "obs": b_obs,
        "actions": b_act,
        "rewards": b_rew,
        "next_obs": b_next,
        "terminations": b_term,
        "truncations": b_trunc,
    }

    def copy_of_actor(state_dict):
        if state_dict is None:
            return None
        a = copy.deepcopy(actor)
        a.load_state_dict(state_dict)
        return a

    def save_state(steps_done: int):
        state = {k: m.state_dict() for k, m in nets.items()}
        state.update(
            steps_done=steps_done,
            rng=rng_state(),
            env=env_state(env),
            obs=torch.from_numpy(np.array(obs)),
            buffers={k: torch.from_numpy(b[:steps_done].copy()) for k, b in buffers.items()},
            actors={
                k: None if a is None else a.state_dict()
                for k, a in (("medium", medium_actor), ("expert", expert_actor), ("best", best_actor))
            },
            medium_step=medium_step,
            best_return=best_return,
            log=log,
            args={k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
        )
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
        save_checkpoint(state_path, state)

    start = step = 0
    if resumed is not None:
        for k, m in nets.items():
            m.load_state_dict(resumed[k])
        start = resumed["steps_done"]
        for k, b in buffers.items():
            b[:start] = resumed["buffers"][k].numpy()
        medium_actor, expert_actor, best_actor = (
            copy_of_actor(resumed["actors"][k]) for k in ("medium", "expert", "best")
        )
        medium_step, best_return, log, obs = (
            resumed["medium_step"],
            resumed["best_return"],
            resumed["log"],
            resumed["obs"].numpy(),
        )
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
                action = a.clamp(low_t, high_t).cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        b_obs[step], b_act[step], b_rew[step], b_next[step] = obs, action, reward, next_obs
        b_term[step], b_trunc[step] = terminated, truncated
        obs = next_obs if not (terminated or truncated) else env.reset()[0]

        if step >= args.learning_starts:
            idx = torch.randint(0, step + 1, (args.batch_size,))
            s = torch.as_tensor(b_obs[idx], dtype=torch.float32, device=device)
            s2 = torch.as_tensor(b_next[idx], dtype=torch.float32, device=device)
            a = torch.as_tensor(b_act[idx], device=device)
            r = torch.as_tensor(b_rew[idx], dtype=torch.float32, device=device)
            d = torch.as_tensor(b_term[idx], dtype=torch.float32, device=device)  # bootstrap through truncations
            with torch.no_grad():
                noise = (torch.randn_like(a) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip) * scale
                a2 = (actor_target(s2) + noise).clamp(low_t, high_t)
                y = r + args.gamma * (1 - d) * torch.min(qf1_target(s2, a2), qf2_target(s2, a2))
            q_loss = F.mse_loss(qf1(s, a), y) + F.mse_loss(qf2(s, a), y)
            q_optimizer.zero_grad()
            q_loss.backward()
            q_optimizer.step()
            if step % args.policy_frequency == 0:
                actor_loss = -qf1(s, actor(s)).mean()
                actor_optimizer.zero_grad()
                actor_loss.backward()
                actor_optimizer.step()
                with torch.no_grad():
                    for net, tgt in ((actor, actor_target), (qf1, qf1_target), (qf2, qf2_target)):
                        for p, tp in zip(net.parameters(), tgt.parameters()):
                            tp.lerp_(p, args.tau)

        if (step + 1) % args.eval_freq == 0 and step >= args.learning_starts:
            ret = float(
                evaluate(
                    actor, args.env_id, args.eval_episodes, args.seed + 10_000, device, args.max_episode_steps
                ).mean()
            )
            log.append({"step": step + 1, "eval_return": ret})
            pbar.set_postfix(eval_return=f"{ret:.1f}")
            if ret > best_return:
                best_return, best_actor = ret, copy.deepcopy(actor)
            if medium_actor is None and ret >= medium_target:
                medium_actor, medium_step = copy.deepcopy(actor), step + 1
                tqdm.write(f"medium reached at step {medium_step}: eval return {ret:.1f} >= {medium_target:.1f}")
            if expert_target is not None and ret >= expert_target:
                expert_actor = copy.deepcopy(actor)
                tqdm.write(f"expert reached at step {step + 1}: eval return {ret:.1f} >= {expert_target:.1f}")
            if medium_actor is not None and (not need_expert or expert_actor is not None):
                break
            if state_path is not None:
                save_state(step + 1)
    steps_done = step + 1
    pbar.close()
    if best_actor is None:  # no evaluation ran (budget below learning_starts + eval_freq)
        best_actor = copy.deepcopy(actor)
    missed = "medium" if medium_actor is None else "expert" if need_expert and expert_actor is None else None
    if args.strict_targets and missed:
        raise UserError(
            f"the behaviour policy missed the {missed} target in {steps_done} steps (best eval return "
            f"{best_return:.1f}); delete {state_path}, then raise --max-train-steps or pass another --seed"
        )
    if medium_actor is None:
        tqdm.write(
            f"WARNING: medium target {medium_target:.1f} not reached in {steps_done} steps; "
            f"using the best policy seen (eval return {best_return:.1f}) as medium"
        )
        medium_actor, medium_step = best_actor, steps_done
    if need_expert and expert_actor is None:
        tqdm.write(
            f"WARNING: expert target not reached in {steps_done} steps; using the best policy seen "
            f"(eval return {best_return:.1f}) as expert"
        )
        expert_actor = best_actor
    replay = (b_obs, b_act, b_rew, b_next, b_term, b_trunc)
    return medium_actor, expert_actor, medium_step, replay, log


def training_state_path(args: Args) -> str:
    return os.path.join(
        "runs", f"collect_dataset__{args.namespace}-{args.env_id.split('-')[0].lower()}-v{args.version}", "state.pt"
    )


def load_training_state(path: str, args: Args) -> dict:
    """The interrupted behaviour-policy training to continue (weights_only load), refused if the arguments differ."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete it and run without --resume") from None
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


def noisy_policy(actor: Actor, noise: float, rng: np.random.Generator, low, high, device):
    scale = (high - low) / 2.0

    def act(obs):
        with torch.no_grad():
            a = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        return np.clip(a + rng.normal(size=a.shape) * noise * scale, low, high).astype(np.float32)

    return act


def dataset_id_for(namespace: str, env_id: str, level: str, version: int) -> str:
    return f"{namespace}/{env_id.split('-')[0].lower()}/{level}-v{version}"


def check_args(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    check_name(args.namespace, "--namespace", "the Minari store")
    if (
        args.ref_min_score is not None
        and args.ref_max_score is not None
        and not args.ref_min_score < args.ref_max_score
    ):
        raise UserError(f"need --ref-min-score < --ref-max-score (got {args.ref_min_score} and {args.ref_max_score})")
    if not args.levels:
        raise UserError(f"--levels needs at least one of {' '.join(LEVELS)}")
    try:
        spec = gym.spec(args.env_id)
    except gym.error.Error as e:
        raise UserError(f"unknown env id '{args.env_id}' ({e}); use a Gymnasium id such as Hopper-v5") from None
    name = args.env_id.split("-")[0]
    trained = set(args.levels) - {"random"}
    if name not in EXPERT_RETURN and (
        (trained and args.medium_target_return is None) or (args.ref_max_score is None and "expert" not in args.levels)
    ):
        raise UserError(
            f"no expert reference return known for {args.env_id}: pass --medium-target-return, "
            f"--expert-target-return and --ref-max-score (or collect the expert level)"
        )
    for lv in args.levels:
        path = minari.storage.get_dataset_path(dataset_id_for(args.namespace, args.env_id, lv, args.version))
        if os.path.exists(path) and not args.overwrite:
            raise UserError(
                f"dataset {dataset_id_for(args.namespace, args.env_id, lv, args.version)} already exists "
                f"at {path}; pass --overwrite to replace it"
            )
    return spec


def main(args: Args):
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id, args.max_episode_steps)
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise UserError(f"{args.env_id} needs Box observation and action spaces")
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

    episodes, meta = {}, {}
    if "random" in args.levels:
        eps, rets = rollout(env, lambda _: env.action_space.sample(), args.num_transitions, args.seed + 1)
        episodes["random"], meta["random"] = (
            eps,
            {"behaviour": "uniform random", "episode_return_mean": float(np.mean(rets)) if rets else None},
        )
    trained = [lv for lv in args.levels if lv != "random"]
    ref_max = args.ref_max_score if args.ref_max_score is not None else EXPERT_RETURN.get(name)
    state_path = training_state_path(args)
    if trained:
        if args.resume and not os.path.isfile(state_path):
            raise UserError(f"nothing to resume: {state_path} does not exist; run without --resume")
        if not args.resume and os.path.isfile(state_path):
            raise UserError(
                f"{state_path} holds an interrupted behaviour-policy training; pass --resume to continue it, "
                f"or delete it"
            )
        resumed = load_training_state(state_path, args) if args.resume else None
        medium_actor, expert_actor, medium_step, replay, log = train_behaviour_policy(
            args, medium_target, expert_target, device, state_path, resumed
        )
        rng = np.random.default_rng(args.seed + 2)
        for lv, actor in (("medium", medium_actor), ("expert", expert_actor)):
            if lv not in args.levels:
                continue
            ev = evaluate(actor, args.env_id, args.eval_episodes, args.seed + 10_000, device, args.max_episode_steps)
            eps, rets = rollout(
                env,
                noisy_policy(actor, args.rollout_noise, rng, low, high, device),
                args.num_transitions,
                args.seed + 3,
            )
            episodes[lv] = eps
            target = medium_target if lv == "medium" else expert_target
            meta[lv] = {
                "behaviour": f"TD3 policy, rollout noise {args.rollout_noise}",
                "policy_eval_return": float(ev.mean()),
                "target_return": target,
                "target_reached": target is not None and float(ev.mean()) >= target,
                "behaviour_seed": args.seed,
                "episode_return_mean": float(np.mean(rets)) if rets else None,
                "training_log": log,
            }
            if lv == "expert" and ref_max is None:
                ref_max = float(
                    evaluate(
                        actor, args.env_id, args.ref_episodes, args.seed + 30_000, device, args.max_episode_steps
                    ).mean()
                )
            if args.save_policies:
                os.makedirs(args.save_policies, exist_ok=True)
                torch.save(actor.state_dict(), os.path.join(args.save_policies, f"{lv}_actor.pt"))
        if "medium-replay" in args.levels:
            episodes["medium-replay"] = split_episodes(*replay, n=medium_step)
            meta["medium-replay"] = {
                "behaviour": "TD3 training transitions until medium",
                "medium_step": medium_step,
                "training_log": log,
            }
    for lv in args.levels:
        ds_id = dataset_id_for(args.namespace, args.env_id, lv, args.version)
        extra = {"level": lv, "collect_args": vars(args), **meta[lv]}
        path = write_minari_dataset(
            ds_id,
            episodes[lv],
            args.env_id,
            ref_min,
            ref_max,
            f"{lv} data for {args.env_id}, D4RL-style, made by collect_dataset.py",
            extra,
            args.overwrite,
            args.max_episode_steps,
        )
        steps = sum(len(e.rewards) for e in episodes[lv])
        print(f"wrote {ds_id}: {len(episodes[lv])} episodes, {steps} steps -> {path}")
    if os.path.isfile(state_path):  # every dataset is written: the training state has served its purpose
        os.remove(state_path)
        if not os.listdir(os.path.dirname(state_path)):
            os.rmdir(os.path.dirname(state_path))
    print(f"ref_min_score={ref_min:.2f} ref_max_score={ref_max:.2f}; total time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli(main, Args)
