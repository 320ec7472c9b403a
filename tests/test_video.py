"""--capture-video: recorded episodes return exactly what unrecorded ones do, the files decode with the right frame
counts, the side-by-side GIF has one panel per policy, and a missing GL backend ends in one line with nothing
written."""

import os
import subprocess
import sys

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest

import de_perturbations as de
import evaluate_matrix as em
import td3_adv_finetune as ft
from conftest import ROOT, assert_one_line_error, offline_run
from robust_o2o.video import record_episode

os.environ.setdefault("MUJOCO_GL", "egl")


def expected_frames(steps: int, skip: int) -> int:
    """The start state, every skip-th step, and the last step."""
    return 1 + steps // skip + (steps % skip != 0)


@pytest.mark.parametrize("delta", [np.zeros(3), np.array([0.4, -0.4, 0.2])])
def test_recorded_episode_returns_exactly_the_unrecorded_evaluation(hopper_checkpoint, delta):
    ckpt = de.load_checkpoint(hopper_checkpoint)
    actor = de.actor_from_checkpoint(ckpt)
    ep = record_episode(
        ckpt["env_id"],
        ckpt["max_episode_steps"],
        actor,
        ckpt["obs_mean"],
        ckpt["obs_std"],
        delta,
        de.PERTURBATION,
        "multiplicative",
        10_000,
        size=48,
        frame_skip=3,
    )
    env = gym.make(ckpt["env_id"], max_episode_steps=ckpt["max_episode_steps"])
    returns, steps = de.rollout_batch(
        [env], actor, ckpt["obs_mean"], ckpt["obs_std"], delta[None], [10_000], "multiplicative", de.PERTURBATION
    )
    assert ep.ret == returns[0] and ep.steps == steps  # bit for bit: rendering only reads the simulation
    assert ep.frames.shape == (expected_frames(steps, 3), 48, 48, 3) and ep.frames.dtype == np.uint8
    assert ep.running_return[-1] == ep.ret and ep.frames.std() > 0


@pytest.fixture(scope="module")
def video_runs(hopper_checkpoint, hopper_perturbations, tmp_path_factory):
    """An offline-only policy and a fine-tune of it recorded with --capture-video (evaluations at steps 0, 30, 60)."""
    root = tmp_path_factory.mktemp("video")
    off = offline_run(root / "runs" / "off1", hopper_checkpoint, hopper_perturbations).parent
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ft.main(
            ft.Args(
                checkpoint=str(off / "checkpoint.pt"),
                total_steps=60,
                eval_freq=30,
                eval_episodes=1,
                batch_size=16,
                cuda=False,
                run_name="ft1",
                curriculum="linear",
                capture_video=True,
            )
        )
    finally:
        os.chdir(cwd)
    return root


def test_finetune_records_one_playable_video_per_evaluation(video_runs):
    files = sorted(os.listdir(video_runs / "runs" / "ft1" / "videos"))
    assert files == [f"eval_step{s:08d}.mp4" for s in (0, 30, 60)]
    frames = iio.imread(video_runs / "runs" / "ft1" / "videos" / files[-1])
    # the last one is the step-60 policy (the checkpoint's) on the adversarial condition's first episode: δ_0, seed
    # eval_seed; its frame count follows from that episode's length
    ckpt = de.load_checkpoint(str(video_runs / "runs" / "ft1" / "checkpoint.pt"))
    delta = np.load(ckpt["perturbations_path"])["perturbations"][0]
    policy = (de.actor_from_checkpoint(ckpt), ckpt["obs_mean"], ckpt["obs_std"])
    ep = record_episode(
        ckpt["env_id"], ckpt["max_episode_steps"], *policy, delta, de.PERTURBATION, "multiplicative", 10_000
    )
    assert frames.shape == (expected_frames(ep.steps, 4), 160, 160, 3)


def test_evaluate_matrix_records_each_condition_and_a_side_by_side_gif(video_runs):
    out = video_runs / "results"
    em.main(
        em.Args(
            checkpoints=(str(video_runs / "runs"),),
            output_dir=str(out),
            eval_episodes=2,
            num_workers=1,
            capture_video=True,
            video_size=64,
            video_frame_skip=5,
        )
    )
    videos = out / "videos"
    names = sorted(os.listdir(videos))
    per_policy = [n for n in names if "__" in n]
    assert len(per_policy) == 2 * 3 and {n.split("__")[1] for n in per_policy} == {
        "normal.mp4",
        "random.mp4",
        "adversarial.mp4",
    }
    assert {"side_by_side.mp4", "side_by_side.gif"} <= set(names) and not [n for n in names if ".tmp" in n]
    # the normal episode of the offline policy decodes to exactly the frames the recorder produced
    ckpt = de.load_checkpoint(str(video_runs / "runs" / "off1" / "checkpoint.pt"))
    ep = record_episode(
        ckpt["env_id"],
        ckpt["max_episode_steps"],
        de.actor_from_checkpoint(ckpt),
        ckpt["obs_mean"],
        ckpt["obs_std"],
        np.zeros(3),
        de.PERTURBATION,
        "multiplicative",
        10_000,
        size=64,
        frame_skip=5,
    )
    mp4 = iio.imread(videos / "offline-only_s1__normal.mp4")
    assert mp4.shape == (expected_frames(ep.steps, 5), 64, 64, 3)
    gif = iio.imread(videos / "side_by_side.gif")
    assert gif.shape[1:3] == (64, 2 * 64)  # one 64-pixel panel per policy
    panels = gif[0][..., :3].reshape(64, 2, 64, 3)
    assert all(panels[:, i].std() > 0 for i in range(2))
    assert os.path.getsize(videos / "side_by_side.gif") < 5e6


@pytest.mark.parametrize("backend", ["no-such-backend", ""])
@pytest.mark.parametrize("script", ["evaluate_matrix.py", "td3_adv_finetune.py"])
def test_no_gl_backend_is_one_line_and_writes_nothing(
    script, backend, hopper_checkpoint, hopper_perturbations, tmp_path
):
    args = (
        ["--checkpoints", hopper_checkpoint, "--output-dir", str(tmp_path / "out")]
        if script == "evaluate_matrix.py"
        else ["--checkpoint", hopper_checkpoint, "--total-steps", "20", "--eval-freq", "10", "--run-name", "x"]
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args, "--capture-video"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MUJOCO_GL": backend},
    )
    assert_one_line_error(proc, f"MUJOCO_GL={backend} ", "MUJOCO_GL=egl")
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []
