"""A real full disk (a size-limited tmpfs, where this machine lets the tests mount one): a save that fills it is one
line with the last good checkpoint kept, and a dataset that does not fit leaves the Minari store as it was. The
/dev/full and read-only cases, which need no mount, are in test_bad_inputs.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_script
from robust_o2o import cli


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path, unmounted afterwards; skips where mounting is not
    allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size: str):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip() or 'not permitted'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def leftovers(folder) -> list:
    """Temporary files a failed save could leave: atomic writes' *.tmp and dataset builds' .partial-* folders."""
    return [
        os.path.join(d, name)
        for d, dirs, files in os.walk(folder)
        for name in files + dirs
        if name.endswith(".tmp") or name.startswith(".partial-")
    ]


def test_a_save_that_fills_a_real_disk_is_one_line_and_keeps_the_last_good_checkpoint(hopper_datasets, small_disk):
    """A TD3+BC checkpoint with its optimizers is about 3.4 MB here: 5 MB holds the first save but not the second beside
    it (an atomic save writes the new file before it replaces the old). torch's zip writer once raised a RuntimeError
    there, a traceback."""
    disk = small_disk("5000k")
    args = ["--dataset-id", hopper_datasets["medium"], "--eval-freq", "20", "--eval-episodes", "1", "--no-cuda"]
    proc = run_script("td3_bc_offline.py", *args, "--total-steps", "40", "--run-name", "r", cwd=disk)
    assert_one_line_error(proc, "No space left on device", "--resume")
    checkpoint = disk / "runs" / "r" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 20  # the last good one, whole
    assert leftovers(disk) == []


def test_a_dataset_that_does_not_fit_is_refused_before_writing(hopper_datasets, small_disk, tmp_path):
    store = small_disk("300k")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(store)}
    args = ["--levels", "random", "--num-transitions", "5000", "--ref-episodes", "2"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "collect_dataset.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc, "MiB free", "MINARI_DATASETS_PATH")
    assert os.listdir(store) == []


def test_a_disk_that_fills_during_the_write_leaves_the_store_as_it_was(small_disk, monkeypatch):
    """The space estimate made to pass (another writer filling the disk meanwhile): h5py fails inside its own process,
    which dies; the store keeps the dataset it had (an --overwrite replaces it only once the new one is whole)."""
    import minari

    from collect_dataset import episode_buffer
    from robust_o2o import datasets

    store = small_disk("1500k")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    rng = np.random.default_rng(0)

    def episodes(n):
        done = np.r_[np.zeros(99, bool), True]
        obs, actions, rewards = rng.normal(size=(101, 11)), rng.normal(size=(100, 3)), rng.normal(size=100)
        return [episode_buffer(obs, actions, rewards, np.zeros(100, bool), done) for _ in range(n)]

    datasets.write_minari_dataset("t/hopper/x-v0", episodes(2), "Hopper-v5", 0.0, 1.0, "small", {})
    before = sorted(os.listdir(store / "t" / "hopper" / "x-v0" / "data"))
    monkeypatch.setattr(datasets, "dataset_bytes", lambda episodes: 0)
    with pytest.raises(cli.UserError, match="the store is as it was"):
        datasets.write_minari_dataset("t/hopper/x-v0", episodes(60), "Hopper-v5", 0.0, 1.0, "large", {}, overwrite=True)
    assert leftovers(store) == [] and sorted(os.listdir(store / "t" / "hopper" / "x-v0" / "data")) == before
    assert minari.load_dataset("t/hopper/x-v0").total_episodes == 2


def test_a_report_into_a_full_or_impossible_folder_is_one_line(small_disk, tmp_path):
    """study_report.py --out-dir on a full disk, and under a path that is a file: one error line naming the file,
    never a traceback."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_study import TWO_ARMS, fake_study

    res = fake_study(tmp_path / "study", TWO_ARMS)
    report = [sys.executable, str(ROOT / "study_report.py"), "--results-dir", str(res), "--reps", "50", "--out-dir"]
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run(report + [str(tmp_path / "a-file" / "out")], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "a-file", "--out-dir")
    disk = small_disk("64k")
    (disk / "filler").write_bytes(b"x" * (64 * 1024 - 4096))
    proc = subprocess.run(report + [str(disk / "out")], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "--out-dir")
    assert "No space left" in proc.stderr
