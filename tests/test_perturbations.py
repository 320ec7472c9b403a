"""de_perturbations.py: perturbation semantics, batched = serial evaluation, the adversary is real, .npz contract."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import de_perturbations as de
import td3_adv_finetune as ft
from conftest import assert_one_line_error, run_cli, run_script
from robust_o2o.files import sha256_file

LOW, HIGH = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0])


def test_perturb_action_formulas_and_clipping():
    a = np.array([0.5, -1.0, 3.0])
    np.testing.assert_array_equal(de.perturb_action(a, np.zeros(3), LOW, HIGH, "multiplicative"), a)  # δ = 0: identity
    np.testing.assert_array_equal(de.perturb_action(a, np.zeros(3), LOW, HIGH, "additive"), a)
    d = np.array([0.3, -0.2, 0.1])
    np.testing.assert_allclose(de.perturb_action(a, d, LOW, HIGH, "multiplicative"), [0.65, -0.8, 3.3])
    np.testing.assert_allclose(de.perturb_action(a, d, LOW, HIGH, "additive"), [0.8, -1.4, 3.2])  # δ × half-range
    big = np.array([0.9, 0.9, 0.9])
    np.testing.assert_allclose(de.perturb_action(np.array([0.9, 1.9, 3.9]), big, LOW, HIGH, "multiplicative"), HIGH)
    np.testing.assert_allclose(de.perturb_action(np.array([-0.9, -1.9, 0.1]), -big, LOW, HIGH, "additive"), [-1, -2, 0])
    batch = de.perturb_action(np.tile(a, (4, 1)), np.tile(d, (4, 1)), LOW, HIGH, "multiplicative")
    assert batch.shape == (4, 3)


class Recorder(gym.Wrapper):
    """Records the actions the wrapped env really executes."""

    def __init__(self, env):
        super().__init__(env)
        self.executed = []

    def step(self, action):
        self.executed.append(np.array(action))
        return self.env.step(action)


def wrapped(condition, q=1.0, deltas=None, eps=0.3, model="multiplicative"):
    rec = Recorder(gym.make("Hopper-v5", max_episode_steps=5))
    return ft.ActionPerturbation(rec, eps, model, condition, deltas, q), rec


def test_delta_fixed_within_episode_and_redrawn_between_episodes():
    env, rec = wrapped("random")
    a = np.array([0.5, -0.5, 0.25], dtype=np.float32)
    seen = []
    for ep in range(30):
        _, info = env.reset(seed=ep if ep == 0 else None)
        rec.executed.clear()
        for _ in range(3):
            env.step(a)
        d = info["delta"]
        assert np.all(np.abs(d) <= 0.3)
        for x in rec.executed:  # the same δ on every step of the episode
            np.testing.assert_allclose(x, np.clip(a * (1 + d), -1, 1), rtol=1e-6)
        seen.append(d)
    assert len({tuple(d) for d in seen}) == 30  # a fresh draw each episode
    seen = np.array(seen)
    assert seen.min() < -0.2 and seen.max() > 0.2  # spread over the box


def test_normal_adversarial_pinned_and_probability_q():
    env, rec = wrapped("normal")
    _, info = env.reset(seed=0)
    env.step(np.array([0.5, 0.5, 0.5], np.float32))
    assert not info["delta"].any() and np.allclose(rec.executed[-1], 0.5)
    bank = np.array([[0.1, 0.2, 0.3], [-0.3, -0.2, -0.1]])
    env, _ = wrapped("adversarial", deltas=bank)
    drawn = [env.reset(seed=i)[1]["delta"] for i in range(40)]
    assert all(any(np.array_equal(d, b) for b in bank) for d in drawn)
    assert {tuple(d) for d in drawn} == {tuple(b) for b in bank}
    _, info = env.reset(seed=0, options={"delta": [0.05, 0.0, -0.05]})
    np.testing.assert_array_equal(info["delta"], [0.05, 0.0, -0.05])
    env, _ = wrapped("adversarial", deltas=bank, q=0.25)
    env.reset(seed=123)
    perturbed = np.mean([env.reset()[1]["delta"].any() for _ in range(2000)])
    assert abs(perturbed - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 2000)
    env, _ = wrapped("random", q=0.0)
    assert not any(env.reset(seed=i)[1]["delta"].any() for i in range(20))


def test_condition_does_not_change_start_states():
    obs = {}
    for cond in ("normal", "random"):
        env, _ = wrapped(cond)
        obs[cond] = [env.reset(seed=s)[0] for s in range(5)]
    np.testing.assert_array_equal(np.array(obs["normal"]), np.array(obs["random"]))


def serial_returns(ckpt, deltas, seeds, model, max_steps):
    """Reference: one episode at a time through the wrapper, one unbatched policy call per step."""
    actor = de.actor_from_checkpoint(ckpt)
    out = []
    for d in deltas:
        env = ft.ActionPerturbation(gym.make(ckpt["env_id"], max_episode_steps=max_steps), 0.5, model)
        rets = []
        for s in seeds:
            obs, _ = env.reset(seed=int(s), options={"delta": d})
            done, ret = False, 0.0
            while not done:
                with torch.no_grad():
                    a = actor((torch.as_tensor(obs, dtype=torch.float32) - ckpt["obs_mean"]) / ckpt["obs_std"]).numpy()
                obs, r, te, tr, _ = env.step(a)
                ret, done = ret + r, te or tr
            rets.append(ret)
        out.append(np.mean(rets))
    return np.array(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_population_evaluation_equals_serial(hopper_checkpoint, workers):
    ckpt = de.load_checkpoint(hopper_checkpoint)
    rng = np.random.default_rng(0)
    deltas = np.vstack([np.zeros(3), rng.uniform(-0.5, 0.5, (5, 3))])
    seeds = np.array([7, 8, 9])
    ev = de.PopulationEvaluator(ckpt, "multiplicative", 60, workers)
    try:
        batched = ev.returns(deltas, seeds)
    finally:
        ev.close()
    np.testing.assert_allclose(batched, serial_returns(ckpt, deltas, seeds, "multiplicative", 60), rtol=1e-4)
    assert ev.env_steps > 0


def test_fewer_pairs_than_workers_leaves_the_spare_workers_idle(hopper_checkpoint):
    """A many-core machine evaluating a small set (one δ × one episode on 3 workers) must not hand a worker nothing."""
    ckpt = de.load_checkpoint(hopper_checkpoint)
    delta, seeds = np.full((1, 3), 0.2), np.array([7])
    ev = de.PopulationEvaluator(ckpt, "multiplicative", 60, 3)
    try:
        batched = ev.returns(delta, seeds)
    finally:
        ev.close()
    np.testing.assert_allclose(batched, serial_returns(ckpt, delta, seeds, "multiplicative", 60), rtol=1e-4)


def test_de_on_a_policy_returns_the_worst_delta_it_evaluated(hopper_checkpoint):
    """On a trained policy: DE's δ lies in the box, its objective is that δ's return (re-evaluated alone, exactly: a
    return does not depend on its batch), below the unperturbed return and below random δ's mean, and its best-so-far
    never rises. Whether it also beats the best of an equal-budget random search on a given policy is chance at this
    budget, so that is asserted on an objective with a known minimum (the next test)."""
    ckpt = de.load_checkpoint(hopper_checkpoint)
    ev = de.PopulationEvaluator(ckpt, "multiplicative", 60, 1)
    seeds, eps = np.array([1, 2, 3]), 0.5
    args = de.Args(popsize=5, maxiter=6, tol=0.0, epsilon=eps)
    delta, best, history = de.run_de(ev.returns, [(-eps, eps)] * 3, seeds, 0, args)
    search = ev.returns(np.random.default_rng(0).uniform(-eps, eps, (50, 3)), seeds)
    assert np.all(np.abs(delta) <= eps)
    assert best == ev.returns(delta[None], seeds)[0]
    assert best < ev.returns(np.zeros((1, 3)), seeds)[0] and best < search.mean()
    assert all(b >= a for a, b in zip(history[1:], history[:-1]))  # best-so-far never gets worse


def test_de_beats_equal_budget_random_search_on_a_known_objective():
    """A rugged objective with its minimum (0) at a known δ inside the box: DE at the budget of the test above gets
    far closer than the best of a random search with as many evaluations, for each of five seeds."""
    eps, target = 0.5, np.array([0.31, -0.22, 0.4])

    def objective(deltas, seeds):  # Rastrigin-like, 3-D: many local minima around the global one at `target`
        z = (deltas - target) / eps
        return (z**2 - 0.05 * np.cos(6 * np.pi * z) + 0.05).sum(1)

    args = de.Args(popsize=5, maxiter=6, tol=0.0, epsilon=eps)
    for seed in range(5):
        delta, best, history = de.run_de(objective, [(-eps, eps)] * 3, np.array([0]), seed, args)
        budget = args.popsize * 3 * (len(history) + 1)  # initial population + one per generation
        search = objective(np.random.default_rng(seed).uniform(-eps, eps, (budget, 3)), None)
        assert best == objective(delta[None], None)[0] and best < search.min(), seed


def test_cli_writes_npz_with_schema_and_plot(hopper_checkpoint, tmp_path):
    out = tmp_path / "adv" / "deltas.npz"
    proc = run_script(
        "de_perturbations.py",
        "--checkpoint",
        hopper_checkpoint,
        "--output",
        str(out),
        "--epsilon",
        "0.4",
        "--num-perturbations",
        "2",
        "--popsize",
        "4",
        "--maxiter",
        "2",
        "--de-episodes",
        "2",
        "--eval-episodes",
        "2",
        "--random-draws",
        "3",
        "--max-episode-steps",
        "40",
        "--num-workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    d = np.load(out, allow_pickle=False)
    assert str(d["format"]) == de.PERTURBATION_FORMAT and int(d["format_version"]) == de.PERTURBATION_VERSION
    assert d["perturbations"].shape == (2, 3) and np.all(np.abs(d["perturbations"]) <= 0.4)
    assert d["perturbation_returns"].shape == (2,) and d["random_deltas"].shape == (3, 3)
    assert d["random_returns"].shape == (3,) and d["history"].shape[0] == 2
    assert float(d["epsilon"]) == 0.4 and str(d["perturbation_model"]) == "multiplicative"
    assert str(d["env_id"]) == "Hopper-v5" and int(d["act_dim"]) == 3 and int(d["max_episode_steps"]) == 40
    assert str(d["checkpoint_sha256"]) == sha256_file(hopper_checkpoint)
    assert float(d["random_return_mean"]) == pytest.approx(d["random_returns"].mean())
    for key in (
        "nominal_return",
        "random_return_std",
        "eval_seeds",
        "de_seed",
        "de_episodes",
        "popsize",
        "maxiter",
        "mutation",
        "recombination",
        "strategy",
        "tol",
        "polish",
        "env_steps",
        "wall_time_sec",
        "de_objective",
        "checkpoint_path",
        "num_workers",
    ):
        assert key in d.files, key
    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--checkpoint", "nope/checkpoint.pt"], "not found"),
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "1.0"], "--epsilon"),
        (["--num-perturbations", "0"], "--num-perturbations"),
        (["--popsize", "3"], "--popsize"),
    ],
)
def test_cli_bad_input_is_one_clear_line(hopper_checkpoint, tmp_path, argv, needle):
    base = [] if argv[0] == "--checkpoint" else ["--checkpoint", hopper_checkpoint]
    proc = run_cli("de_perturbations.py", *base, *argv, "--output", str(tmp_path / "p.npz"), cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert not list(tmp_path.glob("*.npz*"))


def test_an_unknown_perturbation_model_is_refused_naming_the_script_s_models(hopper_checkpoint, tmp_path):
    """Which models DE takes is its PERTURBATION's to say (or a fork's, given --perturbation-from): refused in one line
    naming them, before anything is written."""
    proc = run_script(
        "de_perturbations.py", "--checkpoint", hopper_checkpoint, "--perturbation-model", "sideways", cwd=tmp_path
    )
    assert_one_line_error(proc, "--perturbation-model", "multiplicative, additive", "sideways")
    assert not list(tmp_path.iterdir())


def test_additive_model_allows_epsilon_at_or_above_one(hopper_checkpoint, tmp_path):
    proc = run_script(
        "de_perturbations.py",
        "--checkpoint",
        hopper_checkpoint,
        "--perturbation-model",
        "additive",
        "--epsilon",
        "1.0",
        "--num-perturbations",
        "1",
        "--popsize",
        "4",
        "--maxiter",
        "1",
        "--de-episodes",
        "1",
        "--eval-episodes",
        "1",
        "--random-draws",
        "1",
        "--max-episode-steps",
        "20",
        "--num-workers",
        "1",
        "--output",
        str(tmp_path / "a.npz"),
    )
    assert proc.returncode == 0, proc.stderr


def test_de_summary_uses_the_evaluators_estimator():
    """Episode i plays δ_(i mod K), as robust_o2o.evaluation.ConditionEvaluator does, not every δ on every episode."""
    table = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [K = 2 deltas, M = 3 episodes]
    assert de.as_evaluated(table) == pytest.approx((1.0 + 5.0 + 3.0) / 3)
    assert de.as_evaluated(table) != pytest.approx(table.mean())


def test_resuming_relies_on_scipy_solver_internals_that_still_exist():
    """DE's resume (de_perturbations.solver_state / restore_solver) reads and writes private fields of scipy's
    DifferentialEvolutionSolver and its legacy generator: if a scipy version renames them, this fails loudly, and a
    saved state round-trips into a fresh solver that then draws the same next generation."""
    from scipy.optimize._differentialevolution import DifferentialEvolutionSolver

    def make():
        return DifferentialEvolutionSolver(
            lambda x: (x**2).sum(0), [(-1, 1)] * 3, rng=7, maxiter=5, popsize=4, vectorized=True, updating="deferred"
        )

    solver = make()
    for field in de.SOLVER_PRIVATE_FIELDS:
        assert hasattr(solver, field), f"scipy renamed DifferentialEvolutionSolver.{field}: update de.restore_solver"
    assert isinstance(solver.random_number_generator, np.random.RandomState)
    next(solver)  # one generation
    state = de.solver_state(solver, history=[float(solver.population_energies.min())])
    restored = make()
    de.restore_solver(restored, state, generations_done=1, maxiter=5)
    next(solver), next(restored)
    np.testing.assert_array_equal(restored.population, solver.population)
    assert restored._nfev == solver._nfev


def test_a_return_does_not_depend_on_what_shares_its_batch(hopper_checkpoint):
    """Every evaluator computes the policy in float64 (robust_o2o.evaluation.float64_policy). In float32 the actor's
    output for a row changed with the batch around it (by about 5e-8), and over long episodes that moved a δ's return
    by up to 23 %, so a δ's return depended on which other candidates or conditions were evaluated beside it."""
    ckpt = de.load_checkpoint(hopper_checkpoint)
    ev = de.PopulationEvaluator(ckpt, "multiplicative", 300, 1)
    deltas, seeds = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 3)), np.array([7, 8])
    together = ev.episode_returns(deltas, seeds)
    alone = np.array([[ev.episode_returns(d[None], s[None])[0, 0] for s in seeds] for d in deltas])
    reversed_batch = ev.episode_returns(deltas[::-1], seeds)[::-1]
    assert np.array_equal(together, alone) and np.array_equal(together, reversed_batch)
