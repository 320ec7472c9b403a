"""Shared fixtures: a private Minari store for the whole session and small datasets made in it."""

import contextlib
import importlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# every test (and every subprocess it starts) writes datasets into a throwaway store, never ~/.minari
os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="minari-test-")
os.environ.setdefault("WANDB_MODE", "offline")
# under pytest-xdist (`-n logical`: one worker per core) each worker, and every process it starts, gets its share of the
# cores: two workers with two torch threads each on two cores thrash
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# shifts the seeds of the session's trained fixtures (the datasets' behaviour policy, so the TD3+BC policy trained on
# them, and the DE set): `O2O_FIXTURE_SEED=1 pytest tests` gives other fixture policies, as another CPU's float
# rounding would; no test may depend on where their floats land
FIXTURE_SEED = int(os.environ.get("O2O_FIXTURE_SEED", "0"))


# the two tiny studies (a minute or more each, alone) start first: under xdist a worker takes them while the other
# works through the rest, instead of one of them ending the run alone
LONGEST_FIRST = (
    "test_whole_pipeline_runs_at_tiny_scale",
    "test_tiny_study_on_ray_survives_a_killed_driver_and_isolates_a_failing_stage",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.originalname not in LONGEST_FIRST)  # stable: the rest keep their order


def run_script(script: str, *args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stage script's CLI in a subprocess; returns the completed process (never raises on exit code)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def run_cli(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """A stage script's command line run in this process, as `python script` runs it (its `cli(main, Args)`), for the
    checks where a subprocess adds only its start-up time: the exit code and what was printed, as run_script gives them.
    An unexpected exception propagates (the test fails with its traceback, as the subprocess would print one)."""
    from robust_o2o.cli import cli

    module = importlib.import_module(Path(script).stem)
    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    code = 0
    try:
        sys.argv = [script, *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli(module.main, module.Args)
    except SystemExit as e:  # sys.exit("error: ...") prints its message to stderr and exits 1, as Python does
        code = 1 if isinstance(e.code, str) else e.code or 0
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str):
    """A user error: non-zero exit, no traceback, one line on stderr naming the problem and the fix."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def offline_run(folder: Path, checkpoint: str, perturbations=None) -> Path:
    """A run folder holding a copy of an offline checkpoint (and its perturbations.npz), as TD3+BC and DE leave one."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, folder / "checkpoint.pt")
    if perturbations:
        shutil.copy(perturbations, folder / "perturbations.npz")
    return folder / "checkpoint.pt"


def assert_usage_error(proc: subprocess.CompletedProcess, flag: str):
    """A value tyro rejects (a choice not offered, a non-number): its own message, naming the flag, and exit 2."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and flag in proc.stderr and "invalid choice" in proc.stderr.lower(), (
        proc.stderr
    )


@pytest.fixture(scope="session")
def hopper_datasets(tmp_path_factory):
    """All four levels for Hopper-v5 at a tiny scale (100-step episodes), made once per session."""
    import collect_dataset as cd

    args = cd.Args(
        env_id="Hopper-v5",
        namespace="test",
        num_transitions=1500,
        max_train_steps=1500,
        learning_starts=500,
        eval_freq=500,
        eval_episodes=2,
        ref_episodes=5,
        max_episode_steps=100,
        medium_target_return=60.0,
        expert_target_return=1e9,
        overwrite=True,
        cuda=False,
        seed=3 + FIXTURE_SEED,
    )
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("collect"))  # its resume state (runs/collect_dataset__*) stays out of the repo
    try:
        cd.main(args)
    finally:
        os.chdir(cwd)
    return {lv: cd.dataset_id_for("test", "Hopper-v5", lv, 0) for lv in cd.LEVELS}


@pytest.fixture(scope="session")
def hopper_checkpoint(hopper_datasets, tmp_path_factory):
    """A TD3+BC checkpoint (300 updates on the tiny Hopper medium data, 100-step episodes)."""
    import td3_bc_offline as tb

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ckpt"))
    try:
        tb.main(
            tb.Args(
                dataset_id=hopper_datasets["medium"],
                total_steps=300,
                eval_freq=300,
                eval_episodes=1,
                cuda=False,
                run_name="hopper",
                seed=1,  # tests name this seed; the dataset's seed varies the policy
            )
        )
        return str(Path("runs/hopper/checkpoint.pt").resolve())
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def hopper_perturbations(hopper_checkpoint):
    """A tiny DE perturbation set (K=2, ε=0.4) against hopper_checkpoint, next to it as perturbations.npz."""
    import de_perturbations as de

    de.main(
        de.Args(
            checkpoint=hopper_checkpoint,
            epsilon=0.4,
            num_perturbations=2,
            popsize=4,
            maxiter=2,
            de_episodes=2,
            eval_episodes=2,
            random_draws=3,
            num_workers=1,
            de_seed=20_000 + FIXTURE_SEED,
        )
    )
    return str(Path(hopper_checkpoint).parent / "perturbations.npz")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (once this returns)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 (token authentication on, as Ray 2.60's default, with a token of the test's own in
    RAY_AUTH_TOKEN rather than in ~/.ray), as a Ray user's workstation or a cluster's head node runs one; stopped
    afterwards by its process group (never `ray stop`, which stops every Ray on the machine). Its files, the
    `ray_current_cluster` address file included, go to a temporary folder of its own, removed afterwards: in Ray's
    default /tmp/ray that file would outlive the killed head and send a later address-less `ray.init()` on this
    machine to a dead cluster. -> (address, token)"""
    port = free_port()
    token = secrets.token_hex(16)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")  # short: Ray's socket paths must fit in 107 characters
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1"]
        + ["--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not start")
        yield f"127.0.0.1:{port}", token
    finally:  # the whole group at once: `ray start --block` would drain for 30 s on SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
