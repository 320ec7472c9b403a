"""Every input checked at the boundary, by class (issue 13): each bad input of a class is fed to every script that reads
that input, and each run must end in one `error:` line, exit non-zero, and leave the tree exactly as it was."""

import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, offline_run, run_cli, run_script
from robust_o2o import cli, formats
from robust_o2o.files import save_checkpoint, save_npz
from robust_o2o.perturbation import Perturbation


def tree(root) -> dict:
    """Every file under root with its content hash: a run that fails must neither add nor change a file."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def run_refused(tmp_path, script, args, *needles, command_line=False):
    """The script refuses `args`: one error line, a non-zero exit, the tree unchanged. In-process, through the
    scripts' own entry point, unless `command_line` (a subprocess, as a user runs it; once per script below)."""
    before = tree(tmp_path)
    proc = (
        run_script(script, *args, cwd=tmp_path, timeout=300) if command_line else run_cli(script, *args, cwd=tmp_path)
    )
    assert_one_line_error(proc, *needles)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert tree(tmp_path) == before, f"{script} wrote or changed files before failing"


# Class 1: checkpoints are validated against their schema (keys, types, shapes against their own dims) before any use
def drop(key):
    return lambda c: c.pop(key)


def reshape(key, sub=None):
    """One row more in ckpt[key] (or in the state dict ckpt[key][sub])."""

    def f(c):
        holder, name = (c, key) if sub is None else (c[key], sub)
        holder[name] = torch.zeros(holder[name].shape[0] + 1, *holder[name].shape[1:])

    return f


BAD_CHECKPOINTS = {
    "no actor": (drop("actor"), "'actor' is missing"),
    "no obs_std": (drop("obs_std"), "'obs_std' is missing"),
    "obs_mean of the wrong size": (reshape("obs_mean"), "'obs_mean' has shape"),
    "actor wider than its hidden_dim": (reshape("actor", "net.0.weight"), "'actor/net.0.weight' has shape"),
    "critic of the wrong input size": (reshape("critic", "net.0.weight"), "'critic/net.0.weight' has shape"),
    "zero std": (lambda c: c["obs_std"].zero_(), "non-positive std"),
    "act_dim a string": (lambda c: c.__setitem__("act_dim", "3"), "'act_dim' is missing or not a int"),
    # DE once ran on such a checkpoint and replaced the valid perturbations.npz beside it with NaNs
    "a NaN actor weight": (lambda c: c["actor"]["net.2.weight"].__setitem__((0, 0), float("nan")), "holds NaN or inf"),
    "an infinite action bound": (lambda c: c["action_high"].__setitem__(0, float("inf")), "holds NaN or inf"),
    "a float64 normalization": (lambda c: c.__setitem__("obs_mean", c["obs_mean"].double()), "expected torch.float32"),
    # every tensor a stage uses: the targets and the Adam states (fine-tuning keeps the critic's by default) too
    "a NaN in actor_target": (
        lambda c: c["actor_target"]["net.0.weight"].__setitem__((0, 0), float("nan")),
        "'actor_target/net.0.weight' holds NaN or inf",
    ),
    "a NaN in the critic's Adam state": (
        lambda c: c["critic_optimizer"]["state"][0]["exp_avg_sq"].view(-1).__setitem__(0, float("nan")),
        "'critic_optimizer/state/0/exp_avg_sq' holds NaN or inf",
    ),
    "tensors on the meta device": (
        lambda c: c.__setitem__("obs_mean", torch.empty_like(c["obs_mean"], device="meta")),
        "'obs_mean' is a tensor on the meta device",
    ),
    "a float16 critic": (lambda c: c["critic"].__setitem__("net.2.bias", c["critic"]["net.2.bias"].half()), "float32"),
    "no dataset_id": (drop("dataset_id"), "'dataset_id' is missing"),
    "no seed in args": (lambda c: c["args"].pop("seed"), "no integer seed"),
    "a fine-tune without its init": (lambda c: c.update(finetune_condition="normal", curriculum="fixed"), "'init'"),
    "a string time limit": (lambda c: c.__setitem__("max_episode_steps", "1000"), "'max_episode_steps'"),
    "a NaN reference score": (lambda c: c.__setitem__("ref_min_score", float("nan")), "'ref_min_score'"),
    # self-consistent, but for another env's widths: Walker2d-v5 observes 17 and acts in 6 dimensions, Hopper 11 and 3
    "Hopper's networks named Walker2d-v5": (lambda c: c.__setitem__("env_id", "Walker2d-v5"), "does not fit its env"),
    "a non-MuJoCo env": (lambda c: c.__setitem__("env_id", "Pendulum-v1"), "not a Gymnasium MuJoCo env"),
    "an unknown env": (lambda c: c.__setitem__("env_id", "NoSuchEnv-v5"), "unknown env id"),
}


def bad_checkpoint(case: str, hopper_checkpoint, hopper_perturbations, folder) -> str:
    """A run folder with the fixture checkpoint, BAD_CHECKPOINTS[case] applied, and a good δ set beside it."""
    ckpt = torch.load(hopper_checkpoint, weights_only=True)
    BAD_CHECKPOINTS[case][0](ckpt)
    (folder / "run").mkdir()
    torch.save(ckpt, folder / "run" / "checkpoint.pt")
    shutil.copy(hopper_perturbations, folder / "run" / "perturbations.npz")
    return str(folder / "run" / "checkpoint.pt")


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_malformed_checkpoint_is_refused_by_the_loader(case, hopper_checkpoint, hopper_perturbations, tmp_path):
    """Every class instance against the one loader every reader calls (in-process: a subprocess adds nothing here)."""
    path = bad_checkpoint(case, hopper_checkpoint, hopper_perturbations, tmp_path)
    with pytest.raises(cli.UserError, match="checkpoint") as refused:
        formats.load_checkpoint(path)
    assert BAD_CHECKPOINTS[case][1] in str(refused.value)


CHECKPOINT_READERS = {
    "de_perturbations.py": ["--num-perturbations", "1", "--maxiter", "1", "--popsize", "4"],
    "td3_adv_finetune.py": ["--total-steps", "10", "--eval-freq", "10", "--run-name", "x"],
    "evaluate_matrix.py": ["--output-dir", "out"],
}


@pytest.mark.parametrize(
    "script,case",
    [
        ("de_perturbations.py", "a NaN actor weight"),  # DE once replaced a valid perturbations.npz with NaNs on it
        ("td3_adv_finetune.py", "Hopper's networks named Walker2d-v5"),
        ("evaluate_matrix.py", "a float64 normalization"),
    ],
)
def test_every_checkpoint_reader_refuses_through_the_loader_in_one_line(
    script, case, hopper_checkpoint, hopper_perturbations, tmp_path
):
    path = bad_checkpoint(case, hopper_checkpoint, hopper_perturbations, tmp_path)
    flag = "--checkpoints" if script == "evaluate_matrix.py" else "--checkpoint"
    run_refused(tmp_path, script, [flag, path, *CHECKPOINT_READERS[script]], "checkpoint", BAD_CHECKPOINTS[case][1])


def test_the_project_s_own_checkpoints_pass_the_schema_check(hopper_checkpoint):
    assert formats.checkpoint_problem(torch.load(hopper_checkpoint, weights_only=True)) is None


@pytest.mark.parametrize(
    "value,key,kind",
    [
        ({"q": np.float64(0.5)}, "'q'", "numpy.float64"),  # np.cos in a fork's q schedule (a float subclass)
        ({"eval": {"eval/normal_return": np.float32(1.0)}}, "'eval/eval/normal_return'", "numpy.float32"),
        ({"episode": {"steps": np.int64(3)}}, "'episode/steps'", "numpy.int64"),
        ({"deltas": [0.1, np.zeros(2)]}, "'deltas[1]'", "numpy.ndarray"),
    ],
)
def test_save_checkpoint_refuses_what_weights_only_loading_cannot_read_naming_key_and_type(value, key, kind, tmp_path):
    """Refused at write time, before a file exists, with the key and its type; a clean checkpoint saves and loads."""
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(cli.UserError, match="weights_only") as refused:
        save_checkpoint(str(path), {"step": 1, **value})
    assert key in str(refused.value) and kind in str(refused.value) and not os.listdir(tmp_path)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    adam.step()
    clean = {"q": 0.5, "size": torch.Size([2]), "opt": adam.state_dict(), "rng": torch.get_rng_state(), "n": None}
    save_checkpoint(str(path), clean)
    assert torch.load(path, weights_only=True)["q"] == 0.5


def test_a_checkpoint_error_names_the_script_that_writes_that_checkpoint(hopper_checkpoint, tmp_path):
    """The fix names the script recorded in the checkpoint (a fork's own name), also where weights_only loading fails
    and the name is read from the pickle's opcodes without running them; never td3_bc_offline.py for a fine-tune."""
    ckpt = torch.load(hopper_checkpoint, weights_only=True)
    ckpt = {**ckpt, "stage": "my_cosine_fork", "finetune_condition": "normal", "q": np.float64(0.3)}
    torch.save(ckpt, tmp_path / "fork.pt")  # written around save_checkpoint's guard, as an old fork did
    with pytest.raises(cli.UserError, match="re-create it with `python my_cosine_fork.py`"):
        formats.load_checkpoint(str(tmp_path / "fork.pt"))
    ckpt = {**ckpt, "stage": "td3_adv_finetune", "q": 0.3}  # a fine-tune's record without its curriculum
    torch.save(ckpt, tmp_path / "malformed.pt")
    with pytest.raises(cli.UserError, match="malformed.*`python td3_adv_finetune.py`"):
        formats.load_checkpoint(str(tmp_path / "malformed.pt"))


# Class 2: perturbation files: keys, a non-empty finite δ set inside [−ε, ε], random draws, an ε the model can take
def setter(key, value):
    return lambda d: d.__setitem__(key, value(d) if callable(value) else value)


BAD_PERTURBATIONS = {
    "no random draws": (lambda d: d.pop("random_deltas"), "'random_deltas' is missing"),
    "empty δ set": (setter("perturbations", lambda d: d["perturbations"][:0]), "non-empty"),
    "NaN in δ": (
        setter(
            "perturbations",
            lambda d: np.where(
                np.arange(d["perturbations"].size).reshape(d["perturbations"].shape) == 0, np.nan, d["perturbations"]
            ),
        ),
        "NaN or inf",
    ),
    "δ outside [−ε, ε]": (
        setter("random_deltas", lambda d: d["random_deltas"] * 0 + 2 * float(d["epsilon"])),
        "outside [−ε, ε]",
    ),
    "ε the model cannot take": (setter("epsilon", 1.5), "does not fit the multiplicative model"),
    "non-finite ε": (setter("epsilon", np.inf), "does not fit"),
    "unnamed model": (setter("perturbation_model", ""), "unnamed"),
    "a string ε": (setter("epsilon", np.asarray("0.1")), "ε must be a real number"),
    "complex δ": (setter("perturbations", lambda d: d["perturbations"] + 0j), "real numbers"),
}


def bad_perturbations(case: str, hopper_checkpoint, hopper_perturbations, folder) -> str:
    d = dict(np.load(hopper_perturbations, allow_pickle=False))
    BAD_PERTURBATIONS[case][0](d)
    (folder / "run").mkdir()
    shutil.copy(hopper_checkpoint, folder / "run" / "checkpoint.pt")
    save_npz(str(folder / "run" / "perturbations.npz"), d)
    return str(folder / "run" / "checkpoint.pt")


@pytest.mark.parametrize("case", list(BAD_PERTURBATIONS))
def test_a_malformed_perturbations_file_is_refused_by_the_loader(
    case, hopper_checkpoint, hopper_perturbations, tmp_path
):
    bad_perturbations(case, hopper_checkpoint, hopper_perturbations, tmp_path)
    with pytest.raises(cli.UserError, match="malformed") as refused:
        formats.load_perturbations(str(tmp_path / "run" / "perturbations.npz"))
    assert BAD_PERTURBATIONS[case][1] in str(refused.value)


@pytest.mark.parametrize("script,case", [("td3_adv_finetune.py", "complex δ"), ("evaluate_matrix.py", "a string ε")])
def test_every_perturbations_reader_refuses_through_the_loader_in_one_line(
    script, case, hopper_checkpoint, hopper_perturbations, tmp_path
):
    path = bad_perturbations(case, hopper_checkpoint, hopper_perturbations, tmp_path)
    flag = "--checkpoints" if script == "evaluate_matrix.py" else "--checkpoint"
    run_refused(tmp_path, script, [flag, path, *CHECKPOINT_READERS[script]], "malformed", BAD_PERTURBATIONS[case][1])


@pytest.mark.parametrize("script", ["td3_adv_finetune.py", "evaluate_matrix.py"])
@pytest.mark.parametrize(
    "record,needle",
    [
        ({"perturbation_model": "sideways"}, "sideways"),  # a model another script (a fork) declares
        ({"perturbation_target": "observation"}, "observation"),  # a set made under a fork's observation perturbation
        ({"perturbation_code": "0123456789abcdef"}, "0123456789abcdef"),  # under an edited copy of perturb_action
    ],
)
def test_a_set_made_under_another_perturbation_is_refused_by_each_reader_naming_perturbation_from(
    script, record, needle, hopper_checkpoint, hopper_perturbations, tmp_path
):
    """Which perturbations a stage applies is its script's PERTURBATION to say (robust_o2o/perturbation.py): a set
    made under another is refused in one line that names it and the fix, before anything is written."""
    d = {**dict(np.load(hopper_perturbations, allow_pickle=False)), **record}
    (tmp_path / "run").mkdir()
    shutil.copy(hopper_checkpoint, tmp_path / "run" / "checkpoint.pt")
    save_npz(str(tmp_path / "run" / "perturbations.npz"), d)
    flag = "--checkpoints" if script == "evaluate_matrix.py" else "--checkpoint"
    args = [flag, str(tmp_path / "run" / "checkpoint.pt"), *CHECKPOINT_READERS[script]]
    run_refused(tmp_path, script, args, needle, "--perturbation-from")


def test_the_project_s_own_perturbations_pass_the_check(hopper_perturbations):
    assert formats.perturbations_problem(dict(np.load(hopper_perturbations, allow_pickle=False))) is None


# Class 8: a run folder belongs to one process at a time (an OS lock that dies with its process)
def test_a_second_run_of_the_same_name_is_refused_while_the_first_lives_and_kill_9_leaves_no_stale_lock(
    hopper_checkpoint, hopper_perturbations, tmp_path
):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    offline_run(tmp_path / "off", hopper_checkpoint, hopper_perturbations)
    cmd = [
        sys.executable,
        str(ROOT / "td3_adv_finetune.py"),
        "--checkpoint",
        str(tmp_path / "off" / "checkpoint.pt"),
        "--total-steps",
        "100000",
        "--eval-freq",
        "50000",
        "--eval-episodes",
        "1",
        "--batch-size",
        "16",
        "--no-cuda",
        "--run-name",
        "same",
    ]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "runs" / "same" / "metrics.jsonl"
        for _ in range(600):  # until the first run owns the folder and has logged its step-0 evaluation
            if metrics.exists() and metrics.stat().st_size > 0:
                break
            time.sleep(0.1)
        second = run_script("td3_adv_finetune.py", *cmd[2:], "--overwrite", cwd=tmp_path, timeout=300)
        assert_one_line_error(second, "runs/same is in use by another running process", f"pid {first.pid}")
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = run_script(
        "td3_adv_finetune.py",
        *cmd[2 : cmd.index("--total-steps")],
        "--total-steps",
        "20",
        "--eval-freq",
        "10",
        "--eval-episodes",
        "1",
        "--batch-size",
        "16",
        "--no-cuda",
        "--run-name",
        "same",
        "--overwrite",
        cwd=tmp_path,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]  # kill -9 released the lock: no stale lock


# Class 6: names that become paths stay inside their stores
@pytest.mark.parametrize(
    "script,flag",
    [("td3_bc_offline.py", "--run-name"), ("td3_adv_finetune.py", "--run-name"), ("collect_dataset.py", "--namespace")],
)
@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/../../escape"])
def test_a_name_that_would_escape_its_store_is_refused(
    script, flag, name, hopper_checkpoint, hopper_datasets, tmp_path
):
    args = {
        "td3_bc_offline.py": ["--dataset-id", hopper_datasets["medium"], "--total-steps", "10"],
        "td3_adv_finetune.py": ["--checkpoint", hopper_checkpoint, "--total-steps", "10"],
        "collect_dataset.py": ["--levels", "random", "--num-transitions", "10", "--ref-episodes", "1"],
    }[script]
    store = os.environ["MINARI_DATASETS_PATH"]
    before = tree(store)
    run_refused(tmp_path, script, [*args, flag, name], flag, "would leave")
    assert tree(store) == before and not os.path.exists("/tmp/escape")


# Class 7: the matrix checks everything before it writes, and writes its output set only once all of it is made
@pytest.mark.parametrize("damage", ["missing", "corrupt", "no evaluation"])
def test_the_matrix_keeps_a_good_table_when_a_later_input_is_bad(
    damage, hopper_checkpoint, hopper_perturbations, tmp_path
):
    import evaluate_matrix as em
    import td3_adv_finetune as ft

    off = offline_run(tmp_path / "runs" / "off", hopper_checkpoint, hopper_perturbations).parent
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        em.main(em.Args(checkpoints=(str(off),), output_dir="out", eval_episodes=1, num_workers=1))
        ft.main(
            ft.Args(
                checkpoint=str(off / "checkpoint.pt"),
                total_steps=20,
                eval_freq=10,
                eval_episodes=1,
                batch_size=16,
                cuda=False,
                run_name="ft",
            )
        )
    finally:
        os.chdir(cwd)
    metrics = tmp_path / "runs" / "ft" / "metrics.jsonl"
    if damage == "missing":
        metrics.unlink()
    elif damage == "corrupt":
        metrics.write_text('{"step": 0, "eval/normal_return": 1.0}\n{"step": 1, "eval/no')
    else:
        metrics.write_text('{"step": 3, "charts/episodic_return": 1.0}\n')
    run_refused(
        tmp_path,
        "evaluate_matrix.py",
        ["--checkpoints", "runs", "--output-dir", "out", "--eval-episodes", "1", "--num-workers", "1"],
        "metrics file",
    )


# Class 3: numeric flags: each field's range is declared next to it and checked before anything runs
BAD_NUMBERS = [
    ("td3_bc_offline.py", "--batch-size", "0"),
    ("td3_bc_offline.py", "--learning-rate", "-1"),
    ("td3_bc_offline.py", "--tau", "nan"),
    ("td3_bc_offline.py", "--log-freq", "0"),
    ("td3_bc_offline.py", "--hidden-dim", "0"),
    ("td3_adv_finetune.py", "--eval-freq", "0"),
    ("td3_adv_finetune.py", "--buffer-size", "0"),
    ("td3_adv_finetune.py", "--gamma", "1.5"),
    ("td3_adv_finetune.py", "--ref-max-score", "inf"),
    ("de_perturbations.py", "--epsilon", "inf"),
    ("de_perturbations.py", "--num-workers", "-1"),
    ("de_perturbations.py", "--mutation", "0.5", "2.5"),
    ("de_perturbations.py", "--tol", "-1"),
    ("collect_dataset.py", "--num-transitions", "0"),
    ("collect_dataset.py", "--rollout-noise", "-0.1"),
    ("collect_dataset.py", "--eval-freq", "0"),
    ("collect_dataset.py", "--gamma", "-0.5"),
    ("evaluate_matrix.py", "--eval-episodes", "0"),
    ("evaluate_matrix.py", "--video-size", "8"),
    ("evaluate_matrix.py", "--attack-popsize", "2"),
    ("evaluate_matrix.py", "--num-workers", "-3"),
    # no upper bound once let a seed >= 2**32 fail inside numpy after the run folder existed
    ("td3_bc_offline.py", "--seed", str(2**32)),
    ("td3_adv_finetune.py", "--eval-seed", str(2**40)),
    ("de_perturbations.py", "--de-seed", str(-(2**33))),
    ("collect_dataset.py", "--seed", str(2**31)),
]


@pytest.mark.parametrize("case", BAD_NUMBERS, ids=[" ".join(c) for c in BAD_NUMBERS])
def test_an_out_of_range_number_is_refused_by_the_range_check(case):
    """In-process: each script's own argument check (its check_args, else check_ranges) on the parsed flags."""
    import importlib

    import tyro

    script, flag, *values = case
    module = importlib.import_module(script.removesuffix(".py"))
    args = tyro.cli(module.Args, args=[flag, *values])
    with pytest.raises(cli.UserError, match=flag):
        getattr(module, "check_args", cli.check_ranges)(args)


@pytest.mark.parametrize("case", BAD_NUMBERS[-5:], ids=[c[0] for c in BAD_NUMBERS[-5:]])  # one per script
def test_an_out_of_range_number_stops_each_script_before_anything_runs(case, tmp_path):
    """The command-line path, once per script: one error line, a non-zero exit and an unchanged tree."""
    script, flag, *values = case
    run_refused(tmp_path, script, [flag, *values], flag, command_line=True)


@pytest.mark.parametrize(
    "script,args",
    [
        ("collect_dataset.py", ["--ref-min-score", "5", "--ref-max-score", "5"]),
        ("td3_adv_finetune.py", ["--ref-min-score", "1", "--ref-max-score", "1", "--total-steps", "10"]),
    ],
)
def test_equal_reference_scores_are_refused_not_divided_by(
    script, args, hopper_checkpoint, hopper_perturbations, tmp_path
):
    extra = ["--checkpoint", hopper_checkpoint] if script == "td3_adv_finetune.py" else []
    run_refused(tmp_path, script, [*extra, *args], "ref")


@pytest.mark.parametrize(
    "script", ["td3_bc_offline", "td3_adv_finetune", "de_perturbations", "collect_dataset", "evaluate_matrix"]
)
def test_every_numeric_field_declares_its_range(script):
    import dataclasses
    import importlib
    import typing

    module = importlib.import_module(script)
    hints = typing.get_type_hints(module.Args, include_extras=True)
    for f in dataclasses.fields(module.Args):
        base = (
            typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is typing.Annotated else hints[f.name]
        )
        leaves = {a for a in typing.get_args(base) if a is not type(None)} or {base}
        numeric = any(
            leaf in (int, float) or typing.get_origin(leaf) is tuple and set(typing.get_args(leaf)) <= {int, float}
            for leaf in leaves
        )
        if numeric:
            assert any(isinstance(m, cli.Range) for m in getattr(hints[f.name], "__metadata__", ())), (
                f"{script}.{f.name}"
            )


# Class 4: I/O failures (a full disk, a read-only folder) end in one line; the last good checkpoint and state remain
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_good_checkpoint(
    hopper_datasets, tmp_path, monkeypatch
):
    """The save's temporary file is pointed at /dev/full (no mount needed): writing it fails with ENOSPC."""
    import td3_bc_offline as tb

    monkeypatch.chdir(tmp_path)
    base = dict(
        dataset_id=hopper_datasets["medium"], eval_freq=50, eval_episodes=1, cuda=False, run_name="full", seed=1
    )
    tb.main(tb.Args(total_steps=50, **base))
    ckpt = tmp_path / "runs" / "full" / "checkpoint.pt"
    good = ckpt.read_bytes()
    os.symlink("/dev/full", f"{ckpt}.{os.getpid()}.tmp")
    with pytest.raises(cli.UserError) as err:
        tb.main(tb.Args(total_steps=100, resume=True, **base))
    msg = str(err.value)
    assert "No space left on device" in msg and "--resume" in msg and "\n" not in msg
    assert ckpt.read_bytes() == good and not os.path.lexists(f"{ckpt}.{os.getpid()}.tmp")
    tb.main(tb.Args(total_steps=100, resume=True, **base))  # the disk has room again: --resume continues
    assert torch.load(ckpt, weights_only=True)["step"] == 100


def test_a_read_only_run_folder_is_one_line_from_the_command_line(hopper_datasets, tmp_path):
    import subprocess

    base = [
        "--dataset-id",
        hopper_datasets["medium"],
        "--eval-freq",
        "50",
        "--eval-episodes",
        "1",
        "--no-cuda",
        "--run-name",
        "ro",
    ]
    assert run_script("td3_bc_offline.py", *base, "--total-steps", "50", cwd=tmp_path).returncode == 0
    folder = tmp_path / "runs" / "ro"
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here, so no folder can be made read-only for root")
    try:
        before = tree(folder)
        proc = run_script("td3_bc_offline.py", *base, "--total-steps", "100", "--resume", cwd=tmp_path)
        assert_one_line_error(proc, "Operation not permitted", "--resume")
        assert "Traceback" not in proc.stdout + proc.stderr
        assert tree(folder)["checkpoint.pt"] == before["checkpoint.pt"]  # the last good checkpoint (and resume state)
    finally:
        subprocess.run(["chattr", "-i", str(folder)])


# Class 5: a damaged Minari dataset (a truncated hdf5 file) is one line wherever it is read
@pytest.fixture(scope="module")
def broken_dataset():
    import minari

    import collect_dataset as cd

    args = cd.Args(
        env_id="Hopper-v5",
        namespace="broken",
        levels=("random",),
        num_transitions=300,
        ref_episodes=2,
        max_episode_steps=50,
        overwrite=True,
        cuda=False,
    )
    cd.main(args)
    ds_id = cd.dataset_id_for("broken", "Hopper-v5", "random", 0)
    for d, _, files in os.walk(minari.storage.get_dataset_path(ds_id)):
        for f in files:
            if f.endswith(".hdf5"):
                p = os.path.join(d, f)
                data = open(p, "rb").read()
                open(p, "wb").write(data[: len(data) // 2])
    return ds_id


@pytest.mark.parametrize("script", ["td3_bc_offline.py", "td3_adv_finetune.py"])
def test_a_truncated_dataset_is_one_line_wherever_it_is_read(
    script, broken_dataset, hopper_checkpoint, hopper_perturbations, tmp_path
):
    if script == "td3_bc_offline.py":
        args = ["--dataset-id", broken_dataset, "--total-steps", "10"]
    else:
        ckpt = torch.load(hopper_checkpoint, weights_only=True)
        ckpt["dataset_id"] = broken_dataset
        (tmp_path / "run").mkdir()
        torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
        shutil.copy(hopper_perturbations, tmp_path / "run" / "perturbations.npz")
        args = ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--total-steps", "10"]
    run_refused(tmp_path, script, args, broken_dataset, "collect_dataset.py")


# Gymnasium envs that are not MuJoCo (a resumed run restores MuJoCo's physics state) are refused up front, in one line
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1", "NoSuchEnv-v5"])
def test_an_env_this_project_cannot_run_is_refused_by_make_env(env_id):
    from robust_o2o.envs import make_env

    with pytest.raises(cli.UserError, match="not a Gymnasium MuJoCo env|unknown env id"):
        make_env(env_id)


def test_a_non_mujoco_env_is_refused_before_a_dataset_or_run_is_made(hopper_datasets, tmp_path, monkeypatch):
    session_store, store = os.environ["MINARI_DATASETS_PATH"], tmp_path / "store"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    pendulum = ["--env-id", "Pendulum-v1", "--ref-min-score", "-1500", "--ref-max-score", "-150"]
    refused = ("Pendulum-v1", "not a Gymnasium MuJoCo env")
    run_refused(tmp_path, "collect_dataset.py", [*pendulum, "--medium-target-return", "-500"], *refused)
    monkeypatch.setenv("MINARI_DATASETS_PATH", session_store)  # where the Hopper dataset is
    run_refused(
        tmp_path, "td3_bc_offline.py", ["--dataset-id", hopper_datasets["medium"], "--env-id", "Pendulum-v1"], *refused
    )


def test_a_dataset_holding_a_nan_is_refused_before_a_run_folder_exists(tmp_path):
    from collect_dataset import episode_buffer
    from robust_o2o.datasets import write_minari_dataset

    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 50))
    rewards[1, 7] = np.nan
    episodes = [
        episode_buffer(
            rng.normal(size=(51, 11)), rng.uniform(-1, 1, (50, 3)), r, np.zeros(50, bool), np.eye(50)[-1] > 0
        )
        for r in rewards
    ]
    write_minari_dataset("test/hopper/nan-reward-v0", episodes, "Hopper-v5", 0.0, 100.0, "one NaN reward", {})
    run_refused(tmp_path, "td3_bc_offline.py", ["--dataset-id", "test/hopper/nan-reward-v0"], "NaN", "rewards")


def test_an_evaluation_of_any_size_steps_at_most_a_bounded_number_of_envs():
    """10,000 episodes once meant 10,000 envs built up front (about 1 MB each): now they play in chunks, with the same
    returns as one lockstep batch (a constant policy, so no batch can change an action by rounding)."""
    from robust_o2o import evaluation

    def constant_policy(x):
        return torch.full((len(x), 3), 0.3)

    def scale(actions, deltas, low, high, model):
        return np.clip(actions * (1 + deltas), low, high)

    perturb = Perturbation(target="action", models=("multiplicative",), apply=scale)

    conditions = {"normal": np.zeros((1, 3)), "random": np.linspace(-0.1, 0.1, 12).reshape(4, 3)}
    evaluator = evaluation.ConditionEvaluator(
        "Hopper-v5",
        20,
        conditions,
        episodes=200,
        eval_seed=0,
        perturbation_model="multiplicative",
        perturbation=perturb,
    )
    assert len(evaluator.envs) == evaluation.MAX_LOCKSTEP_ENVS < 2 * 200
    chunked = evaluator(constant_policy, torch.zeros(11), torch.ones(11))
    deltas, seeds = evaluator.deltas, evaluator.seeds
    envs = [gymnasium.make("Hopper-v5", max_episode_steps=20) for _ in range(len(seeds))]
    whole, _ = evaluation.rollout_batch(
        envs, constant_policy, torch.zeros(11), torch.ones(11), deltas, seeds, "", perturb
    )
    assert np.array_equal(np.concatenate([chunked["normal"], chunked["random"]]), whole)
    assert len(set(np.round(whole, 6))) > 10  # the episodes differ (seeds and δ), so a mixed-up order would show


# Duplicates are not seeds: a file reached by two names counts once, and a copied run stops the matrix naming both
def test_a_link_loop_or_a_linked_checkpoint_counts_once(hopper_checkpoint, hopper_perturbations, tmp_path):
    run = offline_run(tmp_path / "runs" / "a", hopper_checkpoint, hopper_perturbations).parent
    os.symlink("..", run / "loop")  # runs/a/loop -> runs/: walking it would find runs/a/checkpoint.pt again and again
    os.symlink(run / "checkpoint.pt", tmp_path / "linked.pt")
    offline_run(tmp_path / "runs" / "a.replaced-20261130-120000-7", hopper_checkpoint)  # --overwrite's old run
    found = formats.find_checkpoints([str(tmp_path / "runs"), str(tmp_path / "linked.pt"), str(run / "*.pt")])
    assert len(found) == 1 and os.path.realpath(found[0]) == os.path.realpath(run / "checkpoint.pt")


def test_a_copied_run_is_refused_not_counted_as_another_seed(hopper_checkpoint, hopper_perturbations, tmp_path):
    import evaluate_matrix

    offline_run(tmp_path / "runs" / "a", hopper_checkpoint, hopper_perturbations)
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "a copy")
    args = evaluate_matrix.Args(checkpoints=(str(tmp_path / "runs"),), output_dir=str(tmp_path / "out"))
    with pytest.raises(cli.UserError, match="are both offline-only, seed 1") as refused:
        evaluate_matrix.load_policies(args)
    assert "runs/a/checkpoint.pt" in str(refused.value) and "runs/a copy/checkpoint.pt" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_attack_setting_is_one_true_line_and_writes_nothing(
    hopper_checkpoint, hopper_perturbations, tmp_path
):
    """The fresh attack repeats the settings recorded in the policy's perturbations file; one that de_perturbations.py
    cannot parse once surfaced as tyro's box border. Now: its message, in one line, and no folder made."""
    d = dict(np.load(hopper_perturbations, allow_pickle=False))
    d["strategy"] = np.asarray("sideways")
    d["checkpoint_sha256"] = np.asarray("0" * 64)  # found against another policy: the attack runs, not reused
    run = offline_run(tmp_path / "run", hopper_checkpoint).parent
    save_npz(str(run / "perturbations.npz"), d)
    before = tree(tmp_path)
    proc = run_script("evaluate_matrix.py", "--checkpoints", str(run), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(proc, "fresh DE attack", "invalid choice 'sideways' for argument '--strategy'")
    assert not set("│╭╮╰╯") & set(proc.stderr) and tree(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="libOSMesa is installed here")
def test_mujoco_gl_osmesa_without_its_library_is_one_line(hopper_checkpoint, hopper_perturbations, tmp_path):
    """A common headless setting on a machine without libOSMesa: `import mujoco` raises AttributeError, and the
    checkpoint loader builds the env, so every stage met it. One line, naming MUJOCO_GL, and nothing written."""
    before = tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "td3_adv_finetune.py"), "--checkpoint", hopper_checkpoint, "--perturbations"]
        + [hopper_perturbations, "--total-steps", "10", "--run-name", "x", "--no-cuda"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}, "MUJOCO_GL": "osmesa"},  # as a user
        # sets it: PyOpenGL's platform follows MUJOCO_GL (an earlier import of mujoco here set it to egl)
        timeout=300,
    )
    assert_one_line_error(proc, "MUJOCO_GL=osmesa", "MUJOCO_GL=egl")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "key, value", [("maxiter", np.asarray("ten")), ("mutation", np.asarray(0.7)), ("popsize", np.asarray("4x"))]
)
def test_a_de_setting_of_the_wrong_kind_is_one_line(key, value, hopper_checkpoint, hopper_perturbations, tmp_path):
    """A perturbations file whose DE setting is of the wrong kind (the fresh attack repeats it): one line naming the
    file, before any attack runs or anything is written."""
    d = dict(np.load(hopper_perturbations, allow_pickle=False))
    d[key] = value
    run = offline_run(tmp_path / "run", hopper_checkpoint).parent
    save_npz(str(run / "perturbations.npz"), d)
    run_refused(tmp_path, "evaluate_matrix.py", ["--checkpoints", str(run), "--output-dir", str(tmp_path / "out")],
                "perturbations.npz records a malformed DE setting", "de_perturbations.py")  # fmt: skip


def test_an_offline_dataset_of_another_width_is_one_line(hopper_checkpoint, hopper_perturbations, tmp_path):
    """Fine-tuning reads the checkpoint's dataset by id: another env's data under that id (observations of another
    width) is refused in one line before any run folder is made."""
    import collect_dataset as cd

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # a tiny Walker2d-v5 dataset: 17-wide observations where the Hopper policy sees 11
        args = dict(levels=("random",), num_transitions=200, ref_episodes=1, ref_max_score=100.0, max_episode_steps=50)
        cd.main(cd.Args(env_id="Walker2d-v5", namespace="test", overwrite=True, cuda=False, **args))
    finally:
        os.chdir(cwd)
    ckpt = torch.load(hopper_checkpoint, weights_only=True)
    ckpt["dataset_id"] = "test/walker2d/random-v0"
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    args = ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--perturbations", hopper_perturbations]
    run_refused(tmp_path, "td3_adv_finetune.py", [*args, "--total-steps", "10", "--run-name", "w", "--no-cuda"],
                "holds observations (17,) wide", "(11,)")  # fmt: skip


def test_an_npz_that_would_inflate_past_its_bound_is_refused_before_it_is_inflated(hopper_perturbations, tmp_path):
    """A perturbations file whose array deflates from a few MB to GiBs (a zip bomb) is refused from the zip's directory,
    before any decompression: one line, and the process never holds the inflated array."""
    import resource
    import zipfile

    from robust_o2o.files import NPZ_MAX_BYTES

    bomb = tmp_path / "perturbations.npz"
    shutil.copy(hopper_perturbations, bomb)
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (NPZ_MAX_BYTES // 8 + 1,)
    with (
        zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as z,
        z.open("history2.npy", "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_1_0(f, header)
        chunk = bytes(1 << 20)
        for _ in range(NPZ_MAX_BYTES // len(chunk) + 1):
            f.write(chunk)
    assert bomb.stat().st_size < 2 * 1024**2  # megabytes on disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(cli.UserError, match="would inflate to"):
        formats.load_perturbations(str(bomb))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing was inflated
