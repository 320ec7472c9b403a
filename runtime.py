"""Run plumbing shared by the stage scripts: user errors, the safe checkpoint loader, atomic saves, resume state,
RNG and env capture, the fast-path helpers (fused Adam, torch.compile, CUDA graphs) and the video helpers of
--capture-video. None of the algorithm lives here: each stage script holds its own networks, losses and loop, readable
top to bottom."""
import dataclasses
import os
import random
from typing import Optional

import gymnasium as gym
import numpy as np
import torch


CHECKPOINT_FORMAT = "o2o-adv-checkpoint"
CHECKPOINT_VERSION = 1


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one line and exit non-zero."""


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint of this project without running any code (torch.load(weights_only=True)) and check its format."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found; train one with `python td3_bc_offline.py` (or run "
                        f"`bash run_pipeline.sh`), or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable or not a plain-tensor checkpoint ({type(e).__name__}); "
                        f"re-create it with `python td3_bc_offline.py`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (format '{CHECKPOINT_FORMAT}' expected)")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt['format_version']} > {CHECKPOINT_VERSION}; update this code")
    return ckpt


def save_checkpoint(path: str, ckpt: dict):
    """Atomic: write a temporary file next to `path`, fsync, then rename over it."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Fast path
def adam(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): one kernel for all parameters instead of a loop of small ops."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"), capturable=capturable)


def set_adam_flags(opt: torch.optim.Adam, device: torch.device, capturable: bool):
    """load_state_dict restores the saved group flags and step placement; set this run's instead."""
    fused = device.type in ("cpu", "cuda")
    for g in opt.param_groups:
        g.update(fused=fused, foreach=None, capturable=capturable)
    for st in opt.state.values():
        if "step" in st:  # fused and capturable Adam keep the step count on the parameters' device
            st["step"] = st["step"].to(device if fused or capturable else "cpu", torch.float32)


class CudaGraph:
    """Run `fn` eagerly (on a side stream) for its first `warmup` calls, which are real updates, then capture it in a
    CUDA graph and replay it: inputs are copied into static tensors; outputs are static tensors, overwritten by the
    next call. `fn` must have static shapes and no host syncs (LeanRL's recipe, without the dependency)."""

    def __init__(self, fn, warmup: int = 2):
        self.fn, self.warmup, self.calls, self.graph = fn, warmup, 0, None

    def __call__(self, *inputs):
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:  # capture records the kernels without running them; the replay below runs them
            self.static_inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self.fn(*self.static_inputs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.static_outputs


def check_fast_path_args(args):
    if args.compile and args.cudagraphs:
        raise UserError("--compile with --cudagraphs is not supported: inductor compiles again inside the CUDA-graph "
                        "capture and fails there (seen on an H200); use --cudagraphs alone on CUDA")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise UserError("--cudagraphs needs a CUDA device; drop the flag on this machine (use --compile instead)")
    torch.set_float32_matmul_precision(args.matmul_precision)


def accelerate(fn, args):
    """The fast-path flags applied to one half of the update."""
    if args.compile:
        import torch._inductor.config
        torch._inductor.config.fallback_random = True  # the same random draws as eager for the same seed
        fn = torch.compile(fn)
    if args.cudagraphs:
        fn = CudaGraph(fn)
    return fn


# Resuming
def rng_state() -> dict:
    """Python, NumPy and torch generator states as plain types and tensors (they load with weights_only=True)."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RESUME_MAY_CHANGE = ("resume", "overwrite", "total_steps", "track", "wandb_project_name", "wandb_entity", "capture_video")


def resume_point(path: str, args, stage: str) -> dict:
    """The saved state to continue from; refuses a different stage or different arguments (bar RESUME_MAY_CHANGE)."""
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable or not a plain-tensor state ({type(e).__name__}); start the run without --resume")
    if not isinstance(state, dict) or state.get("stage") != stage or "rng" not in state:
        raise UserError(f"{path} is not a resumable {stage} state; start the run without --resume")
    saved, now = state["args"], dataclasses.asdict(args)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume needs the run's own arguments, but --{k.replace('_', '-')} was {saved.get(k)!r} and is now "
                        f"{now[k]!r}; pass the original value or start a new run")
    if state["step"] > args.total_steps:
        raise UserError(f"{path} is at step {state['step']} > --total-steps {args.total_steps}; pass a larger --total-steps")
    return state


def open_metrics(path: str, resumed: Optional[dict]):
    """metrics.jsonl for appending: fresh, or cut back to the length it had at the resumed save (no duplicate rows)."""
    if resumed is None:
        return open(path, "w")
    with open(path, "r+") as f:
        f.truncate(resumed["metrics_bytes"])
    return open(path, "a")


def env_state(env: gym.Env) -> dict:
    """What continuing the current episode exactly needs: MuJoCo's integration state, the time-limit counter, the env's
    and the action space's RNGs, and a perturbation wrapper's RNG and δ (plain types and tensors)."""
    import mujoco
    u, spec = env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, physics, spec)
    state = {"mujoco": torch.from_numpy(physics), "elapsed_steps": time_limit(env)._elapsed_steps,
             "env_rng": u.np_random.bit_generator.state, "action_space_rng": env.action_space.np_random.bit_generator.state}
    if hasattr(env, "delta"):  # ActionPerturbation
        state.update(wrapper_rng=env.rng.bit_generator.state, delta=torch.from_numpy(env.delta.copy()))
    return state


def set_env_state(env: gym.Env, state: dict):
    import mujoco
    u = env.unwrapped
    mujoco.mj_setState(u.model, u.data, state["mujoco"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    time_limit(env)._elapsed_steps = state["elapsed_steps"]
    u.np_random.bit_generator.state = state["env_rng"]
    env.action_space.np_random.bit_generator.state = state["action_space_rng"]
    if "delta" in state:
        env.rng.bit_generator.state = state["wrapper_rng"]
        env.delta = state["delta"].numpy().copy()


def time_limit(env: gym.Env) -> gym.wrappers.TimeLimit:
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


# Videos (--capture-video): MuJoCo's off-screen renderer, captions, and imageio's writers (ffmpeg for MP4, Pillow for GIF)
def check_rendering(env_id: str, max_episode_steps: Optional[int] = None):
    """Fail in one line, before anything is written, where off-screen rendering or the MP4 writer is missing. A
    headless machine renders through EGL (Mesa's on a CPU), so MUJOCO_GL defaults to egl."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:
        raise UserError(f"--capture-video writes MP4 through imageio-ffmpeg, which is missing ({type(e).__name__}); "
                        f"pip install -r requirements.txt")
    try:
        env = gym.make(env_id, render_mode="rgb_array", width=32, height=32, max_episode_steps=max_episode_steps)
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"--capture-video needs MuJoCo's off-screen renderer, which failed with MUJOCO_GL="
                        f"{os.environ['MUJOCO_GL']} ({type(e).__name__}: {msg}); set MUJOCO_GL=egl (needs libEGL, e.g. "
                        f"Mesa's libegl1) or MUJOCO_GL=osmesa (needs libosmesa6), or drop --capture-video")


@dataclasses.dataclass
class Episode:
    frames: np.ndarray  # [F, H, W, 3] uint8: the start state, then every frame_skip-th step and the last step
    running_return: np.ndarray  # [F]: the return so far at each frame
    ret: float
    steps: int
    fps: float


def record_episode(env_id: str, max_episode_steps: Optional[int], actor, obs_mean, obs_std, delta: np.ndarray, perturb,
                   model: str, seed: int, size: int = 160, frame_skip: int = 4) -> Episode:
    """One deterministic episode of `actor` with δ held fixed, rendered off-screen. The executed action is computed as
    the stage scripts' lockstep evaluator (`rollout_batch`) computes it for a batch of one, and rendering only reads
    the simulation, so the return equals the unrecorded evaluation's (tests/test_video.py checks it)."""
    env = gym.make(env_id, render_mode="rgb_array", width=size, height=size, max_episode_steps=max_episode_steps)
    low, high = env.action_space.low, env.action_space.high
    obs = np.stack([env.reset(seed=int(seed))[0]])
    frames, running, ret, steps, done = [env.render()], [0.0], 0.0, 0, False
    while not done:
        with torch.no_grad():
            action = actor((torch.as_tensor(obs, dtype=torch.float32) - obs_mean) / obs_std).numpy()
        obs[0], reward, terminated, truncated, _ = env.step(perturb(action, delta[None], low, high, model)[0])
        ret, steps, done = ret + reward, steps + 1, terminated or truncated
        if steps % frame_skip == 0 or done:
            frames.append(env.render())
            running.append(ret)
    fps = env.metadata.get("render_fps", 30) / frame_skip
    env.close()
    return Episode(np.stack(frames), np.array(running), float(ret), steps, fps)


def captioned(ep: Episode, title: str, delta: np.ndarray) -> np.ndarray:
    """The episode's frames with the title, δ and the running return written on each."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), max(9, ep.frames.shape[1] // 16))  # has δ
    d = "δ = [" + ", ".join(f"{x:+.2f}" for x in np.asarray(delta).ravel()) + "]"

    def wrap(text):  # a title wider than the frame goes on two lines
        if font.getlength(text) <= ep.frames.shape[2] - 8 or " " not in text:
            return (text,)
        cut = max((i for i, ch in enumerate(text) if ch == " " and font.getlength(text[:i]) <= ep.frames.shape[2] - 8), default=text.index(" "))
        return text[:cut], text[cut + 1:]

    out = []
    for frame, ret in zip(ep.frames, ep.running_return):
        img = Image.fromarray(frame)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate((*wrap(title), d, f"return {ret:.0f}")):
            draw.text((4, 2 + i * (font.size + 2)), line, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        out.append(np.asarray(img))
    return np.stack(out)


def side_by_side(panels: list) -> np.ndarray:
    """Panels [F_i, H, W, 3] in a row; a panel whose episode ended early holds its last frame."""
    n = max(len(p) for p in panels)
    return np.concatenate([np.concatenate([p, np.repeat(p[-1:], n - len(p), 0)]) for p in panels], axis=2)


def write_video(path: str, frames: np.ndarray, fps: float):
    """MP4 (H.264 through imageio-ffmpeg) or GIF (through Pillow; fps below 50), written atomically."""
    import imageio.v2 as imageio
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
