"""td3_adv_finetune.py: curricula, batch composition, perturbation injection, TD3 loss, start state, CLI."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch

import de_perturbations as de
import td3_adv_finetune as ft
import td3_bc_offline as tb
from conftest import assert_one_line_error, assert_usage_error, run_cli, run_script
from robust_o2o.formats import load_checkpoint


def test_linear_curriculum_shape():
    assert ft.linear_q(0, 100, 0.1, 1.0) == pytest.approx(0.1)
    assert ft.linear_q(50, 100, 0.1, 1.0) == pytest.approx(0.55)
    assert ft.linear_q(100, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert ft.linear_q(250, 100, 0.1, 1.0) == pytest.approx(1.0)


def test_adaptive_curriculum_hand_computed_sequence():
    """R in normalized points (0 random, 100 expert); η is per random-to-expert span, so the step is η ΔR̄ / 100."""
    q, ema = 0.1, 20.0  # R̄_0 = R_0 = 20
    expected = [(29.0, 0.163), (25.4, 0.1378), (47.54, 0.29278)]
    for R, (ema_exp, q_exp) in zip([30.0, 25.0, 50.0], expected):
        q, ema = ft.adaptive_q(q, ema, R, beta=0.9, eta=0.7, q_min=0.0, q_max=1.0)
        assert ema == pytest.approx(ema_exp) and q == pytest.approx(q_exp)
    assert ft.adaptive_q(0.9, 0.0, 500.0, 0.9, 0.7, 0.0, 1.0)[0] == 1.0  # clipped at q_max
    assert ft.adaptive_q(0.1, 500.0, 0.0, 0.9, 0.7, 0.05, 1.0)[0] == 0.05  # clipped at q_min
    assert ft.adaptive_q(0.3, 20.0, 60.0, 1.0, 0.5, 0.0, 1.0) == pytest.approx((0.5, 60.0))  # β = 1: no smoothing
    assert ft.adaptive_q(0.3, 20.0, 90.0, 0.9, 0.0, 0.0, 1.0)[0] == 0.3  # η = 0: q never moves
    rng = np.random.default_rng(0)
    q, ema, bounds_hit = 0.5, 0.0, set()
    for R in rng.normal(0, 300, 200):  # the update rule, step by step, on a noisy sequence that drives q to both bounds
        ema_next = 0.9 * R + 0.1 * ema
        q_next = min(max(q + 0.7 * (ema_next - ema) / 100, 0.1), 0.9)
        q, ema = ft.adaptive_q(q, ema, R, 0.9, 0.7, 0.1, 0.9)
        assert q == pytest.approx(q_next) and ema == pytest.approx(ema_next)
        bounds_hit |= {q} & {0.1, 0.9}
    assert bounds_hit == {0.1, 0.9}


def test_batch_composition_matches_r_off(hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch):
    """batch_split's arithmetic, then the loop itself: every batch it trains on holds exactly batch_split(...) rows of
    the offline data, after rows of its own online buffer."""
    assert ft.batch_split(256, 0.1, 10_000, True) == 26
    assert ft.batch_split(256, 0.0, 10_000, True) == 0 and ft.batch_split(256, 1.0, 10_000, True) == 256
    assert ft.batch_split(256, 0.1, 100, True) == 256  # too little online data yet: all offline
    assert ft.batch_split(256, 0.1, 10_000, False) == 0  # scratch: no offline data

    batches, real = [], ft.mixed_batch

    def spy(online, offline, batch_size, r_off):
        batch = real(online, offline, batch_size, r_off)
        batches.append((batch_size, r_off, online.size, batch[0], online.data["obs"][: online.size], offline["obs"]))
        return batch

    monkeypatch.setattr(ft, "mixed_batch", spy)
    monkeypatch.chdir(tmp_path)
    args = dict(total_steps=60, eval_freq=60, eval_episodes=1, batch_size=16, r_off=0.25, cuda=False, run_name="mix")
    ft.main(ft.Args(checkpoint=hopper_checkpoint, perturbations=hopper_perturbations, **args))

    def within(rows, store):  # every row is one of the store's rows
        return bool((rows[:, None, :] == store[None]).all(-1).any(1).all())

    assert len(batches) == 60 - 16  # one per update, once the buffer holds more than learning_starts (one batch)
    shares = set()
    for batch_size, r_off, n_online, obs, online_obs, offline_obs in batches:
        n_offline = ft.batch_split(batch_size, r_off, n_online, True)
        assert batch_size == 16 and r_off == 0.25 and len(obs) == 16
        assert within(obs[16 - n_offline :], offline_obs) and within(obs[: 16 - n_offline], online_obs)
        shares.add(n_offline)
    assert shares == {4}  # r_off · B


def test_perturbation_code_is_the_same_in_both_scripts():
    rng = np.random.default_rng(0)
    low, high = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0])
    for model in ("multiplicative", "additive"):
        a, d = rng.uniform(-3, 5, (50, 3)), rng.uniform(-0.9, 0.9, (50, 3))
        np.testing.assert_array_equal(
            ft.perturb_action(a, d, low, high, model), de.perturb_action(a, d, low, high, model)
        )
    # the wrapper draws δ per episode by the condition; it applies the perturbation model the evaluators use
    bank = rng.uniform(-0.3, 0.3, (4, 3))
    env = ft.ActionPerturbation(gym.make("Hopper-v5"), 0.3, "multiplicative", "adversarial", bank, q=1.0)
    delta = env.reset(seed=0)[1]["delta"]
    a = rng.uniform(-1, 1, 3).astype(np.float32)
    np.testing.assert_array_equal(env.action(a), de.perturb_action(a, delta, env.low, env.high, "multiplicative"))


@pytest.mark.parametrize("condition", ["random", "adversarial"])
def test_injection_fraction_matches_q_and_deltas_are_valid(condition):
    bank = np.array([[0.2, -0.2, 0.1], [-0.3, 0.3, 0.0]])
    env = ft.ActionPerturbation(gym.make("Hopper-v5"), 0.3, "multiplicative", condition, bank, q=0.3)
    env.reset(seed=0)
    ds = np.array([env.reset()[1]["delta"] for _ in range(3000)])
    hit = ds.any(1)
    assert abs(hit.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 3000)
    if condition == "adversarial":
        assert all(any(np.array_equal(d, b) for b in bank) for d in ds[hit])
    else:
        assert np.all(np.abs(ds) <= 0.3) and len(np.unique(ds[hit], axis=0)) == hit.sum()


def test_finetune_actor_loss_has_no_bc_term():
    torch.manual_seed(0)
    actor, critic = ft.Actor(3, 2, -np.ones(2), np.ones(2), 16), ft.Critic(3, 2, 16)
    obs = torch.randn(32, 3)
    torch.testing.assert_close(ft.td3_actor_loss(actor, critic, obs), -critic(obs, actor(obs))[0].mean())
    dataset_actions = torch.rand(32, 2)
    bc_loss, _, _ = tb.td3_bc_actor_loss(actor, critic, obs, dataset_actions, alpha=2.5)
    assert not torch.allclose(bc_loss, ft.td3_actor_loss(actor, critic, obs))


def test_buffer_stores_the_chosen_action_not_the_executed_one(
    hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    chosen, executed, stored = [], [], []
    orig_action, orig_add = ft.ActionPerturbation.action, ft.OnlineBuffer.add

    def action(self, a):
        chosen.append(np.array(a))
        out = orig_action(self, a)
        executed.append(out)
        return out

    def add(self, obs, a, *rest):
        stored.append(np.array(a))
        return orig_add(self, obs, a, *rest)

    monkeypatch.setattr(ft.ActionPerturbation, "action", action)
    monkeypatch.setattr(ft.OnlineBuffer, "add", add)
    ft.main(
        ft.Args(
            checkpoint=hopper_checkpoint,
            curriculum="fixed",
            q=1.0,
            total_steps=40,
            eval_freq=40,
            eval_episodes=1,
            batch_size=16,
            cuda=False,
            run_name="buf",
        )
    )
    assert len(stored) == len(chosen) == 40
    np.testing.assert_array_equal(np.array(stored), np.array(chosen))
    assert np.abs(np.array(executed) - np.array(chosen)).max() > 1e-3  # δ ≠ 0: the executed action differs


def test_start_policy_is_the_checkpoint_and_evaluation_matches_de(
    hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    ft.main(
        ft.Args(
            checkpoint=hopper_checkpoint,
            curriculum="adaptive",
            total_steps=30,
            eval_freq=30,
            eval_episodes=2,
            batch_size=16,
            cuda=False,
            run_name="start",
        )
    )
    rows = [json.loads(line) for line in open("runs/start/metrics.jsonl")]
    first = rows[0]
    assert first["step"] == 0 and first["curriculum/q"] == pytest.approx(0.1)
    ckpt, pert = de.load_checkpoint(hopper_checkpoint), np.load(hopper_perturbations)
    ev = de.PopulationEvaluator(ckpt, "multiplicative", ckpt["max_episode_steps"], 1)  # fine-tuning plays that limit
    seeds = 10_000 + np.arange(2)
    # the same episodes, alone instead of in fine-tuning's batch of every condition: equal up to summation order, as a
    # return does not depend on what shares its batch (robust_o2o.evaluation.float64_policy)
    assert first["eval/normal_return"] == pytest.approx(ev.returns(np.zeros((1, 3)), seeds)[0], rel=1e-12)
    per_episode = [ev.returns(pert["perturbations"][i % 2][None], seeds[i : i + 1])[0] for i in range(2)]
    assert first["eval/adversarial_return"] == pytest.approx(np.mean(per_episode), rel=1e-12)
    assert first["curriculum/ema"] == pytest.approx(first["eval/normal_normalized"])
    lo, hi = ckpt["ref_min_score"], ckpt["ref_max_score"]  # one scale everywhere: 0 = random, 100 = expert
    for cond in ("normal", "random", "adversarial"):
        assert first[f"eval/{cond}_normalized"] == pytest.approx(100 * (first[f"eval/{cond}_return"] - lo) / (hi - lo))
    last = [r for r in rows if "eval/normal_return" in r][-1]
    q_exp, _ = ft.adaptive_q(0.1, first["curriculum/ema"], last["eval/normal_normalized"], 0.9, 0.7, 0.0, 1.0)
    assert last["curriculum/q"] == pytest.approx(q_exp)
    saved = load_checkpoint("runs/start/checkpoint.pt")
    assert saved["stage"] == "td3_adv_finetune" and saved["q"] == pytest.approx(q_exp) and saved["step"] == 30
    assert saved["eval_normalized_score"] == pytest.approx(last["eval/normal_normalized"])
    assert torch.equal(saved["obs_mean"], ckpt["obs_mean"])


def test_documented_metrics_are_the_logged_ones(hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch):
    """docs/td3_adv_finetune.md lists the keys of each kind of metrics row; the rows hold exactly those."""
    import re

    from conftest import ROOT

    table = (ROOT / "docs" / "td3_adv_finetune.md").read_text().split("<!-- finetune-metrics:start -->")[1]
    first, later, episode = (
        {k for k in re.findall(r"`([a-z_0-9]+/[a-z_0-9]+)`", line)}
        for line in table.split("<!-- finetune-metrics:end -->")[0].strip().splitlines()[2:]
    )
    monkeypatch.chdir(tmp_path)
    limit = load_checkpoint(hopper_checkpoint)["max_episode_steps"]
    ft.main(  # more steps than the episode limit: an episode ends (and is logged) however long the policy stands
        ft.Args(
            checkpoint=hopper_checkpoint,
            total_steps=2 * limit,
            eval_freq=limit,
            eval_episodes=1,
            batch_size=16,
            cuda=False,
            run_name="keys",
        )
    )
    rows = [json.loads(line) for line in open("runs/keys/metrics.jsonl")]
    evals = [r for r in rows if "eval/normal_return" in r]
    assert set(rows[0]) - {"step"} == first and rows[0]["step"] == 0 and len(evals) == 3
    for r in evals[1:]:
        assert set(r) - {"step"} == first | later, r["step"]
    episodes = [r for r in rows if "eval/normal_return" not in r]
    for r in episodes:
        assert set(r) - {"step"} == episode, r
    assert episodes


TINY = ["--total-steps", "60", "--eval-freq", "30", "--eval-episodes", "1", "--batch-size", "16"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--curriculum", "adaptive"],
        ["--curriculum", "linear"],
        ["--curriculum", "fixed", "--finetune-condition", "random"],
        ["--curriculum", "fixed", "--finetune-condition", "normal"],
        ["--init", "scratch", "--learning-starts", "20"],
    ],
)
def test_cli_smoke(hopper_checkpoint, hopper_perturbations, tmp_path, extra):
    proc = run_script("td3_adv_finetune.py", "--checkpoint", hopper_checkpoint, *TINY, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = next((tmp_path / "runs").iterdir())
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = [r for r in rows if "eval/adversarial_return" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    ckpt = load_checkpoint(str(run / "checkpoint.pt"))
    assert ckpt["step"] == 60 and 0 <= ckpt["q"] <= 1
    if "linear" in extra:
        assert evals[-1]["curriculum/q"] == pytest.approx(1.0) and evals[1]["curriculum/q"] == pytest.approx(
            0.55, abs=0.02
        )


def test_cli_bad_input_is_one_clear_line(hopper_checkpoint, hopper_perturbations, tmp_path):
    """One case from the command line (a subprocess); the rest in-process, through the same entry point."""
    assert_one_line_error(
        run_script("td3_adv_finetune.py", "--checkpoint", str(tmp_path / "x.pt"), cwd=tmp_path), "td3_bc_offline.py"
    )
    base = ["--checkpoint", hopper_checkpoint]
    for argv, needle in [
        (["--q", "1.5"], "--q"),
        (["--q-max", "2"], "--q-max"),
        (["--r-off", "-0.1"], "--r-off"),
        (["--beta", "0"], "--beta"),
        (["--beta", "1.2"], "--beta"),
        (["--eta", "-1"], "--eta"),
        (["--total-steps", "-5"], "--total-steps"),
    ]:
        assert_one_line_error(run_cli("td3_adv_finetune.py", *base, *argv, cwd=tmp_path), needle)
    for flag, value in (("--init", "warm"), ("--curriculum", "cosine"), ("--finetune-condition", "hostile")):
        assert_usage_error(run_cli("td3_adv_finetune.py", *base, flag, value, cwd=tmp_path), flag)
    shutil.copy(hopper_checkpoint, tmp_path / "c.pt")
    assert_one_line_error(
        run_cli("td3_adv_finetune.py", "--checkpoint", str(tmp_path / "c.pt"), cwd=tmp_path), "de_perturbations.py"
    )
    d = dict(np.load(hopper_perturbations))
    d["perturbations"] = np.zeros((2, 5))  # Hopper has 3 action dimensions
    np.savez(tmp_path / "bad.npz", **d)
    assert_one_line_error(
        run_cli("td3_adv_finetune.py", *base, "--perturbations", str(tmp_path / "bad.npz"), cwd=tmp_path),
        "width of δ",
        "de_perturbations.py",
    )
    d["random_deltas"] = np.zeros((3, 5))  # both of width 5: a set for another env's actions
    np.savez(tmp_path / "bad.npz", **d)
    assert_one_line_error(
        run_cli("td3_adv_finetune.py", *base, "--perturbations", str(tmp_path / "bad.npz"), cwd=tmp_path),
        "width (5,)",
        "width 3 (the action dimension",
        "de_perturbations.py",
    )
    assert not (tmp_path / "runs").exists()


def test_plain_command_finds_the_pipeline_outputs_and_repeats(hopper_checkpoint, hopper_perturbations, tmp_path):
    """`python td3_adv_finetune.py --curriculum adaptive` after `run_pipeline.sh`: the defaults find its checkpoint."""
    assert_one_line_error(
        run_script("td3_adv_finetune.py", "--curriculum", "adaptive", cwd=tmp_path), "run_pipeline.sh"
    )
    assert_one_line_error(run_script("de_perturbations.py", cwd=tmp_path), "run_pipeline.sh")
    quick = tmp_path / "runs" / "local-quick-hopper-medium-v0__td3_bc_offline__1"
    quick.mkdir(parents=True)
    shutil.copy(hopper_checkpoint, quick / "checkpoint.pt")
    shutil.copy(hopper_perturbations, quick / "perturbations.npz")
    for _ in range(2):
        proc = run_script("td3_adv_finetune.py", "--curriculum", "adaptive", *TINY, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "using checkpoint runs/local-quick-hopper-medium-v0__td3_bc_offline__1/checkpoint.pt" in proc.stdout
    runs = [d.name for d in (tmp_path / "runs").iterdir() if "td3_adv_finetune" in d.name]
    assert len(runs) == 2 and all(
        r.startswith("Hopper-v5__td3_adv_finetune__offline-adversarial-adaptive__1__") for r in runs
    )


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_realized_exposure_is_logged_and_counts_what_ran(
    hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch, q
):
    """charts/perturbed_fraction and charts/perturbed_step_fraction: the shares of training episodes and env steps that
    ran under δ ≠ 0. At q = 0 nothing is perturbed, at q = 1 everything; and they agree with the per-episode rows."""
    monkeypatch.chdir(tmp_path)
    ft.main(
        ft.Args(
            checkpoint=hopper_checkpoint,
            total_steps=120,
            eval_freq=60,
            eval_episodes=1,
            batch_size=16,
            cuda=False,
            run_name="exposure",
            curriculum="fixed",
            q=q,
        )
    )
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "exposure" / "metrics.jsonl")]
    last = [r for r in rows if "charts/perturbed_step_fraction" in r][-1]
    assert last["charts/perturbed_fraction"] == q and last["charts/perturbed_step_fraction"] == q
    episodes = [r for r in rows if "charts/perturbed" in r]
    assert episodes and all(r["charts/perturbed"] == bool(q) for r in episodes)


def test_episode_counters_save_and_restore_by_name():
    c = ft.EpisodeCounters()
    c.start(np.array([0.1, 0.0, 0.0]))
    for r in (1.0, 2.0):
        c.step(r)
    c.start(np.zeros(3))
    c.step(0.5)
    assert (c.episodes, c.perturbed_episodes, c.steps, c.perturbed_steps, c.episode_return) == (2, 1, 3, 2, 0.5)
    assert c.exposure() == {"charts/perturbed_fraction": 0.5, "charts/perturbed_step_fraction": pytest.approx(2 / 3)}
    import dataclasses

    assert ft.EpisodeCounters(**dataclasses.asdict(c)) == c


def test_reset_optimizers_says_which_states_start_fresh(hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch):
    """--reset-optimizers none keeps both Adam states of the checkpoint, actor resets the actor's, both resets both:
    checked on the state before the first update (learning starts after the run's only step)."""
    monkeypatch.chdir(tmp_path)
    saved = torch.load(hopper_checkpoint, weights_only=True)
    for variant, fresh in (
        ("none", ()),
        ("actor", ("actor_optimizer",)),
        ("both", ("actor_optimizer", "critic_optimizer")),
    ):
        ft.main(
            ft.Args(
                checkpoint=hopper_checkpoint,
                total_steps=1,
                eval_freq=1,
                eval_episodes=1,
                batch_size=16,
                learning_starts=10,
                cuda=False,
                run_name=f"reset-{variant}",
                reset_optimizers=variant,
            )
        )
        ckpt = torch.load(tmp_path / "runs" / f"reset-{variant}" / "checkpoint.pt", weights_only=True)
        for name in ("actor_optimizer", "critic_optimizer"):
            assert (ckpt[name]["state"] == {}) == (name in fresh), (variant, name)
            if name not in fresh:
                assert torch.equal(ckpt[name]["state"][0]["exp_avg_sq"], saved[name]["state"][0]["exp_avg_sq"])


def test_scratch_starts_from_fresh_networks_not_the_checkpoint(hopper_checkpoint, tmp_path, monkeypatch):
    """--init scratch takes only the env and action bounds from the checkpoint: before its first update (the default
    warm-up is 25k random steps) its networks are a fresh initialization, its observations unnormalized, and no
    offline data is loaded; an offline start's step-0 networks are the checkpoint's."""
    monkeypatch.chdir(tmp_path)
    common = dict(checkpoint=hopper_checkpoint, total_steps=20, eval_freq=20, eval_episodes=1, cuda=False)
    ft.main(ft.Args(init="scratch", curriculum="adaptive", run_name="scratch", **common))
    ft.main(ft.Args(run_name="offline", learning_starts=1000, **common))
    source = load_checkpoint(hopper_checkpoint)
    scratch, offline = load_checkpoint("runs/scratch/checkpoint.pt"), load_checkpoint("runs/offline/checkpoint.pt")
    for key in ("net.0.weight", "net.4.weight"):
        assert not torch.equal(scratch["actor"][key], source["actor"][key])
        assert torch.equal(offline["actor"][key], source["actor"][key])  # no update yet: the checkpoint's own
    assert not torch.equal(scratch["critic"]["net.0.weight"], source["critic"]["net.0.weight"])
    assert torch.equal(scratch["obs_mean"], torch.zeros(11)) and torch.equal(scratch["obs_std"], torch.ones(11))
    assert torch.equal(offline["obs_mean"], source["obs_mean"])
    assert scratch["init"] == "scratch" and offline["init"] == "offline"


def test_the_kept_policies_are_those_of_the_last_k_evaluations(tmp_path):
    """--keep-checkpoints K keeps the policies of the last K evaluations (every eval_freq steps and at the end)."""
    from td3_adv_finetune import save_policy

    def kept(total, freq, k):
        folder = tmp_path / f"{total}-{freq}-{k}"
        folder.mkdir()
        args = ft.Args(total_steps=total, eval_freq=freq, keep_checkpoints=k)
        for step in sorted({*range(freq, total + 1, freq), total}):
            save_policy(str(folder), {"step": step}, args)
        assert torch.load(folder / "checkpoint.pt", weights_only=True) == {"step": total}
        return sorted(int(p.stem.removeprefix("checkpoint_step")) for p in folder.glob("checkpoint_step*.pt"))

    assert kept(100_000, 5_000, 4) == [85_000, 90_000, 95_000, 100_000]
    assert kept(100, 30, 2) == [90, 100]  # the run's last step is an evaluation too
    assert kept(60, 30, 4) == [30, 60] and kept(60, 30, 0) == []
