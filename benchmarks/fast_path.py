"""The project's fast path against a plain eager reference written here, in one run on one machine.

Measures, each for the reference and for the project's code:
  1. offline TD3+BC updates/s (batch 256, Hopper-v5 shapes, synthetic data: the cost does not depend on the values);
  2. online fine-tuning env steps/s on Hopper-v5, one update per step (td3_adv_finetune.main itself, --init scratch);
  3. DE env steps/s (de_perturbations' lockstep population evaluation against serial rollouts).
Prints the machine and a Markdown table with the ratios (docs/fast_path.md):
    python benchmarks/fast_path.py                                                  # about 5 minutes on 2 CPU cores
    python benchmarks/fast_path.py --updates 30 --finetune-steps 400 --de-steps 2000  # seconds (the test suite's size)
    python benchmarks/fast_path.py --profile    # where an update's time goes: the GEMM share and GEMM GFLOP/s

The reference is written the way common implementations write TD3 (CORL's td3_bc.py, CleanRL's
td3_continuous_action.py): separate critic modules, default Adam, the actor loss backpropagated into every parameter,
Polyak averaging in a Python loop, `.item()` logging, and a NumPy replay buffer for the online loop.
tests/test_fast_path.py checks that it computes the same update as the project's code."""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import td3_bc_offline as bc  # noqa: E402
from measure_stages import cpu_name, measure_de  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# The plain eager reference
def mlp(in_dim: int, out_dim: int, hidden: int, out_act=None) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers, *([out_act] if out_act else []))


class ReferenceTD3:
    """TD3 (alpha=None) or TD3+BC (alpha given), one update per call, as common eager implementations write it.
    Starts from the weights of a project Actor/Critic pair, so the two can be compared step by step."""

    def __init__(
        self,
        actor: bc.Actor,
        critic: bc.Critic,
        lr: float = 3e-4,
        alpha=None,
        gamma=0.99,
        tau=0.005,
        policy_noise=0.2,
        noise_clip=0.5,
        policy_frequency=2,
        device=torch.device("cpu"),
    ):
        self.alpha, self.gamma, self.tau, self.policy_noise, self.noise_clip = (
            alpha,
            gamma,
            tau,
            policy_noise,
            noise_clip,
        )
        self.policy_frequency = policy_frequency
        act_dim, hidden = actor.net[4].out_features, actor.net[0].out_features
        in_dim = critic.net[0].weight.shape[1]
        self.actor = mlp(actor.net[0].in_features, act_dim, hidden, nn.Tanh())
        self.actor.load_state_dict(actor.net.state_dict())
        self.scale, self.bias = actor.action_scale.clone(), actor.action_bias.clone()
        self.critics = [mlp(in_dim, 1, hidden) for _ in range(2)]
        for i, c in enumerate(self.critics):  # VectorizedLinear stores weight [n, in, out]; nn.Linear wants [out, in]
            for j in (0, 2, 4):
                c[j].weight.data.copy_(critic.net[j].weight[i].T)
                c[j].bias.data.copy_(critic.net[j].bias[i, 0])
        self.actor, self.critics = self.actor.to(device), [c.to(device) for c in self.critics]
        self.scale, self.bias = self.scale.to(device), self.bias.to(device)
        self.actor_target, self.critic_targets = copy.deepcopy(self.actor), copy.deepcopy(self.critics)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_optimizers = [torch.optim.Adam(c.parameters(), lr=lr) for c in self.critics]

    def act(self, obs):
        return self.actor(obs) * self.scale + self.bias

    def update(self, step: int, obs, actions, rewards, next_obs, terminations) -> dict:
        with torch.no_grad():
            noise = (torch.randn(rewards.shape[0], actions.shape[1], device=rewards.device) * self.policy_noise).clamp(
                -self.noise_clip, self.noise_clip
            )
            next_actions = (self.actor_target(next_obs) * self.scale + self.bias + noise * self.scale).clamp(
                self.bias - self.scale, self.bias + self.scale
            )
            x = torch.cat([next_obs, next_actions], 1)
            target_q = torch.min(self.critic_targets[0](x), self.critic_targets[1](x)).squeeze(1)
            y = rewards + self.gamma * (1 - terminations) * target_q
        x = torch.cat([obs, actions], 1)
        q1, q2 = self.critics[0](x).squeeze(1), self.critics[1](x).squeeze(1)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        for opt in self.critic_optimizers:
            opt.zero_grad()
        critic_loss.backward()
        for opt in self.critic_optimizers:
            opt.step()
        log = {"critic_loss": critic_loss.item(), "q1_mean": q1.mean().item()}
        if step % self.policy_frequency == 0:
            pi = self.act(obs)
            q = self.critics[0](torch.cat([obs, pi], 1))
            if self.alpha is None:
                actor_loss = -q.mean()
            else:
                lmbda = self.alpha / q.abs().mean().detach()
                actor_loss = -lmbda * q.mean() + F.mse_loss(pi, actions)
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()
            log["actor_loss"] = actor_loss.item()
            for net, target in [(self.actor, self.actor_target), *zip(self.critics, self.critic_targets)]:
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.data.copy_(self.tau * p.data + (1 - self.tau) * tp.data)
        return log


def synthetic_data(n: int, obs_dim: int, act_dim: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(n, obs_dim, generator=g),
        "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(n, generator=g),
        "next_obs": torch.randn(n, obs_dim, generator=g),
        "terminations": (torch.rand(n, generator=g) < 0.01).float(),
    }


def reference_offline(actor, critic, data: dict, args: bc.Args, device=torch.device("cpu")):
    """-> step(i): one reference TD3+BC update on a uniform batch (indices drawn like the project's, same RNG order)."""
    ref = ReferenceTD3(
        actor,
        critic,
        args.learning_rate,
        args.alpha,
        args.gamma,
        args.tau,
        args.policy_noise,
        args.noise_clip,
        args.policy_frequency,
        device,
    )
    data = {k: v.to(device) for k, v in data.items()}
    n = data["obs"].shape[0]

    def step(i: int) -> dict:
        idx = torch.randint(0, n, (args.batch_size,), device=device)
        return ref.update(i, *(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminations")))

    return ref, step


def project_offline(actor, critic, data: dict, args: bc.Args, device=torch.device("cpu")):
    """-> (nets, step(i)): td3_bc_offline's own update (make_update, fused Adam, packed data) and its loop body."""
    bc.setup_fast_path(args)
    actor, critic = copy.deepcopy(actor).to(device), copy.deepcopy(critic).to(device)
    actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    aopt = bc.adam(actor.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    copt = bc.adam(critic.parameters(), args.learning_rate, device, capturable=args.cudagraphs)
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    D = torch.cat(
        [data["obs"], data["actions"], data["rewards"][:, None], data["next_obs"], data["terminations"][:, None]], 1
    ).to(device)

    def sample_batch():
        o, a, r, o2, d = D[torch.randint(0, D.shape[0], (args.batch_size,), device=device)].split(
            [obs_dim, act_dim, 1, obs_dim, 1], 1
        )
        return o, a, r.squeeze(1), o2, d.squeeze(1)

    update_critic, update_actor = bc.make_update(
        actor, critic, actor_target, critic_target, aopt, copt, sample_batch, args
    )
    q_loss_sum = torch.zeros((), device=device)
    out = {}

    def step(i: int) -> dict:
        nonlocal q_loss_sum
        obs, actions, critic_loss, q1_mean = update_critic()
        q_loss_sum += critic_loss
        out.update(critic_loss=critic_loss, q1_mean=q1_mean)
        if i % args.policy_frequency == 0:
            out["actor_loss"], _, _ = update_actor(obs, actions)
        if i % args.log_freq == 0:
            q_loss_sum.item()  # the script's one host sync per log_freq updates
        return out

    return (actor, critic, actor_target, critic_target), step


def time_updates(step, n: int, warmup: int, sync=lambda: None) -> float:
    for i in range(1, warmup + 1):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(warmup + 1, warmup + n + 1):
        step(i)
    sync()
    return n / (time.perf_counter() - t)


def measure_offline(n: int, warmup: int, extra: bool) -> list:
    """-> groups of (what, updates/s) rows, each group's first row the eager reference on that device."""
    torch.manual_seed(0)
    obs_dim, act_dim = 11, 3
    data = synthetic_data(100_000, obs_dim, act_dim)
    actor, critic = bc.Actor(obs_dim, act_dim, -np.ones(act_dim), np.ones(act_dim)), bc.Critic(obs_dim, act_dim)
    devices = [
        (
            "cpu",
            [("fast path, exact fp32 (the default)", {})]
            + (
                [
                    ("fast path + `--matmul-precision medium` (bf16 matmuls)", {"matmul_precision": "medium"}),
                    ("fast path + `--compile`", {"compile": True}),
                ]
                if extra
                else []
            ),
        )
    ]
    if torch.cuda.is_available():
        devices.append(
            (
                "cuda",
                [
                    ("fast path, exact fp32", {}),
                    ("fast path + `--cudagraphs`", {"cudagraphs": True}),
                    (
                        "fast path + `--cudagraphs --matmul-precision high` (TF32)",
                        {"cudagraphs": True, "matmul_precision": "high"},
                    ),
                ],
            )
        )
    groups = []
    for device_name, variants in devices:
        device = torch.device(device_name)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        ref_step = reference_offline(actor, critic, data, bc.Args(), device)[1]
        rows = [(f"TD3+BC updates/s on {device_name}: eager reference", time_updates(ref_step, n, warmup, sync))]
        for name, kw in variants:
            args = bc.Args(**kw)
            _, step = project_offline(actor, critic, data, args, device)
            rows.append(
                (
                    f"TD3+BC updates/s on {device_name}: {name}",
                    time_updates(step, n, warmup + (20 if args.compile else 0), sync),
                )
            )
            torch.set_float32_matmul_precision("highest")
            torch._dynamo.reset()
        groups.append(rows)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Online fine-tuning: CleanRL-style reference loop vs td3_adv_finetune.main
def reference_online(env_id: str, steps: int, learning_starts: int, seed: int = 1) -> float:
    """CleanRL td3_continuous_action.py's loop: NumPy replay buffer, one update per env step, `.item()` every 100
    steps."""
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    torch.manual_seed(seed)
    low, high = env.action_space.low, env.action_space.high
    # as CleanRL (and td3_adv_finetune.py) pick it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = ReferenceTD3(bc.Actor(obs_dim, act_dim, low, high), bc.Critic(obs_dim, act_dim), device=device)
    buf = {
        "obs": np.zeros((steps, obs_dim), np.float32),
        "actions": np.zeros((steps, act_dim), np.float32),
        "rewards": np.zeros(steps, np.float32),
        "next_obs": np.zeros((steps, obs_dim), np.float32),
        "terminations": np.zeros(steps, np.float32),
    }
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    t = time.perf_counter()
    for step in range(steps):
        if step < learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                a = ref.act(torch.Tensor(obs).to(device))
                a += torch.normal(0, ref.scale * 0.1)
                action = a.cpu().numpy().clip(low, high)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(buf, (obs, action, reward, next_obs, terminated)):
            buf[k][step] = v
        obs = env.reset()[0] if terminated or truncated else next_obs
        if step >= learning_starts:
            idx = np.random.randint(0, step + 1, 256)
            log = ref.update(step, *(torch.tensor(buf[k][idx], device=device) for k in buf))
            if step % 100 == 0:
                _ = dict(log)
    return steps / (time.perf_counter() - t)


def synthetic_run_files(folder: Path, env_id: str) -> tuple:
    """A checkpoint and perturbations file in the project's formats, from random networks (what --init scratch
    needs)."""
    import de_perturbations as de

    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor, critic = bc.Actor(obs_dim, act_dim, env.action_space.low, env.action_space.high), bc.Critic(obs_dim, act_dim)
    ckpt = {
        "format": bc.CHECKPOINT_FORMAT,
        "format_version": bc.CHECKPOINT_VERSION,
        "stage": "td3_bc_offline",
        "step": 0,
        "env_id": env_id,
        "max_episode_steps": env.spec.max_episode_steps,
        "dataset_id": "bench/none-v0",
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "hidden_dim": 256,
        "action_low": torch.as_tensor(env.action_space.low),
        "action_high": torch.as_tensor(env.action_space.high),
        "obs_mean": torch.zeros(obs_dim),
        "obs_std": torch.ones(obs_dim),
        "ref_min_score": None,
        "ref_max_score": None,
        "eval_return": 0.0,
        "eval_normalized_score": None,
        "actor": actor.state_dict(),
        "critic": critic.state_dict(),
        "actor_target": actor.state_dict(),
        "critic_target": critic.state_dict(),
        "args": {"seed": 0},
    }
    folder.mkdir(parents=True, exist_ok=True)
    bc.save_checkpoint(str(folder / "checkpoint.pt"), ckpt)
    rng = np.random.default_rng(0)
    de.save_npz(
        str(folder / "perturbations.npz"),
        {
            "format": de.PERTURBATION_FORMAT,
            "env_id": env_id,
            "epsilon": 0.3,
            "perturbation_model": "multiplicative",
            "perturbations": rng.uniform(-0.3, 0.3, (5, act_dim)),
            "random_deltas": rng.uniform(-0.3, 0.3, (5, act_dim)),
        },
    )
    return str(folder / "checkpoint.pt"), str(folder / "perturbations.npz")


def project_online(ckpt: str, pert: str, steps: int, learning_starts: int, workdir: Path, **kw) -> float:
    import td3_adv_finetune as ft

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        name = f"bench-{len(list(Path('runs').glob('*'))) if Path('runs').exists() else 0}"
        ft.main(
            ft.Args(
                checkpoint=ckpt,
                perturbations=pert,
                init="scratch",
                curriculum="fixed",
                total_steps=steps,
                learning_starts=learning_starts,
                eval_freq=steps,
                eval_episodes=1,
                run_name=name,
                **kw,
            )
        )
        rows = [json.loads(line) for line in open(Path("runs") / name / "metrics.jsonl")]
    finally:
        os.chdir(cwd)
    return [r["charts/sps"] for r in rows if "charts/sps" in r][-1]


def profile_gemm_share(n: int = 200):
    """Where the fast path's time goes on this machine: the share of GEMM kernels in one update, and the GFLOP/s of
    a 256×256×256 fp32 GEMM (the hidden layer's size) — the ceiling of any fp32 speed-up."""
    from torch.profiler import profile

    torch.manual_seed(0)
    data = synthetic_data(100_000, 11, 3)
    actor, critic = bc.Actor(11, 3, -np.ones(3), np.ones(3)), bc.Critic(11, 3)
    _, step = project_offline(actor, critic, data, bc.Args())
    time_updates(step, 100, 50)
    with profile() as prof:
        for i in range(1, n + 1):
            step(i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(
        e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    )
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    for _ in range(50):
        a @ b
    t = time.perf_counter()
    for _ in range(1000):
        a @ b
    gflops = 2 * 256**3 / ((time.perf_counter() - t) / 1000) / 1e9
    print(
        f"fast path, exact fp32, under torch.profiler: {total / n / 1000:.2f} ms per update, of which GEMMs "
        f"{gemm / n / 1000:.2f} ms ({100 * gemm / total:.0f}%); a 256×256×256 fp32 GEMM runs at {gflops:.0f} GFLOP/s "
        f"on {torch.get_num_threads()} threads"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=3000, help="TD3+BC updates timed per variant (after warm-up)")
    p.add_argument("--finetune-steps", type=int, default=5000, help="online fine-tuning env steps per variant")
    p.add_argument("--learning-starts", type=int, default=1000, help="random-action steps before updates begin")
    p.add_argument("--de-steps", type=int, default=50_000, help="env steps per DE measurement")
    p.add_argument("--env-id", default="Hopper-v5")
    p.add_argument("--no-extra", action="store_true", help="skip the optional variants (bf16 matmuls, --compile)")
    p.add_argument("--profile", action="store_true", help="only profile the fast path: its GEMM share and GEMM GFLOP/s")
    a = p.parse_args()
    if a.profile:
        return profile_gemm_share()
    threads = torch.get_num_threads()  # before DE's in-process worker sets its own
    offline_groups = measure_offline(a.updates, max(10, a.updates // 10), not a.no_extra)
    tmp = Path(tempfile.mkdtemp(prefix="fast-path-"))
    ckpt, pert = synthetic_run_files(tmp, a.env_id)
    online = [
        (
            "fine-tuning env steps/s: eager reference (CleanRL-style loop)",
            reference_online(a.env_id, a.finetune_steps, a.learning_starts),
        ),
        (
            "fine-tuning env steps/s: `td3_adv_finetune.py` (fast path, exact fp32)",
            project_online(ckpt, pert, a.finetune_steps, a.learning_starts, tmp),
        ),
    ]
    if torch.cuda.is_available():
        online.append(
            (
                "fine-tuning env steps/s: `td3_adv_finetune.py --cudagraphs`",
                project_online(ckpt, pert, a.finetune_steps, a.learning_starts, tmp, cudagraphs=True),
            )
        )
    if not a.no_extra:
        online.append(
            (
                "fine-tuning env steps/s: `td3_adv_finetune.py --matmul-precision medium`",
                project_online(ckpt, pert, a.finetune_steps, a.learning_starts, tmp, matmul_precision="medium"),
            )
        )
        torch.set_float32_matmul_precision("highest")
    de_rows = measure_de(ckpt, a.env_id, a.de_steps)[1:]  # serial policy rollout, lockstep with 1 and all workers
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n"
    )
    print("| what | figure | vs reference |\n|---|---|---|")
    for group in (*offline_groups, online, de_rows):
        for what, v in group:
            print(f"| {what} | {v:,.0f} | {v / group[0][1]:.2f}× |")


if __name__ == "__main__":
    main()
