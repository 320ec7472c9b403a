"""Resume after interruption (kill -9 included), determinism, safe loading and bad input, stage by stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import td3_bc_offline as tb
from conftest import ROOT, assert_one_line_error, run_cli, run_script

TIMING = {"charts/updates_per_sec", "charts/elapsed_sec", "charts/sps"}  # wall-clock figures: never reproducible


def metric_rows(run_dir: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(run_dir / "metrics.jsonl")]


def assert_same_tree(a, b, path="", skip=("args", "metrics_bytes", "initial_checkpoint", "perturbations_path")):
    """Equal nested dicts of tensors and plain values (bit-identical tensors)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            if k not in skip:
                assert_same_tree(a[k], b[k], f"{path}/{k}", skip)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]", skip)
    else:
        assert a == b, (path, a, b)


def td3_bc_args(dataset_id, run_name, total=60, *extra):
    return [
        "--dataset-id",
        dataset_id,
        "--total-steps",
        str(total),
        "--eval-freq",
        "20",
        "--log-freq",
        "10",
        "--eval-episodes",
        "1",
        "--batch-size",
        "64",
        "--no-cuda",
        "--run-name",
        run_name,
        *extra,
    ]


def test_td3_bc_is_deterministic_and_resumes_identically_after_kill_9(hopper_datasets, tmp_path):
    ds = hopper_datasets["medium"]
    for name in ("a", "b"):  # two uninterrupted runs: identical logs and checkpoints
        assert run_script("td3_bc_offline.py", *td3_bc_args(ds, name), cwd=tmp_path).returncode == 0
    assert metric_rows(tmp_path / "runs/a") == metric_rows(tmp_path / "runs/b")
    load = lambda n: torch.load(tmp_path / "runs" / n / "checkpoint.pt", weights_only=True)  # noqa: E731
    assert_same_tree(load("a"), load("b"))

    # a run killed with SIGKILL after its first save (so between two saves), then resumed: the same files as the
    # uninterrupted run
    cmd = [sys.executable, str(ROOT / "td3_bc_offline.py"), *td3_bc_args(ds, "c", 600)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs/c/checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(ckpt, weights_only=True)["step"]
    assert 20 <= saved_step < 600
    resumed = run_script("td3_bc_offline.py", *td3_bc_args(ds, "c", 600, "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    full = run_script("td3_bc_offline.py", *td3_bc_args(ds, "d", 600), cwd=tmp_path)
    assert full.returncode == 0
    assert metric_rows(tmp_path / "runs/c") == metric_rows(tmp_path / "runs/d")  # appended, no duplicate or lost rows
    assert_same_tree(load("c"), load("d"))


def test_td3_bc_resume_refuses_changed_arguments_and_missing_state(hopper_datasets, tmp_path):
    ds = hopper_datasets["medium"]
    assert_one_line_error(
        run_script("td3_bc_offline.py", *td3_bc_args(ds, "x", 20, "--resume"), cwd=tmp_path),
        "nothing to resume",
        "without --resume",
    )
    assert run_script("td3_bc_offline.py", *td3_bc_args(ds, "x", 20), cwd=tmp_path).returncode == 0
    assert_one_line_error(
        run_script("td3_bc_offline.py", *td3_bc_args(ds, "x", 40, "--resume", "--batch-size", "32"), cwd=tmp_path),
        "--batch-size",
        "original value",
    )
    assert_one_line_error(run_script("td3_bc_offline.py", *td3_bc_args(ds, "x", 40), cwd=tmp_path), "--resume")


def ft_args(ckpt, pert, run_name, total, *extra, eval_freq=150):
    return [
        "--checkpoint",
        ckpt,
        "--perturbations",
        pert,
        "--total-steps",
        str(total),
        "--eval-freq",
        str(eval_freq),
        "--eval-episodes",
        "1",
        "--batch-size",
        "32",
        "--no-cuda",
        "--run-name",
        run_name,
        "--curriculum",
        "adaptive",
        "--r-off",
        "0.25",
        *extra,
    ]


def test_finetune_resumes_mid_episode_identically(hopper_checkpoint, hopper_perturbations, tmp_path):
    """Interrupted at a save in the middle of an episode, resumed with its buffer, RNGs and MuJoCo state:
    bit-identical. The save point is picked from the uninterrupted run's log: the first save after step 200 at which
    no episode ends (where episodes end depends on the policy, so no fixed step is mid-episode for every policy)."""
    inputs = (hopper_checkpoint, hopper_perturbations)
    full = run_script("td3_adv_finetune.py", *ft_args(*inputs, "full", 450, eval_freq=50), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    episode_ends = {r["step"] for r in metric_rows(tmp_path / "runs/full") if "eval/normal_return" not in r}
    stop = next(step for step in range(250, 450, 50) if step not in episode_ends)
    part = run_script("td3_adv_finetune.py", *ft_args(*inputs, "part", stop, eval_freq=50), cwd=tmp_path)
    assert part.returncode == 0, part.stderr[-2000:]
    state = torch.load(tmp_path / "runs/part/state.pt", weights_only=True)
    assert state["episode"]["episode_len"] > 0 and len(state["online"]["obs"]) == stop  # mid-episode, buffer saved
    more = run_script("td3_adv_finetune.py", *ft_args(*inputs, "part", 450, "--resume", eval_freq=50), cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert metric_rows(tmp_path / "runs/part") == metric_rows(tmp_path / "runs/full")
    load = lambda n, f: torch.load(tmp_path / "runs" / n / f, weights_only=True)  # noqa: E731
    assert_same_tree(load("part", "checkpoint.pt"), load("full", "checkpoint.pt"))
    assert_same_tree(load("part", "state.pt"), load("full", "state.pt"))


def test_finetune_resume_needs_the_run_name(hopper_checkpoint, hopper_perturbations, tmp_path):
    proc = run_script(
        "td3_adv_finetune.py",
        "--checkpoint",
        hopper_checkpoint,
        "--perturbations",
        hopper_perturbations,
        "--resume",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "--run-name")


class Payload:
    """Unpickling this runs os.system: a checkpoint carrying code."""

    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


@pytest.mark.parametrize("script", ["td3_adv_finetune.py", "de_perturbations.py", "evaluate_matrix.py"])
def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path, script):
    Payload.marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"format": tb.CHECKPOINT_FORMAT, "x": Payload()}, f)
    args = {
        "td3_adv_finetune.py": ["--checkpoint", "evil.pt"],
        "de_perturbations.py": ["--checkpoint", "evil.pt"],
        "evaluate_matrix.py": ["--checkpoints", "evil.pt"],
    }[script]
    proc = run_script(script, *args, cwd=tmp_path)
    assert_one_line_error(proc, "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_an_npz_carrying_a_pickle_is_refused(hopper_checkpoint, tmp_path):
    np.savez(
        tmp_path / "evil.npz",
        format=np.array("o2o-adv-perturbations"),
        perturbations=np.array([Payload()], dtype=object),
    )
    Payload.marker = str(tmp_path / "pwned")
    proc = run_script(
        "td3_adv_finetune.py", "--checkpoint", hopper_checkpoint, "--perturbations", "evil.npz", cwd=tmp_path
    )
    assert_one_line_error(proc, "evil.npz", "de_perturbations.py")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()


def test_bad_checkpoints_and_perturbation_files(hopper_checkpoint, hopper_perturbations, tmp_path):
    """In-process through the scripts' entry point (the command-line path has its cases in test_bad_inputs.py)."""
    data = Path(hopper_checkpoint).read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    proc = run_cli(
        "td3_adv_finetune.py", "--checkpoint", "trunc.pt", "--perturbations", hopper_perturbations, cwd=tmp_path
    )
    assert_one_line_error(proc, "trunc.pt", "re-create")
    npz = Path(hopper_perturbations).read_bytes()
    (tmp_path / "trunc.npz").write_bytes(npz[: len(npz) // 2])
    proc = run_cli(
        "td3_adv_finetune.py", "--checkpoint", hopper_checkpoint, "--perturbations", "trunc.npz", cwd=tmp_path
    )
    assert_one_line_error(proc, "trunc.npz", "de_perturbations.py")
    # a checkpoint of another env (Hopper-v4: the same widths and bounds, so it fits that env): the perturbations,
    # made for Hopper-v5, are refused
    ckpt = torch.load(hopper_checkpoint, weights_only=True)
    ckpt["env_id"] = "Hopper-v4"
    tb.save_checkpoint(str(tmp_path / "v4.pt"), ckpt)
    proc = run_cli(
        "td3_adv_finetune.py", "--checkpoint", "v4.pt", "--perturbations", hopper_perturbations, cwd=tmp_path
    )
    assert_one_line_error(proc, "Hopper-v4", "de_perturbations.py")
    assert not (tmp_path / "runs").exists()


def test_de_rejects_nonpositive_epsilon(hopper_checkpoint, tmp_path):
    for eps in ("0", "-0.1"):
        assert_one_line_error(
            run_cli(
                "de_perturbations.py",
                "--checkpoint",
                hopper_checkpoint,
                "--epsilon",
                eps,
                "--output",
                str(tmp_path / "p.npz"),
                cwd=tmp_path,
            ),
            "--epsilon",
        )
    assert not (tmp_path / "p.npz").exists()


def test_a_nan_loss_stops_td3_bc_and_keeps_the_last_good_checkpoint(hopper_datasets, tmp_path, monkeypatch):
    """A good run to update 40, then resumed on data whose rewards turned NaN: it stops, names update 41, and the
    checkpoint of update 40 is still there, unchanged."""
    real = tb.dataset_to_transitions

    def poisoned(dataset):
        data = real(dataset)
        data["rewards"][:] = np.nan
        return data

    monkeypatch.chdir(tmp_path)
    args = dict(
        dataset_id=hopper_datasets["medium"], eval_freq=20, log_freq=10, eval_episodes=1, cuda=False, run_name="nan"
    )
    tb.main(tb.Args(total_steps=40, **args))
    before = Path("runs/nan/checkpoint.pt").read_bytes()
    monkeypatch.setattr(tb, "dataset_to_transitions", poisoned)
    with pytest.raises(tb.UserError, match=r"non-finite loss at update 41\b.*keeps the last good"):
        tb.main(tb.Args(total_steps=60, resume=True, **args))
    assert Path("runs/nan/checkpoint.pt").read_bytes() == before


def test_de_resumes_mid_run_identically(hopper_checkpoint, tmp_path, monkeypatch):
    """Interrupted (KeyboardInterrupt, as Ctrl-C) right after the 5th generation's save, in the 2nd of 3 DE runs; the
    resumed run writes the same perturbations, returns and histories as an uninterrupted one."""
    import de_perturbations as de

    common = dict(
        checkpoint=hopper_checkpoint,
        epsilon=0.4,
        num_perturbations=3,
        popsize=4,
        maxiter=3,
        de_episodes=1,
        eval_episodes=2,
        random_draws=2,
        num_workers=1,
        tol=0.0,
        max_episode_steps=40,
    )
    de.main(de.Args(output=str(tmp_path / "full.npz"), **common))
    real_save, calls = de.save_npz, []

    def interrupting_save(path, arrays):
        real_save(path, arrays)
        calls.append(path)
        if path.endswith(".state.npz") and len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(de, "save_npz", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        de.main(de.Args(output=str(tmp_path / "part.npz"), **common))
    monkeypatch.setattr(de, "save_npz", real_save)
    assert not (tmp_path / "part.npz").exists() and (tmp_path / "part.npz.state.npz").exists()
    with pytest.raises(de.UserError, match="--resume"):  # a plain re-run would silently throw the work away
        de.main(de.Args(output=str(tmp_path / "part.npz"), **common))
    de.main(de.Args(output=str(tmp_path / "part.npz"), resume=True, **common))
    assert not (tmp_path / "part.npz.state.npz").exists()
    with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "part.npz") as b:
        assert set(a.files) == set(b.files)
        for k in a.files:
            if k != "wall_time_sec":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_dataset_creation_resumes_behaviour_training_identically(tmp_path, monkeypatch):
    """Behaviour-policy training interrupted after its first saved evaluation (step 1000 of 1500), then resumed: the
    four datasets equal those of an uninterrupted run."""
    import collect_dataset as cd

    monkeypatch.chdir(tmp_path)
    common = dict(
        env_id="Hopper-v5",
        num_transitions=600,
        max_train_steps=1500,
        learning_starts=500,
        eval_freq=500,
        eval_episodes=1,
        ref_episodes=2,
        max_episode_steps=60,
        medium_target_return=1e9,
        expert_target_return=1e9,
        batch_size=64,
        overwrite=True,
        cuda=False,
        seed=5,
    )
    cd.main(cd.Args(namespace="full", **common))
    real, calls = cd.env_state, []

    def interrupting(env):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(env)

    monkeypatch.setattr(cd, "env_state", interrupting)
    with pytest.raises(KeyboardInterrupt):
        cd.main(cd.Args(namespace="part", **common))
    monkeypatch.setattr(cd, "env_state", real)
    state_path = Path(cd.training_state_path(cd.Args(namespace="part", **common)))
    assert torch.load(state_path, weights_only=True)["steps_done"] == 1000
    with pytest.raises(cd.UserError, match="--resume"):
        cd.main(cd.Args(namespace="part", **common))
    cd.main(cd.Args(namespace="part", resume=True, **common))
    assert not state_path.exists()
    import minari

    for level in cd.LEVELS:
        a = minari.load_dataset(cd.dataset_id_for("full", "Hopper-v5", level, 0))
        b = minari.load_dataset(cd.dataset_id_for("part", "Hopper-v5", level, 0))
        assert a.total_steps == b.total_steps, level
        for ea, eb in zip(a.iterate_episodes(), b.iterate_episodes()):
            for field in ("observations", "actions", "rewards", "terminations", "truncations"):
                np.testing.assert_array_equal(getattr(ea, field), getattr(eb, field), err_msg=f"{level} {field}")


def test_a_nan_loss_stops_finetuning_naming_the_step(hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch):
    """Offline rows with NaN rewards: the first update (step 33, after 32 warm-up steps) gives a NaN critic loss; the
    run stops at the next check and names step 33; the checkpoint and state of the evaluation at step 30 stay."""
    import td3_adv_finetune as ft
    from robust_o2o import datasets

    real = datasets.dataset_to_transitions  # what datasets.offline_transitions reads the offline data with

    def poisoned(dataset):
        data = real(dataset)
        data["rewards"][:] = np.inf
        return data

    monkeypatch.setattr(datasets, "dataset_to_transitions", poisoned)
    monkeypatch.chdir(tmp_path)
    args = ft.Args(
        checkpoint=hopper_checkpoint,
        perturbations=hopper_perturbations,
        total_steps=60,
        eval_freq=30,
        eval_episodes=1,
        batch_size=32,
        cuda=False,
        run_name="nan",
        r_off=1.0,
    )
    with pytest.raises(ft.UserError, match=r"non-finite loss at step 33\b"):
        ft.main(args)
    assert torch.load("runs/nan/checkpoint.pt", weights_only=True)["step"] == 30
    assert torch.load("runs/nan/state.pt", weights_only=True)["step"] == 30


def test_overwrite_moves_the_old_run_aside_whole_even_when_the_new_run_dies_before_its_first_save(
    hopper_datasets, tmp_path, monkeypatch, capsys
):
    """--overwrite once truncated the log and rewrote args.json, so a crash before the first save left the old
    checkpoint beside the new arguments and the old log was gone. Now the old run moves aside whole (files made beside
    it included), intact, and the run says where."""
    import td3_bc_offline as tb

    monkeypatch.chdir(tmp_path)
    common = dict(dataset_id=hopper_datasets["medium"], total_steps=4, eval_freq=4, eval_episodes=1, batch_size=8)
    tb.main(tb.Args(**common, cuda=False, run_name="r"))
    (tmp_path / "runs" / "r" / "perturbations.npz").write_bytes(b"made against the old policy")
    old = {name: (tmp_path / "runs" / "r" / name).read_bytes() for name in os.listdir("runs/r") if name != ".lock"}

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the first save")

    monkeypatch.setattr(tb, "evaluate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        tb.main(tb.Args(**common, cuda=False, run_name="r", overwrite=True, seed=2))
    assert set(os.listdir("runs/r")) <= {".lock", "args.json", "metrics.jsonl"}
    assert json.load(open("runs/r/args.json"))["seed"] == 2
    (aside,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("r.replaced-")]
    assert {name: (aside / name).read_bytes() for name in os.listdir(aside)} == old  # the old run, byte for byte
    assert f"moved to runs/{aside.name}" in capsys.readouterr().out


def test_a_replaced_delta_set_is_refused_by_content_by_every_reader(hopper_checkpoint, hopper_perturbations, tmp_path):
    """A fine-tune records its δ set's path and sha256. Running DE again over that path is refused without
    --overwrite; once the file is replaced anyway, the matrix (its transfer and random cells) and --resume refuse it in
    one line naming both hashes and the file, and write nothing."""
    from test_bad_inputs import tree

    from conftest import offline_run
    from robust_o2o.files import sha256_file

    run = offline_run(tmp_path / "runs" / "off", hopper_checkpoint, hopper_perturbations).parent
    npz = str(run / "perturbations.npz")
    proc = run_cli(
        "td3_adv_finetune.py", *ft_args(str(run / "checkpoint.pt"), npz, "ft", 40, eval_freq=20), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = sha256_file(npz)
    de_argv = ["--checkpoint", str(run / "checkpoint.pt"), "--epsilon", "0.4", "--num-perturbations", "1"]
    de_argv += ["--popsize", "4", "--maxiter", "1", "--de-episodes", "1", "--eval-episodes", "1", "--random-draws", "2"]
    de_argv += ["--de-seed", "7", "--num-workers", "1"]
    assert_one_line_error(run_cli("de_perturbations.py", *de_argv, cwd=tmp_path), "already exists", "--overwrite")
    assert sha256_file(npz) == recorded
    proc = run_cli("de_perturbations.py", *de_argv, "--overwrite", cwd=tmp_path)  # the user insists: another set
    assert proc.returncode == 0, proc.stderr[-2000:]
    now = sha256_file(npz)
    assert now != recorded
    before = tree(tmp_path)
    matrix = run_cli(
        "evaluate_matrix.py", "--checkpoints", str(tmp_path / "runs" / "ft"), "--eval-episodes", "1",
        "--no-fresh-attack", "--output-dir", str(tmp_path / "out"), cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(matrix, npz, now[:16], recorded[:16], "td3_adv_finetune.py")
    resume = run_cli(
        "td3_adv_finetune.py", *ft_args(str(run / "checkpoint.pt"), npz, "ft", 60, "--resume", eval_freq=20),
        cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(resume, npz, now[:16], recorded[:16])
    assert tree(tmp_path) == before


def test_a_resumed_log_shorter_than_its_state_records_is_refused(hopper_checkpoint, hopper_perturbations, tmp_path):
    """The state is fsynced with the log's length; a log cut shorter (a power loss before the log reached the disk)
    would be extended with NUL bytes and no longer parse. --resume refuses it in one line and changes no file; the log
    is made durable before each state that records its length."""
    from test_bad_inputs import tree

    inputs = (hopper_checkpoint, hopper_perturbations)
    proc = run_cli("td3_adv_finetune.py", *ft_args(*inputs, "short", 40, eval_freq=20), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = tmp_path / "runs" / "short" / "metrics.jsonl"
    state = torch.load(tmp_path / "runs" / "short" / "state.pt", weights_only=True)
    assert state["metrics_bytes"] == log.stat().st_size
    log.write_bytes(log.read_bytes()[: state["metrics_bytes"] // 2])
    before = tree(tmp_path)
    proc = run_cli("td3_adv_finetune.py", *ft_args(*inputs, "short", 60, "--resume", eval_freq=20), cwd=tmp_path)
    assert_one_line_error(proc, "metrics.jsonl", f"records {state['metrics_bytes']}", "--overwrite")
    assert tree(tmp_path) == before


def test_a_malformed_resume_state_is_one_line(hopper_checkpoint, tmp_path):
    """A DE state holding only its arguments, and a dataset training state that is a bare tensor, are refused by
    --resume in one line, not a KeyError or AttributeError."""
    import json
    from dataclasses import asdict

    import collect_dataset as cd
    import de_perturbations as de
    from robust_o2o.files import save_npz

    args = de.Args(checkpoint=hopper_checkpoint, output=str(tmp_path / "p.npz"), num_perturbations=1, resume=True)
    save_npz(str(tmp_path / "p.npz.state.npz"), {"args": json.dumps(asdict(args))})
    with pytest.raises(de.UserError, match="is not a complete DE state"):
        de.main(args)
    state = tmp_path / "collect" / "state.pt"
    state.parent.mkdir()
    torch.save(torch.zeros(3), state)
    with pytest.raises(cd.UserError, match="is not a behaviour-policy training state"):
        cd.load_training_state(str(state), cd.Args(resume=True))


def test_litter_is_cleaned_and_interruptions_are_one_line(tmp_path, monkeypatch):
    """What a killed or refused run leaves: a dead writer's temporary file goes when the folder is locked again; a
    folder that holds only its lock goes at exit; MuJoCo's warning is one Python warning and no MUJOCO_LOG.TXT; a
    child started with die_with_parent dies with its parent (a killed matrix leaves no DE attack running); Ctrl-C,
    and an error under an open progress bar, are one line of their own; a run name with a newline is refused."""
    from tqdm import tqdm

    from robust_o2o import cli, folders

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "checkpoint.pt.4194999.tmp").write_bytes(b"half a checkpoint")  # above Linux's pid_max: dead
    (run / "checkpoint.pt").write_bytes(b"kept")
    folders.lock_run_dir(str(run))
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint.pt"]
    empty = tmp_path / "runs" / "refused"
    empty.mkdir()
    (empty / ".lock").write_text("1\n")
    folders.release_if_empty(str(empty))
    folders.release_if_empty(str(run))
    assert not empty.exists() and run.exists()

    probe = (
        "from robust_o2o.envs import make_env; make_env('HalfCheetah-v5').close(); make_env('HalfCheetah-v5').close()"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr.count("MuJoCo:") == 1 and not (tmp_path / "MUJOCO_LOG.TXT").exists()

    script = (
        "import subprocess; from robust_o2o.cli import die_with_parent; "
        "c = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent); print(c.pid, flush=True); c.wait()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):
        if not folders.pid_alive(child) or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child outlived its parent")

    def interrupted(_):
        bar = tqdm(range(10), desc="a bar")  # open in the failing frame, as a script's loop bar is
        bar.update(3)
        raise KeyboardInterrupt

    def refused(_):
        bar = tqdm(range(10), desc="a bar")
        bar.update(3)
        raise cli.UserError("the folder is read-only")

    for main, code, text in ((interrupted, 130, "error: interrupted"), (refused, 1, "error: the folder is read-only")):
        monkeypatch.setattr(sys, "argv", ["script"])
        err = __import__("io").StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        with pytest.raises(SystemExit) as stopped:
            cli.cli(main, tb.Args)
        monkeypatch.undo()
        message = stopped.value.code if isinstance(stopped.value.code, str) else err.getvalue().strip().split("\r")[-1]
        assert (stopped.value.code == code or code == 1) and message.startswith(text) and "Traceback" not in message
        assert "a bar" not in err.getvalue().rsplit("\r", 1)[-1]  # the bar was erased before the error line
    with pytest.raises(cli.UserError, match="control character"):
        cli.check_name("two\nlines", "--run-name", "runs/")


def test_no_message_claims_a_checkpoint_that_does_not_exist_and_a_full_log_is_named(tmp_path):
    """The NaN stop says the run keeps its last good checkpoint only where one exists; a log write that fails (a full
    disk: /dev/full) names the log, not 'a file'."""
    from robust_o2o import cli, runs

    sentinel = runs.NonFiniteSentinel(torch.device("cpu"), "step", str(tmp_path))
    sentinel.watch(torch.tensor(float("nan")), 7)
    with pytest.raises(cli.UserError, match="holds no checkpoint yet") as stopped:
        sentinel.check()
    assert "--resume" not in str(stopped.value)
    (tmp_path / "checkpoint.pt").write_bytes(b"saved")
    with pytest.raises(cli.UserError, match="keeps the last good checkpoint"):
        sentinel.check()
    run = runs.Run(str(tmp_path / "r"), "r", tb.Args(), None)
    run.metrics.close()
    run.metrics = open("/dev/full", "w")
    with pytest.raises(OSError) as failed:
        run.log({"step": 1, "x": 1.0})
    assert "/dev/full" in cli.io_failure(failed.value) and "a file" not in cli.io_failure(failed.value)
