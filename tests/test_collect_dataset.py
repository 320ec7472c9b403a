"""collect_dataset.py: Minari-format datasets made locally (shapes, episode boundaries, reference scores, atomicity)."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest

import collect_dataset as cd
from conftest import ROOT, assert_one_line_error, assert_usage_error, run_cli, run_script


def test_levels_load_back_with_shapes_and_episode_boundaries(hopper_datasets):
    for level, ds_id in hopper_datasets.items():
        ds = minari.load_dataset(ds_id)
        meta = ds.storage.metadata
        expected = int(meta["medium_step"]) if level == "medium-replay" else 1500
        assert ds.total_steps == expected, level
        assert ds.env_spec.id == "Hopper-v5" and ds.env_spec.max_episode_steps == 100
        steps = 0
        for ep in ds.iterate_episodes():
            T = len(ep.rewards)
            steps += T
            assert ep.observations.shape == (T + 1, 11) and ep.actions.shape == (T, 3)
            assert ep.terminations.shape == ep.truncations.shape == (T,)
            # only the last step may end an episode, and it must end it in one recorded way or the other
            assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
            assert ep.terminations[-1] or ep.truncations[-1]
            assert T <= 100 and (T < 100 or ep.truncations[-1] or ep.terminations[-1])
            assert np.all(ep.actions >= -1) and np.all(ep.actions <= 1)
        assert steps == ds.total_steps


def test_terminations_and_truncations_are_distinct(hopper_datasets):
    ds = minari.load_dataset(hopper_datasets["random"])
    ends = [(bool(ep.terminations[-1]), bool(ep.truncations[-1]), len(ep.rewards)) for ep in ds.iterate_episodes()]
    assert any(term for term, _, _ in ends), "random Hopper episodes fall over: some must terminate"
    for term, trunc, T in ends[:-1]:
        if T < 100:  # it ended before the time limit and before the budget: a fall, recorded as a termination only
            assert term and not trunc, T
        if trunc:  # truncations come only from the 100-step time limit
            assert T == 100
    term, trunc, _ = ends[-1]
    assert term or trunc  # the budget's cut of the last episode is a truncation unless it fell on that very step
    assert term != trunc or ends[-1][2] == 100  # both only where a fall meets the time limit


def test_reference_scores_make_normalized_score_work(hopper_datasets):
    for ds_id in hopper_datasets.values():
        ds = minari.load_dataset(ds_id)
        lo, hi = ds.storage.metadata["ref_min_score"], ds.storage.metadata["ref_max_score"]
        assert hi == pytest.approx(cd.EXPERT_RETURN["Hopper"]) and -50 < lo < 200
        np.testing.assert_allclose(minari.get_normalized_score(ds, np.array([lo, hi])), [0.0, 1.0])


def test_split_episodes_keeps_order_and_cuts_the_tail():
    obs = np.arange(7, dtype=float)[:, None]
    nxt = obs + 0.5
    terms = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    truncs = np.array([0, 0, 0, 0, 0, 1, 0], bool)
    eps = cd.split_episodes(obs, np.zeros((7, 1), np.float32), np.ones(7), nxt, terms, truncs, n=7)
    assert [len(e.rewards) for e in eps] == [3, 3, 1]
    assert eps[0].terminations[-1] and not eps[0].truncations[-1]
    assert eps[1].truncations[-1] and not eps[1].terminations[-1]
    assert eps[2].truncations[-1] and not eps[2].terminations[-1]  # unfinished tail: truncated, bootstraps
    np.testing.assert_array_equal(eps[1].observations[:, 0], [3, 4, 5, 5.5])  # T+1 observations, last = s'


def test_rollout_returns_exactly_the_budget():
    env = gym.make("InvertedPendulum-v5", max_episode_steps=30)
    eps, rets = cd.rollout(env, lambda o: np.zeros(1, np.float32), 100, seed=0)
    assert sum(len(e.rewards) for e in eps) == 100
    assert eps[-1].truncations[-1]
    assert len(rets) == len(eps) - (0 if 100 % 30 == 0 else 1)


def test_existing_dataset_is_refused_and_failures_leave_nothing(hopper_datasets, monkeypatch):
    env = gym.make("InvertedPendulum-v5", max_episode_steps=20)
    eps, _ = cd.rollout(env, lambda o: np.zeros(1, np.float32), 50, seed=0)
    with pytest.raises(cd.UserError, match="--overwrite"):
        cd.write_minari_dataset(hopper_datasets["random"], eps, "Hopper-v5", 0.0, 1.0, "x", {})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", boom)  # the child process that writes inherits it
    with pytest.raises(cd.UserError, match="disk full"):
        cd.write_minari_dataset(
            "test/invertedpendulum/broken-v0", eps, "InvertedPendulum-v5", 0.0, 1.0, "x", {}, max_episode_steps=20
        )
    root = minari.storage.get_dataset_path()
    assert not os.path.exists(os.path.join(root, "test/invertedpendulum/broken-v0"))
    assert not [d for d in os.listdir(root) if d.startswith(".partial-")]


def test_cli_smoke_random_level(tmp_path):
    proc = run_script(
        "collect_dataset.py",
        "--env-id",
        "InvertedPendulum-v5",
        "--levels",
        "random",
        "--namespace",
        "smoke",
        "--num-transitions",
        "300",
        "--ref-episodes",
        "3",
        "--max-episode-steps",
        "50",
        "--overwrite",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    ds = minari.load_dataset("smoke/invertedpendulum/random-v0")
    assert ds.total_steps == 300 and ds.storage.metadata["ref_max_score"] == 1000.0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--env-id", "NoSuchEnv-v5"], "unknown env id"),
        (["--num-transitions", "0"], ">= 1"),
        (["--env-id", "Swimmer-v5", "--levels", "medium"], "--medium-target-return"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, argv, needle):
    assert_one_line_error(run_cli("collect_dataset.py", *argv, cwd=tmp_path), needle)  # in-process: same entry point


def test_an_unknown_level_is_refused_by_tyro_naming_the_choices(tmp_path):
    proc = run_script("collect_dataset.py", "--levels", "mediocre", cwd=tmp_path, timeout=60)
    assert_usage_error(proc, "--levels")
    assert "medium-replay" in proc.stderr and not list(tmp_path.iterdir())


def test_strict_targets_refuses_a_behaviour_policy_below_its_target_and_writes_nothing(tmp_path):
    """--strict-targets: a policy that never reaches the medium target is not written as medium (one error line);
    one that reaches it is, and its metadata records the target, that it was reached, and the behaviour seed."""
    store = tmp_path / "store"
    env = {**os.environ, "MINARI_DATASETS_PATH": str(store)}
    common = [
        "--env-id",
        "Hopper-v5",
        "--namespace",
        "strict",
        "--levels",
        "medium",
        "--num-transitions",
        "200",
        "--max-train-steps",
        "600",
        "--learning-starts",
        "300",
        "--eval-freq",
        "300",
        "--eval-episodes",
        "1",
        "--ref-episodes",
        "2",
        "--max-episode-steps",
        "50",
        "--no-cuda",
        "--strict-targets",
    ]
    for name, target in (("miss", "1e9"), ("reach", "-1e9")):
        (tmp_path / name).mkdir()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "collect_dataset.py"), *common, "--medium-target-return", target],
            cwd=tmp_path / name,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if name == "miss":
            assert_one_line_error(proc, "missed the medium target", "--max-train-steps")
            assert not (store / "strict" / "hopper" / "medium-v0").exists()
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((store / "strict" / "hopper" / "medium-v0" / "data" / "metadata.json").read_text())
    assert json.loads(meta["target_reached"]) is True and json.loads(meta["behaviour_seed"]) == 1
    assert json.loads(meta["target_return"]) == -1e9
