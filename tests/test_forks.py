"""The two forks researchers make most, done as a user does them (docs/forking.md): copy td3_adv_finetune.py, edit the
copy and nothing else, run it at tiny scale through fine-tuning and the matrix, and check the fork's behaviour.
1. a new schedule for q (a cosine);
2. a new perturbation: of the observations the policy sees instead of the executed actions (random condition)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, offline_run, run_script
from robust_o2o.formats import load_checkpoint
from robust_o2o.perturbation import from_script

TINY = ["--total-steps", "60", "--eval-freq", "20", "--eval-episodes", "2", "--batch-size", "16", "--no-cuda"]


def fork(tmp_path, name: str, edits: list) -> str:
    """cp td3_adv_finetune.py {name}.py, then each (old, new) edit in the copy; each old text must be there once."""
    src = (ROOT / "td3_adv_finetune.py").read_text()
    for old, new in edits:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    return str(path)


def run_fork(path: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """The fork runs where the user put it, importing this repository's plumbing (as from a copy in the repo root)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def cosine(q_as: str) -> list:
    """The fork's three edits; q_as wraps the schedule's value ("{}": as first written, "float({})": fixed)."""
    schedule = q_as.format("cosine_q(step, args.total_steps, q_min=args.q_min, q_max=args.q_max)")
    return [
        (
            'curriculum: Literal["fixed", "linear", "adaptive"]',
            'curriculum: Literal["fixed", "linear", "adaptive", "cosine"]',
        ),
        (
            "# ALGO LOGIC: replay with a fixed offline share r_off per batch",
            "def cosine_q(step: int, total_steps: int, q_min: float, q_max: float) -> float:\n"
            '    """q rises from q_min to q_max along half a cosine."""\n'
            "    return q_min + (q_max - q_min) * (1 - np.cos(np.pi * min(step / total_steps, 1.0))) / 2\n\n\n"
            "# ALGO LOGIC: replay with a fixed offline share r_off per batch",
        ),
        (
            "            q = linear_q(step, args.total_steps, q_init=args.q_init, q_max=args.q_max)\n",
            "            q = linear_q(step, args.total_steps, q_init=args.q_init, q_max=args.q_max)\n"
            f'        if args.curriculum == "cosine":\n            q = {schedule}\n',
        ),
    ]


def test_fork_1_a_cosine_schedule_for_q_runs_through_fine_tuning_and_the_matrix(
    hopper_checkpoint, hopper_perturbations, tmp_path
):
    """Three edits in the copy (q starts at --q-init, 0.1, as the other schedules do). As first written, q is a numpy
    float (np.cos): the fork stops at its first save in one line naming 'q' and its type, before any file would fail
    to load. With float(...) it runs; q follows the cosine; the matrix takes its policy without --perturbation-from
    (its perturbation is the project's), under its name."""
    offline = offline_run(tmp_path / "runs" / "off", hopper_checkpoint, hopper_perturbations)
    args = ["--checkpoint", str(offline), *TINY, "--curriculum", "cosine", "--q-max", "0.8"]
    numpy_q = fork(tmp_path, "my_cosine", cosine("{}"))
    proc = run_fork(numpy_q, *args, "--run-name", "numpy-q", cwd=tmp_path)
    assert_one_line_error(proc, "'q' is a numpy.float64", "weights_only", "float(x)")
    assert not (tmp_path / "runs" / "numpy-q" / "checkpoint.pt").exists()
    path = fork(tmp_path, "my_cosine", cosine("float({})"))
    proc = run_fork(path, *args, "--run-name", "cosine", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "cosine"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = {r["step"]: r["curriculum/q"] for r in rows if "eval/normal_return" in r}
    assert evals == pytest.approx({s: 0.1 if s == 0 else 0.8 * (1 - math.cos(math.pi * s / 60)) / 2 for s in evals})
    ckpt = load_checkpoint(str(run / "checkpoint.pt"))  # loads with weights_only=True, as every reader does
    assert ckpt["stage"] == "my_cosine" and ckpt["curriculum"] == "cosine" and type(ckpt["q"]) is float
    out = tmp_path / "matrix"
    proc = run_script(
        "evaluate_matrix.py", "--checkpoints", str(tmp_path / "runs"), "--output-dir", str(out), "--eval-episodes", "2",
        "--num-workers", "1", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    policies = {r["policy"] for r in csv.DictReader(open(out / "matrix.csv"))}
    assert policies == {"offline-only", "my_cosine: fine-tuned adversarial (cosine)"}


OBSERVATIONS = [  # the perturbation section: δ is added to the observation the policy sees; actions run as chosen
    (
        "# what δ perturbs and how:",
        "def perturb_observation(obs: np.ndarray, delta: np.ndarray, low, high, perturbation_model: str):\n"
        '    """The observation the policy sees, s + δ, row-wise on batches [..., No]."""\n'
        '    if perturbation_model != "additive":\n'
        '        raise ValueError(f"unknown perturbation model {perturbation_model!r}")\n'
        "    return (obs + delta).astype(obs.dtype, copy=False)\n\n\n"
        "# what δ perturbs and how:",
    ),
    (
        'PERTURBATION = Perturbation(target="action", models=PERTURBATION_MODELS, apply=perturb_action)',
        'PERTURBATION = Perturbation(target="observation", models=("additive",), apply=perturb_observation)',
    ),
    (
        "        if condition not in CONDITIONS or perturbation_model not in PERTURBATION_MODELS:",
        "        if condition not in CONDITIONS or perturbation_model not in PERTURBATION.models:",
    ),
    (
        "        self.delta = np.zeros(env.action_space.shape, dtype=np.float64)",
        "        self.delta = np.zeros(env.observation_space.shape, dtype=np.float64)",
    ),
    (
        "        obs, info = self.env.reset(seed=seed, options=options or None)\n",
        "        obs, info = self.env.reset(seed=seed, options=options or None)\n"
        "        obs = perturb_observation(obs, self.delta, None, None, self.perturbation_model)\n",
    ),
    (
        "    def action(self, action):\n"
        "        return perturb_action(np.asarray(action), self.delta, self.low, self.high, self.perturbation_model)\n",
        "    def action(self, action):\n"
        "        return action\n\n"
        "    def step(self, action):\n"
        "        obs, reward, terminated, truncated, info = self.env.step(action)\n"
        "        obs = perturb_observation(obs, self.delta, None, None, self.perturbation_model)\n"
        "        return obs, reward, terminated, truncated, info\n",
    ),
]


def test_fork_2_a_perturbation_of_observations_runs_through_de_fine_tuning_and_the_matrix(hopper_checkpoint, tmp_path):
    """Six edits in the copy, none elsewhere. DE and the matrix apply the fork's perturbation when named by
    --perturbation-from, and refuse its policy and δ sets without it; under the fork, random δ changes what the
    policy sees (its episodes differ from the unperturbed ones) and leaves the executed actions as chosen."""
    path = fork(tmp_path, "my_obs_noise", OBSERVATIONS)
    offline = offline_run(tmp_path / "runs" / "off", hopper_checkpoint)
    ckpt_path, obs_set = str(offline), str(offline.parent / "perturbations.npz")
    de_args = ["--checkpoint", ckpt_path, "--epsilon", "0.5", "--perturbation-model", "additive", "--num-workers", "1"]
    de_args += ["--num-perturbations", "2", "--popsize", "4", "--maxiter", "2", "--de-episodes", "2"]
    de_args += ["--eval-episodes", "2", "--random-draws", "3"]
    proc = run_script("de_perturbations.py", *de_args, "--perturbation-from", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = np.load(obs_set, allow_pickle=False)
    assert made["perturbations"].shape == (2, 11) and str(made["perturbation_target"]) == "observation"

    proc = run_fork(path, "--checkpoint", ckpt_path, *TINY, "--finetune-condition", "random", "--curriculum", "fixed",
                    "--q", "1.0", "--run-name", "obs", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(str(tmp_path / "runs" / "obs" / "checkpoint.pt"))
    assert ckpt["perturbation_target"] == "observation" and ckpt["stage"] == "my_obs_noise"
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "obs" / "metrics.jsonl")]
    assert all(r["charts/perturbed"] for r in rows if "charts/perturbed" in r)  # q = 1: every episode perturbed

    out, matrix = tmp_path / "matrix", ["--checkpoints", str(tmp_path / "runs"), "--eval-episodes", "3"]
    matrix += ["--num-workers", "1", "--output-dir"]
    refused = run_script("evaluate_matrix.py", *matrix, str(out), cwd=tmp_path)
    assert_one_line_error(refused, "observation", "--perturbation-from")
    assert not out.exists()
    proc = run_script("evaluate_matrix.py", *matrix, str(out), "--perturbation-from", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cells = {(r["policy"], r["eval_condition"]): r for r in csv.DictReader(open(out / "matrix.csv"))}
    for policy in ("offline-only", "my_obs_noise: fine-tuned random (fixed)"):
        normal, random = (cells[(policy, c)]["episode_returns"] for c in ("normal", "random"))
        assert normal != random  # the same episodes: only what the policy sees differs

    perturbation, obs, delta = from_script(path), np.ones((4, 11)), np.full((4, 11), 0.25)
    action = np.full((4, 3), 0.5, dtype=np.float32)
    assert perturbation.width(11, 3) == 11
    assert np.array_equal(perturbation.seen(obs, delta, None, None, "additive"), obs + delta)
    assert perturbation.executed(action, delta, -np.ones(3), np.ones(3), "additive") is action
    assert torch.load(tmp_path / "runs" / "obs" / "checkpoint.pt", weights_only=True)["perturbation_code"]
    shutil.rmtree(tmp_path / "runs" / "obs")  # (keeps the test's folder small)
