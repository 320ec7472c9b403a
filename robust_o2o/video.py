"""Videos (--capture-video): MuJoCo's off-screen renderer, captions, and imageio's writers (ffmpeg for MP4, Pillow
for GIF)."""

import dataclasses
import gc
import os
import sys
import warnings

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from robust_o2o.cli import UserError
from robust_o2o.evaluation import ConditionEvaluator, float64_policy
from robust_o2o.perturbation import Perturbation
from robust_o2o.runs import Run


def check_rendering(env_id: str, max_episode_steps: int | None = None):
    """Fail in one line, before anything is written, where off-screen rendering or the MP4 writer is missing. A
    headless machine renders through EGL (Mesa's on a CPU), so MUJOCO_GL defaults to egl."""
    backend = os.environ.setdefault("MUJOCO_GL", "egl")
    fix = "set MUJOCO_GL=egl (needs libEGL, e.g. Mesa's libegl1) or MUJOCO_GL=osmesa (needs libosmesa6)"
    fix += ", or drop --capture-video"
    if backend not in ("egl", "osmesa", "glfw"):
        raise UserError(
            f"--capture-video needs MuJoCo's off-screen renderer, but MUJOCO_GL={backend} names none; {fix}"
        )
    try:
        import imageio_ffmpeg  # imported here: its absence is what this checks

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:
        raise UserError(
            f"--capture-video writes MP4 through imageio-ffmpeg, which is missing ({type(e).__name__}); "
            f"pip install -r requirements.txt"
        ) from None
    # a renderer that fails half-built raises again from its destructor ("Exception ignored in ... __del__"), and GLFW
    # warns as it fails: noise beside the one line below, so both are dropped while the probe runs
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = gym.make(env_id, render_mode="rgb_array", width=32, height=32, max_episode_steps=max_episode_steps)
            env.reset(seed=0)
            env.render()
            env.close()
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--capture-video needs MuJoCo's off-screen renderer, which failed with MUJOCO_GL={backend} "
            f"({type(e).__name__}: {msg}); {fix}"
        ) from None
    finally:
        gc.collect()
        sys.unraisablehook = hook


@dataclasses.dataclass
class Episode:
    frames: np.ndarray  # [F, H, W, 3] uint8: the start state, then every frame_skip-th step and the last step
    running_return: np.ndarray  # [F]: the return so far at each frame
    ret: float
    steps: int
    fps: float


def record_episode(
    env_id: str,
    max_episode_steps: int | None,
    actor,
    obs_mean,
    obs_std,
    delta: np.ndarray,
    perturbation: Perturbation,
    perturbation_model: str,
    seed: int,
    size: int = 160,
    frame_skip: int = 4,
) -> Episode:
    """One deterministic episode of `actor` with δ held fixed under the script's perturbation, rendered off-screen.
    The policy's observation and the executed action are computed as
    the stage scripts' lockstep evaluator (`rollout_batch`) computes it (`float64_policy`, whose result does not depend
    on the batch), and rendering only reads the simulation, so the return equals the unrecorded evaluation's
    (tests/test_video.py checks it)."""
    env = gym.make(env_id, render_mode="rgb_array", width=size, height=size, max_episode_steps=max_episode_steps)
    low, high = env.action_space.low, env.action_space.high
    obs_low, obs_high = env.observation_space.low, env.observation_space.high
    obs, act = np.stack([env.reset(seed=int(seed))[0]]), float64_policy(actor, obs_mean, obs_std)
    frames, running, ret, steps, done = [env.render()], [0.0], 0.0, 0, False
    while not done:
        action = act(perturbation.seen(obs, delta[None], obs_low, obs_high, perturbation_model))
        obs[0], reward, terminated, truncated, _ = env.step(
            perturbation.executed(action, delta[None], low, high, perturbation_model)[0]
        )
        ret, steps, done = ret + reward, steps + 1, terminated or truncated
        if steps % frame_skip == 0 or done:
            frames.append(env.render())
            running.append(ret)
    fps = env.metadata.get("render_fps", 30) / frame_skip
    env.close()
    return Episode(np.stack(frames), np.array(running), float(ret), steps, fps)


def record_condition(evaluator: ConditionEvaluator, run: Run, step: int, actor, obs_mean, obs_std, condition: str):
    """The evaluator's first episode of `condition` (its δ_0, the first evaluation seed), rendered and captioned, into
    {run dir}/videos/eval_step{step}.mp4 and, with --track, to W&B."""
    delta, path = evaluator.conditions[condition][0], os.path.join(run.dir, "videos", f"eval_step{step:08d}.mp4")
    e = evaluator
    ep = record_episode(
        e.env_id,
        e.max_episode_steps,
        actor,
        obs_mean,
        obs_std,
        delta,
        e.perturbation,
        e.perturbation_model,
        e.eval_seed,
    )
    write_video(path, captioned(ep, f"step {step}, {condition}", delta), ep.fps)
    run.video(path, f"videos/eval_{condition}", step)


def captioned(ep: Episode, title: str, delta: np.ndarray) -> np.ndarray:
    """The episode's frames with the title, δ and the running return written on each."""
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), max(9, ep.frames.shape[1] // 16))  # has δ
    d = "δ = [" + ", ".join(f"{x:+.2f}" for x in np.asarray(delta).ravel()) + "]"

    def wrap(text):  # a title wider than the frame goes on two lines
        if font.getlength(text) <= ep.frames.shape[2] - 8 or " " not in text:
            return (text,)
        cut = max(
            (i for i, ch in enumerate(text) if ch == " " and font.getlength(text[:i]) <= ep.frames.shape[2] - 8),
            default=text.index(" "),
        )
        return text[:cut], text[cut + 1 :]

    out = []
    for frame, ret in zip(ep.frames, ep.running_return):
        img = Image.fromarray(frame)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate((*wrap(title), d, f"return {ret:.0f}")):
            draw.text(
                (4, 2 + i * (font.size + 2)),
                line,
                font=font,
                fill=(255, 255, 255),
                stroke_width=2,
                stroke_fill=(0, 0, 0),
            )
        out.append(np.asarray(img))
    return np.stack(out)


def side_by_side(panels: list) -> np.ndarray:
    """Panels [F_i, H, W, 3] in a row; a panel whose episode ended early holds its last frame."""
    n = max(len(p) for p in panels)
    return np.concatenate([np.concatenate([p, np.repeat(p[-1:], n - len(p), 0)]) for p in panels], axis=2)


def write_video(path: str, frames: np.ndarray, fps: float):
    """MP4 (H.264 through imageio-ffmpeg) or GIF (through Pillow; fps below 50), written atomically."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        if ext == ".gif":
            imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
        else:
            imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=6, macro_block_size=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
