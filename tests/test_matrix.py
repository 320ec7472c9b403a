"""evaluate_matrix.py: the matrix (CSV, table, plots), the fresh attack, bad input, and the whole pipeline."""

import csv
import os
import shutil
import subprocess
import sys

import gymnasium as gym
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import de_perturbations as de
import evaluate_matrix as em
import td3_adv_finetune as ft
import td3_bc_offline as tb
from conftest import ROOT, assert_one_line_error, offline_run, run_cli, run_script
from robust_o2o.files import sha256_file


@pytest.fixture(scope="module")
def policy_set(hopper_datasets, hopper_checkpoint, hopper_perturbations, tmp_path_factory):
    """offline-only with seeds 1 and 2 (each with its perturbations.npz), and one adversarial fine-tune."""
    root = tmp_path_factory.mktemp("matrix")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        off1 = root / "runs" / "off1"
        off1.mkdir(parents=True)
        shutil.copy(hopper_checkpoint, off1 / "checkpoint.pt")
        shutil.copy(hopper_perturbations, off1 / "perturbations.npz")
        tb.main(
            tb.Args(
                dataset_id=hopper_datasets["medium"],
                total_steps=300,
                eval_freq=300,
                eval_episodes=1,
                cuda=False,
                run_name="off2",
                seed=2,
            )
        )
        de.main(
            de.Args(
                checkpoint="runs/off2/checkpoint.pt",
                epsilon=0.4,
                num_perturbations=2,
                popsize=4,
                maxiter=2,
                de_episodes=2,
                eval_episodes=2,
                random_draws=3,
                num_workers=1,
            )
        )
        ft.main(
            ft.Args(
                checkpoint=str(off1 / "checkpoint.pt"),
                total_steps=60,
                eval_freq=30,
                eval_episodes=1,
                batch_size=16,
                cuda=False,
                run_name="ft1",
                curriculum="linear",
                keep_checkpoints=2,
            )
        )
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def matrix(policy_set):
    out = policy_set / "results"
    em.main(em.Args(checkpoints=(str(policy_set / "runs"),), output_dir=str(out), eval_episodes=3, num_workers=1))
    return out


def test_csv_has_every_policy_seed_and_condition(matrix):
    rows = list(csv.DictReader(open(matrix / "matrix.csv")))
    assert set(rows[0]) >= {
        "policy",
        "seed",
        "env_id",
        "eval_condition",
        "episodes",
        "mean_return",
        "std_return",
        "normalized_mean",
        "episode_returns",
        "checkpoint",
    }
    cells = {(r["policy"], r["seed"], r["eval_condition"]) for r in rows}
    expected = {
        (p, s, c)
        for p, s in [("offline-only", "1"), ("offline-only", "2"), ("fine-tuned adversarial (linear)", "1")]
        for c in em.EVAL_CONDITIONS
    }
    assert cells == expected and len(rows) == len(expected)
    for r in rows:
        eps = np.array([float(x) for x in r["episode_returns"].split(";")])
        assert len(eps) == 3 and float(r["mean_return"]) == pytest.approx(eps.mean(), abs=1e-3)


def test_markdown_table_parses_and_std_is_over_seeds(matrix):
    rows = list(csv.DictReader(open(matrix / "matrix.csv")))
    lines = [ln for ln in (matrix / "matrix.md").read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["policy", "seeds", *em.EVAL_CONDITIONS]
    body = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines[2:])}
    assert set(body) == {"offline-only", "fine-tuned adversarial (linear)"} and body["offline-only"][1] == "2"
    for j, cond in enumerate(em.EVAL_CONDITIONS):
        per_seed = [
            float(r["mean_return"]) for r in rows if r["policy"] == "offline-only" and r["eval_condition"] == cond
        ]
        mean, std = body["offline-only"][2 + j].split(" [")[0].split(" ± ")
        assert float(mean) == pytest.approx(np.mean(per_seed), abs=0.051)
        assert float(std) == pytest.approx(np.std(per_seed), abs=0.051)


def test_plots_are_written_with_sensible_sizes(matrix):
    for name in ("heatmap", "curves", "q_trajectory"):
        img = mpimg.imread(matrix / f"{name}.png")
        assert img.shape[0] >= 300 and img.shape[1] >= 600, (name, img.shape)
        assert img[..., :3].std() > 0.05  # not blank
        assert (matrix / f"{name}.png").stat().st_size > 15_000


def test_fresh_attack_uses_de_semantics(matrix, policy_set):
    """The adversarial column is the fresh attack's δ set played through de_perturbations' own evaluator on the matrix's
    episodes. (Whether a 2-generation attack, searched on DE's own episodes, also lowers the return on the matrix's
    held-out episodes is chance at this size, so it is not asserted; tests/test_perturbations.py checks that DE beats
    random search at an equal budget.) The offline-only policies' precomputed sets were found against them with these
    very settings, so they are reused, not rerun: one attack, the fine-tune's."""
    rows = list(csv.DictReader(open(matrix / "matrix.csv")))
    path = str(policy_set / "runs" / "ft1" / "checkpoint.pt")
    ckpt = de.load_checkpoint(path)
    attacks = [np.load(f) for f in (matrix / "attacks").glob("*.npz")]
    mine = [a for a in attacks if str(a["checkpoint_sha256"]) == sha256_file(path)]
    assert len(attacks) == 1 and len(mine) == 1  # one fresh attack per policy that has none yet
    attack = mine[0]
    ev = de.PopulationEvaluator(ckpt, "multiplicative", ckpt.get("max_episode_steps"), 1)
    K = len(attack["perturbations"])
    expected = np.mean(
        [ev.returns(attack["perturbations"][i % K][None], np.array([em.EVAL_SEED + i]))[0] for i in range(3)]
    )
    got = next(
        float(r["mean_return"])
        for r in rows
        if r["checkpoint"] == os.path.normpath(path) and r["eval_condition"] == "adversarial"
    )
    assert got == pytest.approx(expected, rel=1e-12)  # each episode alone: a return does not depend on its batch


def test_attack_cache_is_reused_only_for_the_same_budget(matrix, policy_set, tmp_path):
    off1, out = str(policy_set / "runs" / "ft1"), tmp_path / "res"
    shutil.copytree(matrix / "attacks", out / "attacks")
    before = set((out / "attacks").glob("*.npz"))
    em.main(em.Args(checkpoints=(off1,), output_dir=str(out), eval_episodes=1, num_workers=1))
    assert set((out / "attacks").glob("*.npz")) == before  # same budget: cached
    em.main(em.Args(checkpoints=(off1,), output_dir=str(out), eval_episodes=1, num_workers=1, attack_maxiter=1))
    new = set((out / "attacks").glob("*.npz")) - before
    assert len(new) == 1 and int(np.load(new.pop())["maxiter"]) == 1  # another budget: a fresh attack


def test_bad_input_is_one_clear_line(policy_set, tmp_path):
    """One case from the command line (a subprocess); the rest in-process, through the same entry point."""
    assert_one_line_error(
        run_script("evaluate_matrix.py", "--checkpoints", str(tmp_path / "nothing"), cwd=tmp_path),
        "no checkpoints found",
    )
    other = tmp_path / "other"
    other.mkdir()
    ckpt = torch.load(policy_set / "runs" / "off1" / "checkpoint.pt", weights_only=True)
    ckpt["env_id"] = "Hopper-v4"  # the same widths and bounds, so it fits that env, but it is another env
    torch.save(ckpt, other / "checkpoint.pt")
    assert_one_line_error(
        run_cli("evaluate_matrix.py", "--checkpoints", str(policy_set / "runs"), str(other), cwd=tmp_path),
        "--env-id",
    )
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(policy_set / "runs" / "ft1" / "checkpoint.pt", lonely / "checkpoint.pt")
    proc = run_cli(
        "evaluate_matrix.py",
        "--checkpoints",
        str(lonely),
        "--eval-episodes",
        "1",
        "--num-workers",
        "1",
        "--output-dir",
        str(tmp_path / "res"),
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "metrics")


def test_whole_pipeline_runs_at_tiny_scale(tmp_path, ray_head):
    """run_pipeline.sh is a one-seed study: every stage, then the report; RESUME=1 redoes nothing. A Ray head runs on
    this machine meanwhile, as on a Ray user's workstation: the demo runs on a private Ray beside it (joining it once
    ended in a traceback)."""
    # the script runs `python`: the interpreter running these tests, not whichever python comes first on PATH
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "SCALE": "tiny", "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    proc = subprocess.run(
        ["bash", str(ROOT / "run_pipeline.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "results" / "demo-tiny-hopper"
    for name in ("report.md", "scores.csv", "heatmap.png", "curves.png", "q_trajectory.png"):
        assert (res / name).stat().st_size > 0, name
    # a smoke test: no claim verdict, printed or written; and its folder is one git ignores, so `git status` stays clean
    claim_lines = [ln for ln in (res / "report.md").read_text().splitlines() if ln[:2] in ("1.", "2.", "3.", "4.")]
    for text in [proc.stdout] + claim_lines:
        assert not any(w in text for w in ("supported", "contradicted", "inconclusive")), text
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/demo-tiny-hopper/report.md"], cwd=ROOT)
    assert ignored.returncode == 0
    policies = {r["policy"] for r in csv.DictReader(open(res / "scores.csv"))}
    assert policies == {
        "offline-only",
        "fine-tuned adversarial (adaptive)",
        "fine-tuned normal",
        "scratch adversarial (adaptive)",
    }
    # RESUME=1 after a complete run: every stage is skipped and every output is unchanged
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    again = subprocess.run(
        ["bash", str(ROOT / "run_pipeline.sh")],
        cwd=tmp_path,
        env={**env, "RESUME": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 of 10 stages finished earlier: skipped" in again.stdout + again.stderr
    assert before == {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    bad = subprocess.run(
        ["bash", str(ROOT / "run_pipeline.sh")],
        cwd=tmp_path,
        env={**env, "SCALE": "huge"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "SCALE must be" in bad.stderr


def test_a_fork_under_a_new_file_name_is_its_own_stage_in_the_matrix_and_the_curves(
    hopper_checkpoint, hopper_perturbations, tmp_path
):
    """Forking: copy td3_adv_finetune.py to my_idea.py, run it; its runs, stage tag and label carry the new name, and
    evaluate_matrix.py finds it as a fine-tune (learning curves included) by what its checkpoint holds."""
    fork = tmp_path / "my_idea.py"
    shutil.copy(ROOT / "td3_adv_finetune.py", fork)
    off = offline_run(tmp_path / "runs" / "off", hopper_checkpoint, hopper_perturbations).parent
    proc = subprocess.run(
        [
            sys.executable,
            str(fork),
            "--checkpoint",
            str(off / "checkpoint.pt"),
            "--total-steps",
            "40",
            "--eval-freq",
            "20",
            "--eval-episodes",
            "1",
            "--batch-size",
            "16",
            "--no-cuda",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next((tmp_path / "runs").glob("Hopper-v5__my_idea__offline-adversarial-adaptive__1__*"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["stage"] == "my_idea"
    out = tmp_path / "out"
    em.main(em.Args(checkpoints=(str(tmp_path / "runs"),), output_dir=str(out), eval_episodes=1, num_workers=1))
    assert {r["policy"] for r in csv.DictReader(open(out / "matrix.csv"))} == {
        "offline-only",
        "my_idea: fine-tuned adversarial (adaptive)",
    }
    assert (out / "curves.png").stat().st_size > 0 and (out / "q_trajectory.png").stat().st_size > 0


def test_fresh_attack_copies_every_recorded_setting(matrix, policy_set):
    """The fresh attack runs with the reference file's K, budget, episodes, episode limit, DE seed and polish, and
    matrix.csv states the budget; a flag overrides only what it names."""
    ref = np.load(policy_set / "runs" / "off1" / "perturbations.npz")
    settings = em.attack_settings(ref, em.Args())
    argv = em.as_argv(settings)  # what de_perturbations.py is run with

    def flag(name):
        return argv[argv.index(name) + 1]

    assert flag("--de-seed") == str(int(ref["de_seed"]))
    assert flag("--max-episode-steps") == str(int(ref["max_episode_steps"]))
    assert flag("--maxiter") == str(int(ref["maxiter"])) and flag("--num-perturbations") == str(
        len(ref["perturbations"])
    )
    assert ("--polish" if bool(ref["polish"]) else "--no-polish") in argv
    assert flag("--de-episodes") == str(int(ref["de_episodes"])) and flag("--popsize") == str(int(ref["popsize"]))
    assert argv[argv.index("--mutation") + 1 : argv.index("--mutation") + 3] == [str(float(m)) for m in ref["mutation"]]
    assert em.attack_settings(ref, em.Args(attack_maxiter=1))["--maxiter"] == 1
    attack = next(
        np.load(f)
        for f in (matrix / "attacks").glob("*.npz")
        if str(np.load(f)["checkpoint_sha256"]) == sha256_file(policy_set / "runs" / "ft1" / "checkpoint.pt")
    )
    for key in ("de_seed", "max_episode_steps", "maxiter", "popsize", "de_episodes", "polish"):
        assert attack[key] == ref[key], key
    rows = list(csv.DictReader(open(matrix / "matrix.csv")))
    for run in ("off1", "ft1"):  # off1's is its precomputed set, found with these very settings
        assert {r["attack_budget"] for r in rows if r["checkpoint"].endswith(f"{run}/checkpoint.pt")} == {
            em.attack_budget(settings)
        }
    table = (matrix / "matrix.md").read_text()
    assert "| offline-only |" in table and "† |" in table and "direct attack" in table


def test_normal_is_unperturbed_and_random_plays_the_stored_draws_not_the_de_set(matrix, policy_set):
    """Each episode replayed here by a plain loop with no perturbation wrapper: the normal column is the policy acting
    unperturbed, the random column the stored random draws (episode i: draw i mod R), which are not DE's δ."""
    from robust_o2o.evaluation import float64_policy

    path = policy_set / "runs" / "off1" / "checkpoint.pt"
    ckpt, ref = de.load_checkpoint(str(path)), np.load(policy_set / "runs" / "off1" / "perturbations.npz")
    act = float64_policy(em.actor_from_checkpoint(ckpt), ckpt["obs_mean"], ckpt["obs_std"])
    env = gym.make(ckpt["env_id"], max_episode_steps=ckpt["max_episode_steps"])

    def episode(seed: int, delta=None) -> float:
        obs, total, done = env.reset(seed=seed)[0], 0.0, False
        while not done:
            action = act(obs[None])[0]
            if delta is not None:  # the multiplicative model, written out: ã = clip(a ⊙ (1 + δ))
                action = np.clip(action * (1 + delta), env.action_space.low, env.action_space.high)
            obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
            total, done = total + reward, terminated or truncated
        return total

    rows = {
        r["eval_condition"]: [float(x) for x in r["episode_returns"].split(";")]
        for r in csv.DictReader(open(matrix / "matrix.csv"))
        if r["checkpoint"] == os.path.normpath(path)
    }
    draws = ref["random_deltas"]
    assert rows["normal"] == pytest.approx([episode(em.EVAL_SEED + i) for i in range(3)], abs=1e-3)
    random = [episode(em.EVAL_SEED + i, draws[i % len(draws)]) for i in range(3)]
    assert rows["random"] == pytest.approx(random, abs=1e-3)  # the CSV keeps three decimals
    assert not any(np.allclose(d, p) for d in draws for p in ref["perturbations"])
    assert rows["normal"] != rows["random"]


def test_an_offline_policy_s_own_precomputed_set_is_its_fresh_attack(matrix, policy_set):
    """Found against this very checkpoint with every setting a fresh attack would use: the matrix plays it as the
    adversarial cell (no DE rerun), so that cell equals the transfer cell episode for episode. Another checkpoint (a
    retrained policy beside the same file) gets a fresh attack."""
    rows = list(csv.DictReader(open(matrix / "matrix.csv")))
    for run in ("off1", "off2"):
        mine = {
            r["eval_condition"]: r["episode_returns"] for r in rows if r["checkpoint"].endswith(f"{run}/checkpoint.pt")
        }
        assert mine["adversarial"] == mine["transfer"]
    ref = np.load(policy_set / "runs" / "off1" / "perturbations.npz")
    path = str(policy_set / "runs" / "off1" / "checkpoint.pt")
    settings = em.attack_settings(ref, em.Args())
    assert em.same_attack(ref, path, settings)
    assert not em.same_attack(ref, str(policy_set / "runs" / "off2" / "checkpoint.pt"), settings)
    assert not em.same_attack(ref, path, em.attack_settings(ref, em.Args(attack_maxiter=1)))


def test_kept_policies_are_evaluated_and_pooled_and_no_fresh_attack_leaves_its_cells_out(policy_set, tmp_path):
    """--kept-episodes: each kept policy of the fine-tune (the last K evaluations' checkpoints) on the same seeds under
    every condition with the final policy's δ sets, pooled into `{condition}@kept` rows; an offline policy has none.
    --no-fresh-attack: no adversarial cells, no attack run, and the table says why a cell is empty."""
    ft1 = policy_set / "runs" / "ft1"
    kept = sorted(p.name for p in ft1.glob("checkpoint_step*.pt"))
    assert kept == ["checkpoint_step30.pt", "checkpoint_step60.pt"]  # the last 2 of the evaluations at 30 and 60
    final, last = (torch.load(ft1 / n, weights_only=True) for n in ("checkpoint.pt", "checkpoint_step60.pt"))
    first = torch.load(ft1 / "checkpoint_step30.pt", weights_only=True)
    assert all(torch.equal(final["actor"][k], last["actor"][k]) for k in final["actor"])
    assert not all(torch.equal(final["actor"][k], first["actor"][k]) for k in final["actor"])
    out = tmp_path / "res"
    args = em.Args(
        checkpoints=(str(ft1), str(policy_set / "runs" / "off1")),
        output_dir=str(out),
        eval_episodes=2,
        kept_episodes=2,
        fresh_attack=False,
        num_workers=1,
    )
    em.main(args)
    rows = list(csv.DictReader(open(out / "matrix.csv")))
    assert not (out / "attacks").exists() or not list((out / "attacks").glob("*.npz"))
    by = {(r["policy"], r["eval_condition"]): r for r in rows}
    assert {c for p, c in by if p == "offline-only"} == {"normal", "random", "transfer"}
    label = "fine-tuned adversarial (linear)"
    assert {c for p, c in by if p == label} == {"normal", "random", "transfer", "normal@kept", "random@kept"} | {
        "transfer@kept"
    }
    ckpt = de.load_checkpoint(str(ft1 / "checkpoint.pt"))
    ref = np.load(ft1.parent / "off1" / "perturbations.npz")
    conditions = {"normal": np.zeros((1, ckpt["act_dim"])), "random": ref["random_deltas"]}
    conditions["transfer"] = ref["perturbations"]
    expected = {c: [] for c in conditions}
    for name in kept:
        policy = de.load_checkpoint(str(ft1 / name))
        returns = em.evaluate_policy(policy, conditions, 2, em.EVAL_SEED, "multiplicative", em.PERTURBATION)
        for c in conditions:
            expected[c] += list(returns[c])
    for c in conditions:
        got = [float(x) for x in by[(label, c + "@kept")]["episode_returns"].split(";")]
        assert got == pytest.approx(expected[c], abs=1e-3) and by[(label, c + "@kept")]["episodes"] == "4"
    table = (out / "matrix.md").read_text()
    assert "Averaged over the end of training" in table and "| normal@kept |" in table and "— not evaluated" in table
    proc = run_cli(
        "evaluate_matrix.py",
        "--checkpoints",
        str(policy_set / "runs" / "off1"),
        str(ft1),
        "--kept-episodes",
        "1",
        "--no-fresh-attack",
        "--output-dir",
        str(tmp_path / "again"),
        "--num-workers",
        "1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (ft1 / "checkpoint_step30.pt").rename(tmp_path / "moved.pt")
    try:
        proc = run_cli(
            "evaluate_matrix.py",
            "--checkpoints",
            str(ft1),
            "--kept-episodes",
            "1",
            "--no-fresh-attack",
            "--output-dir",
            str(tmp_path / "third"),
            "--num-workers",
            "1",
            cwd=tmp_path,
        )
        assert_one_line_error(proc, "checkpoint_step30.pt", "rerun that fine-tune")
        assert not (tmp_path / "third" / "matrix.csv").exists()
    finally:
        (tmp_path / "moved.pt").rename(ft1 / "checkpoint_step30.pt")
