"""td3_bc_offline.py: loss pieces, data handling, checkpoint contract, CLI, and that learning happens."""

import json
import os
import pickle

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
import torch.nn as nn

import collect_dataset as cd
import td3_bc_offline as tb
from conftest import assert_one_line_error, run_cli, run_script
from robust_o2o.formats import load_checkpoint


class ConstCritic(nn.Module):
    """Stub critic: Q1 = q1, Q2 = q2 for every input; records the actions it was asked about."""

    def __init__(self, q1: float, q2: float):
        super().__init__()
        self.q, self.seen = torch.tensor([q1, q2]), []

    def forward(self, obs, act):
        self.seen.append(act)
        return self.q[:, None].expand(2, obs.shape[0])


def small_actor(obs_dim=3, act_dim=2, low=-2.0, high=2.0):
    torch.manual_seed(0)
    return tb.Actor(obs_dim, act_dim, np.full(act_dim, low), np.full(act_dim, high), hidden_dim=16)


def test_vectorized_critic_equals_two_separate_mlps():
    torch.manual_seed(0)
    critic = tb.Critic(3, 2, hidden_dim=8)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (2, 5)
    x = torch.cat([obs, act], -1)
    for i in range(2):
        h = x
        for layer in critic.net:
            h = h @ layer.weight[i] + layer.bias[i, 0] if isinstance(layer, tb.VectorizedLinear) else torch.relu(h)
        torch.testing.assert_close(q[i], h.squeeze(-1))


def test_td_target_bootstraps_truncations_not_terminations():
    actor = small_actor()
    reward, next_obs = torch.tensor([1.0, 1.0]), torch.randn(2, 3)
    termination = torch.tensor([1.0, 0.0])  # row 0 terminated; row 1 truncated (or mid-episode): bootstrap
    y = tb.td_target(
        ConstCritic(5.0, 3.0), actor, next_obs, reward, termination, gamma=0.9, policy_noise=0.2, noise_clip=0.5
    )
    torch.testing.assert_close(y, torch.tensor([1.0, 1.0 + 0.9 * 3.0]))  # min(Q1', Q2') = 3


def test_target_policy_noise_is_clipped_and_actions_stay_in_bounds():
    actor, critic = small_actor(), ConstCritic(0.0, 0.0)
    next_obs = torch.randn(4096, 3)
    tb.td_target(critic, actor, next_obs, torch.zeros(4096), torch.zeros(4096), 0.99, policy_noise=10.0, noise_clip=0.5)
    a2 = critic.seen[-1]
    dev = (a2 - actor(next_obs)).abs()
    assert dev.max() <= 0.5 * 2.0 + 1e-5  # clip c = 0.5 in units of the half-range (2)
    assert dev.max() > 0.9  # the noise is really there
    assert a2.min() >= -2.0 and a2.max() <= 2.0
    critic2 = ConstCritic(0.0, 0.0)
    tb.td_target(critic2, actor, next_obs, torch.zeros(4096), torch.zeros(4096), 0.99, policy_noise=0.0, noise_clip=0.5)
    torch.testing.assert_close(critic2.seen[-1], actor(next_obs).detach().clamp(-2, 2))


def test_actor_loss_lambda_normalization_and_bc_term():
    actor = small_actor()
    torch.manual_seed(1)
    critic = tb.Critic(3, 2, hidden_dim=8)
    obs, actions = torch.randn(64, 3), torch.rand(64, 2) * 4 - 2
    loss, lmbda, bc = tb.td3_bc_actor_loss(actor, critic, obs, actions, alpha=2.5)
    pi = actor(obs)
    q1 = critic(obs, pi)[0]
    torch.testing.assert_close(lmbda, 2.5 / q1.abs().mean())
    torch.testing.assert_close(bc, ((pi - actions) ** 2).mean())
    torch.testing.assert_close(loss, -lmbda * q1.mean() + bc)
    # λ is a constant for the gradient (detached): d loss / dθ equals that of -λ₀ Q1 + BC with λ₀ fixed
    loss.backward()
    g = [p.grad.clone() for p in actor.parameters()]
    actor.zero_grad()
    pi = actor(obs)
    (
        -(2.5 / critic(obs, pi)[0].abs().mean().item()) * critic(obs, pi)[0].mean() + ((pi - actions) ** 2).mean()
    ).backward()
    for a, b in zip(g, [p.grad for p in actor.parameters()]):
        torch.testing.assert_close(a, b)
    # α = 0 is pure behaviour cloning; actions equal to π(s) cost nothing
    loss0, _, bc0 = tb.td3_bc_actor_loss(actor, critic, obs, actions, alpha=0.0)
    torch.testing.assert_close(loss0, bc0)
    _, _, bc_self = tb.td3_bc_actor_loss(actor, critic, obs, actor(obs).detach(), alpha=2.5)
    assert bc_self.item() == 0.0


def test_transitions_keep_truncated_next_observation(hopper_datasets):
    ds = minari.load_dataset(hopper_datasets["medium"])
    data = tb.dataset_to_transitions(ds)
    assert data["obs"].shape == (ds.total_steps, 11) and data["next_obs"].shape == (ds.total_steps, 11)
    i = 0
    for ep in ds.iterate_episodes():
        T = len(ep.rewards)
        np.testing.assert_allclose(data["next_obs"][i + T - 1], ep.observations[-1], rtol=1e-6)
        assert data["terminations"][i + T - 1] == float(ep.terminations[-1])  # truncation -> 0: bootstraps
        assert not data["terminations"][i : i + T - 1].any()
        i += T


def test_checkpoint_round_trip_acts_identically(hopper_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tb.main(
        tb.Args(
            dataset_id=hopper_datasets["medium"],
            total_steps=60,
            eval_freq=30,
            eval_episodes=2,
            log_freq=20,
            batch_size=32,
            cuda=False,
            run_name="rt",
        )
    )
    ckpt = load_checkpoint("runs/rt/checkpoint.pt")
    for key in (
        "actor",
        "critic",
        "actor_target",
        "critic_target",
        "actor_optimizer",
        "critic_optimizer",
        "obs_mean",
        "obs_std",
        "env_id",
        "dataset_id",
        "action_low",
        "action_high",
        "args",
        "step",
        "ref_min_score",
    ):
        assert key in ckpt, key
    assert ckpt["step"] == 60 and ckpt["env_id"] == "Hopper-v5" and ckpt["dataset_id"] == hopper_datasets["medium"]
    data = tb.dataset_to_transitions(minari.load_dataset(hopper_datasets["medium"]))
    torch.testing.assert_close(ckpt["obs_mean"], torch.as_tensor(data["obs"].mean(0)), rtol=1e-4, atol=1e-4)
    actor = tb.actor_from_checkpoint(ckpt)
    env = gym.make("Hopper-v5", max_episode_steps=100)
    returns = tb.evaluate(actor, env, ckpt["obs_mean"], ckpt["obs_std"], 2, seed=10_000)
    last_eval = [r for r in map(json.loads, open("runs/rt/metrics.jsonl")) if "eval/return_mean" in r][-1]
    assert returns.mean() == pytest.approx(last_eval["eval/return_mean"], rel=1e-9)  # identical actions
    # the stored normalization is used: acting on raw observations gives different actions
    obs = torch.as_tensor(data["obs"][:8])
    assert not torch.allclose(actor((obs - ckpt["obs_mean"]) / ckpt["obs_std"]), actor(obs))


def test_load_checkpoint_refuses_bad_files_without_running_code(tmp_path):
    with pytest.raises(tb.UserError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(tb.UserError, match="unreadable"):
        load_checkpoint(str(tmp_path / "garbage.pt"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": tb.CHECKPOINT_FORMAT, "x": Evil()}, f)
    with pytest.raises(tb.UserError, match="unreadable"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(tb.UserError, match="not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_cli_smoke(hopper_datasets, tmp_path):
    proc = run_script(
        "td3_bc_offline.py",
        "--dataset-id",
        hopper_datasets["expert"],
        "--total-steps",
        "40",
        "--eval-freq",
        "20",
        "--eval-episodes",
        "1",
        "--batch-size",
        "32",
        "--log-freq",
        "10",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / f"{hopper_datasets['expert'].replace('/', '-')}__td3_bc_offline__1"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/return_mean" in r] == [20, 40]
    assert all(r["eval/normalized_score"] is not None for r in rows if "eval/return_mean" in r)
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 40
    again = run_script(
        "td3_bc_offline.py", "--dataset-id", hopper_datasets["expert"], "--total-steps", "1", cwd=tmp_path
    )
    assert_one_line_error(again, "--overwrite")


def test_cli_bad_input_is_one_clear_line(hopper_datasets, tmp_path):
    """Two cases from the command line (subprocesses; the second within 20 s); the rest in-process, through the same
    entry point."""
    assert_one_line_error(
        run_script("td3_bc_offline.py", "--dataset-id", "local/hopper/nothing-v0", cwd=tmp_path),
        "collect_dataset.py",
        "minari download",
    )
    quick = run_script("td3_bc_offline.py", "--dataset-id", "local-quick/hopper/nothing-v0", cwd=tmp_path, timeout=20)
    assert_one_line_error(quick, "not in the local Minari store")  # never looked up online: fails at once
    assert_one_line_error(
        run_cli(
            "td3_bc_offline.py",
            "--dataset-id",
            hopper_datasets["medium"],
            "--env-id",
            "InvertedPendulum-v5",
            cwd=tmp_path,
        ),
        "does not match",
    )
    assert_one_line_error(
        run_cli(
            "td3_bc_offline.py", "--dataset-id", hopper_datasets["medium"], "--env-id", "NoSuchEnv-v0", cwd=tmp_path
        ),
        "unknown env id",
    )
    assert_one_line_error(
        run_cli("td3_bc_offline.py", "--dataset-id", hopper_datasets["medium"], "--total-steps", "-5", cwd=tmp_path),
        ">= 1",
    )
    cd.write_minari_dataset("test/hopper/empty-v0", [], "Hopper-v5", 0.0, 1.0, "empty", {}, overwrite=True)
    assert_one_line_error(run_cli("td3_bc_offline.py", "--dataset-id", "test/hopper/empty-v0", cwd=tmp_path), "empty")
    assert not (tmp_path / "runs").exists()  # refused runs leave no output folder


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_learning_happens_on_a_competent_behaviour_dataset(seed, tmp_path, monkeypatch):
    """A noisy PD controller balances InvertedPendulum (return 200/200). TD3+BC from 4k of its transitions must
    go from a failing random-init policy to near the behaviour policy's return in 1000 updates."""
    monkeypatch.chdir(tmp_path)
    env = gym.make("InvertedPendulum-v5", max_episode_steps=200)
    rng = np.random.default_rng(seed)
    gains = np.array([1.0, 10.0, 1.0, 1.0])
    eps, behaviour = cd.rollout(
        env, lambda o: np.clip([gains @ o + rng.normal(0, 0.3)], -3, 3).astype(np.float32), 4000, seed
    )
    random_return = np.mean(cd.random_returns(env, 20, seed))
    ds_id = f"test/invertedpendulum/pd{seed}-v0"
    cd.write_minari_dataset(
        ds_id, eps, "InvertedPendulum-v5", float(random_return), 200.0, "pd", {}, overwrite=True, max_episode_steps=200
    )
    args = tb.Args(
        dataset_id=ds_id, total_steps=1000, eval_freq=1000, eval_episodes=5, seed=seed, cuda=False, run_name="l"
    )
    torch.manual_seed(seed)
    untrained = tb.Actor(4, 1, env.action_space.low, env.action_space.high)
    before = tb.evaluate(untrained, env, torch.zeros(4), torch.ones(4), 5, args.eval_seed).mean()
    tb.main(args)
    after = [r for r in map(json.loads, open("runs/l/metrics.jsonl")) if "eval/return_mean" in r][-1][
        "eval/return_mean"
    ]
    assert np.mean(behaviour) == 200.0 and random_return < 20 and before < 50
    assert after >= 0.9 * np.mean(behaviour), (before, after)
