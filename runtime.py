"""Run plumbing shared by the stage scripts: the entry point (user errors as one line), the safe checkpoint loader,
atomic saves, argument ranges, the run folder (args.json, metrics, W&B, the lock), resume state (RNGs, env, a replay
ring that saves itself), the non-finite-loss sentinel, the fast-path helpers (fused Adam, torch.compile, CUDA graphs),
Minari datasets (written, and read as flat transitions), the one score scale, the lockstep evaluator under the
perturbation conditions, and the video and plot helpers. None of the algorithm lives here: each stage script holds
its own networks, perturbation model, losses and loop, readable top to bottom."""
import contextlib
import dataclasses
import json
import os
import random
from typing import Optional

import gymnasium as gym
import numpy as np
import torch


CHECKPOINT_FORMAT = "o2o-adv-checkpoint"
CHECKPOINT_VERSION = 1
PERTURBATION_FORMAT = "o2o-adv-perturbations"
PERTURBATION_MODELS = ("multiplicative", "additive")
# what DE and fine-tuning attack and fine-tune with no --checkpoint: the full-scale run's, then run_pipeline.sh's
DEFAULT_CHECKPOINTS = ("runs/local-hopper-medium-v0__td3_bc_offline__1/checkpoint.pt",
                       "runs/local-quick-hopper-medium-v0__td3_bc_offline__1/checkpoint.pt")


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
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {path} is malformed: {problem}; re-create it with the stage that wrote it")
    return ckpt


def checkpoint_problem(ckpt: dict) -> Optional[str]:
    """The first way `ckpt` breaks the schema every stage relies on (docs/file_contracts.md), or None: the keys and types
    that acting needs, and every tensor's shape against the checkpoint's own obs, action and hidden sizes."""
    for key, kind in (("env_id", str), ("obs_dim", int), ("act_dim", int), ("hidden_dim", int), ("action_low", torch.Tensor),
                      ("action_high", torch.Tensor), ("obs_mean", torch.Tensor), ("obs_std", torch.Tensor), ("actor", dict)):
        if not isinstance(ckpt.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    no, na, h = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]
    if min(no, na, h) < 1:
        return f"obs_dim, act_dim and hidden_dim must be >= 1 (got {no}, {na}, {h})"
    shapes = {"action_low": (na,), "action_high": (na,), "obs_mean": (no,), "obs_std": (no,),
              "actor/net.0.weight": (h, no), "actor/net.0.bias": (h,), "actor/net.2.weight": (h, h), "actor/net.2.bias": (h,),
              "actor/net.4.weight": (na, h), "actor/net.4.bias": (na,)}
    for net in ("critic", "critic_target"):
        if net in ckpt:
            shapes.update({f"{net}/net.0.weight": (2, no + na, h), f"{net}/net.2.weight": (2, h, h), f"{net}/net.4.weight": (2, h, 1)})
    for name, shape in shapes.items():
        parent, _, key = name.rpartition("/")
        holder = ckpt.get(parent) if parent else ckpt
        t = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            return f"'{name}' has shape {tuple(t.shape) if isinstance(t, torch.Tensor) else None}, expected {shape}"
    if not (torch.isfinite(ckpt["obs_mean"]).all() and torch.isfinite(ckpt["obs_std"]).all() and (ckpt["obs_std"] > 0).all()):
        return "obs_mean/obs_std hold NaN, inf or a non-positive std"
    if not (ckpt["action_low"] < ckpt["action_high"]).all():
        return "action_low must be below action_high"
    lo, hi = ckpt.get("ref_min_score"), ckpt.get("ref_max_score")
    if lo is not None and hi is not None and not lo < hi:
        return f"its reference scores cannot normalize a return (ref_min_score {lo} is not below ref_max_score {hi})"
    return None


def io_failure(e: OSError) -> str:
    """One line for a failed read or write: what failed, that what was saved before is intact, and how to go on."""
    return (f"{e.strerror or type(e).__name__} on {e.filename or 'a file'}: stopped; whatever was saved before is intact "
            f"(checkpoints and state are written atomically), so free disk space or fix the folder's permissions, then "
            f"rerun with --resume")


def _atomic(path: str, write):
    """write(file) into a temporary file beside `path` (unique to this process), fsync, then rename over `path`. A failure
    (a full disk, a read-only folder) leaves `path` as it was and ends in one line (UserError)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = e.filename or tmp
        raise UserError(f"could not write {path}: {io_failure(e)}") from None
    finally:
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
        except OSError:
            pass


def save_checkpoint(path: str, ckpt: dict):
    """Atomic: a temporary file next to `path`, fsync, then rename over it."""
    _atomic(path, lambda f: torch.save(ckpt, f))


class Range:
    """A field's valid values, declared next to it: `x: Annotated[float, Range(0, 1)] = 0.5`. Bounds are inclusive unless
    `open` names them ("lo", "hi"); every number must also be finite; a tuple is checked element by element."""

    def __init__(self, lo=None, hi=None, open: str = ""):
        self.lo, self.hi, self.open = lo, hi, open

    def ok(self, x) -> bool:
        import math
        if isinstance(x, (tuple, list)):
            return all(self.ok(v) for v in x)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        lo_ok = self.lo is None or (x > self.lo if "lo" in self.open else x >= self.lo)
        hi_ok = self.hi is None or (x < self.hi if "hi" in self.open else x <= self.hi)
        return lo_ok and hi_ok

    def __str__(self):
        if self.lo is None and self.hi is None:
            return "a finite number"
        if self.hi is None:
            return f"{'>' if 'lo' in self.open else '>='} {self.lo}"
        return f"in {'(' if 'lo' in self.open else '['}{self.lo}, {self.hi}{')' if 'hi' in self.open else ']'}"


def check_ranges(args):
    """Every field with a declared Range holds a value inside it (None, where allowed, means unset), before anything runs."""
    import typing
    hints = typing.get_type_hints(type(args), include_extras=True)
    for f in dataclasses.fields(args):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            value = getattr(args, f.name)
            if isinstance(meta, Range) and value is not None and not meta.ok(value):
                flag = f"--{f.name.replace('_', '-')}"
                if not Range().ok(value):
                    raise UserError(f"{flag} must be a finite number (got {value})")
                raise UserError(f"{flag} must be {meta} (got {value})")


@contextlib.contextmanager
def reading_dataset(dataset_id: str):
    """Every read of a Minari dataset (its files are read lazily, episode by episode) ends, if the files are damaged, in
    one line that names the dataset and the fix, instead of an h5py traceback."""
    try:
        yield
    except (OSError, KeyError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"dataset '{dataset_id}' is damaged or unreadable ({type(e).__name__}: {msg}); re-create it with "
                        f"`python collect_dataset.py ... --overwrite` (or, for an official id, `minari download {dataset_id}`)") from None


def check_name(value: Optional[str], flag: str, store: str):
    """A name that becomes a path inside `store` (a run name under runs/, a Minari namespace) must stay inside it."""
    if value is None:
        return
    parts = value.replace("\\", "/").split("/")
    if not value or os.path.isabs(value) or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{flag} '{value}' would leave {store}: use plain names (letters, digits, '-', '_'), "
                        f"without '..', empty parts or a leading '/'")


_LOCKED = {}  # run folder -> its open, locked .lock file (held for the life of this process)


def lock_run_dir(run_dir: str):
    """Create `run_dir` and own it while this process lives: an OS lock (flock) on run_dir/.lock, which the kernel
    releases when the process dies, kill -9 included, so no stale lock survives. Another process asking for the same
    folder is refused in one line. Re-entrant within one process."""
    import fcntl
    key = os.path.realpath(run_dir)
    if key in _LOCKED:
        return
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise UserError(f"{run_dir} is in use by another running process (pid {owner}); wait for it to end, or pass "
                        f"another --run-name")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKED[key] = f


def write_text(path: str, text: str):
    """Atomic text write (tables, CSV)."""
    _atomic(path, lambda f: f.write(text.encode()))


def check_resume_args(saved: dict, now: dict, may_change=()):
    """--resume continues a run only with its own arguments (bar `may_change`); tuples compare as the lists JSON made."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    changed = [k for k in now if k not in may_change and plain(saved.get(k)) != plain(now[k])]
    if changed:
        k = changed[0]
        raise UserError(f"--resume needs the run's own arguments, but --{k.replace('_', '-')} was {saved.get(k)!r} and is "
                        f"now {now[k]!r}; pass the original value or start a new run")


def sha256_file(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_npz(path: str, arrays: dict):
    """Atomic write: a temporary file beside `path` (unique to this process), fsync, then rename. Strings are stored as
    unicode arrays, so the file loads with allow_pickle=False."""
    _atomic(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_perturbations(path: str, env_id: Optional[str] = None, act_dim: Optional[int] = None, require=()) -> dict:
    """A perturbations file of this project (allow_pickle=False), checked before any use: its keys (and `require`), a
    non-empty δ set and random draws of finite values inside [−ε, ε], an ε its model can take, and the env and action
    size it must fit."""
    if not os.path.isfile(path):
        raise UserError(f"perturbations {path} not found; make them with "
                        f"`python de_perturbations.py --checkpoint <checkpoint>` (or run `bash run_pipeline.sh`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            npz = {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"perturbations {path} are unreadable ({type(e).__name__}); re-create them with de_perturbations.py")
    if str(npz.get("format", "")) != PERTURBATION_FORMAT:
        raise UserError(f"{path} is not a perturbations file of this project; re-create it with de_perturbations.py")
    problem = perturbations_problem(npz, require)
    if problem:
        raise UserError(f"perturbations {path} are malformed: {problem}; re-create them with de_perturbations.py")
    if (env_id is not None and str(npz["env_id"]) != env_id) or (act_dim is not None and npz["perturbations"].shape[1:] != (act_dim,)):
        raise UserError(f"{path} was made for {npz['env_id']} with action dimension {npz['perturbations'].shape[1:]}, "
                        f"but the checkpoint is {env_id} with {act_dim}; run de_perturbations.py on this checkpoint")
    return npz


def perturbations_problem(npz: dict, require=()) -> Optional[str]:
    """The first way a perturbations file breaks its schema (docs/file_contracts.md), or None."""
    missing = [k for k in ("env_id", "epsilon", "perturbation_model", "perturbations", "random_deltas", *require) if k not in npz]
    if missing:
        return f"'{missing[0]}' is missing"
    model, eps = str(npz["perturbation_model"]), np.asarray(npz["epsilon"], dtype=float)
    if model not in PERTURBATION_MODELS:
        return f"perturbation model '{model}' is not one of {', '.join(PERTURBATION_MODELS)}"
    if eps.shape != () or not (np.isfinite(eps) and eps > 0 and (model == "additive" or eps < 1)):
        return f"ε = {eps} does not fit the {model} model (0 < ε{' < 1' if model == 'multiplicative' else ''})"
    for key in ("perturbations", "random_deltas"):
        d = np.asarray(npz[key])
        if d.ndim != 2 or len(d) == 0 or d.shape[1] == 0:
            return f"'{key}' must be a non-empty [K, Na] set (shape {d.shape})"
        if not np.isfinite(d).all():
            return f"'{key}' holds NaN or inf"
        if np.abs(d).max() > float(eps) * (1 + 1e-6):
            return f"'{key}' reaches |δ| = {np.abs(d).max():.3g}, outside [−ε, ε] with ε = {float(eps)}"
    if npz["perturbations"].shape[1] != npz["random_deltas"].shape[1]:
        return "'perturbations' and 'random_deltas' disagree on the action dimension"
    return None


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


# Seeding, and a replay ring that saves and restores itself
def seed_everything(seed: int, torch_deterministic: bool = True):
    """Seed Python's, NumPy's and torch's global generators; cuDNN deterministic or not (CleanRL's seeding block)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


class RingBuffer:
    """Fixed-capacity tensor storage on a device, filled in a ring (`fields`: name -> shape of one row), that saves and
    restores itself: `state_dict()` holds the filled rows; `load_state_dict` restores them, and into a new capacity
    (a longer --total-steps on resume) keeps the newest rows, oldest first. Subclasses write the rows (`add`)."""

    def __init__(self, capacity: int, fields: dict, device):
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.data = {k: torch.zeros(capacity, *shape, device=device) for k, shape in fields.items()}

    def advance(self):
        self.ptr, self.size = (self.ptr + 1) % self.capacity, min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        return {"online": {k: v[:self.size].cpu() for k, v in self.data.items()}, "online_ptr": self.ptr,
                "online_capacity": self.capacity}

    def load_state_dict(self, saved: dict):
        rows, self.ptr = saved["online"], saved["online_ptr"]
        if saved["online_capacity"] != self.capacity:
            rows = {k: v.roll(-self.ptr, 0)[-self.capacity:] for k, v in rows.items()}
            self.ptr = len(rows["obs"]) % self.capacity
        self.size = len(rows["obs"])
        for k, v in rows.items():
            self.data[k][:self.size] = v.to(self.data[k].device)


# Fine-tuning's episode bookkeeping
@dataclasses.dataclass
class EpisodeCounters:
    """The training episodes' bookkeeping: the current episode's return, length and whether its δ ≠ 0, and the realized
    exposure so far (episodes and env steps that ran under a non-zero δ). Saved and restored by name."""

    episode_return: float = 0.0
    episode_len: int = 0
    perturbed: bool = False
    episodes: int = 0
    perturbed_episodes: int = 0
    steps: int = 0
    perturbed_steps: int = 0

    def start(self, delta: np.ndarray):
        self.episode_return, self.episode_len, self.perturbed = 0.0, 0, bool(np.any(delta))
        self.episodes, self.perturbed_episodes = self.episodes + 1, self.perturbed_episodes + int(self.perturbed)

    def step(self, reward: float):
        self.episode_return, self.episode_len = self.episode_return + float(reward), self.episode_len + 1
        self.steps, self.perturbed_steps = self.steps + 1, self.perturbed_steps + int(self.perturbed)

    def exposure(self) -> dict:
        """The realized exposure: fractions of the training episodes (the current one included) and env steps under δ ≠ 0."""
        return {"charts/perturbed_fraction": self.perturbed_episodes / max(self.episodes, 1),
                "charts/perturbed_step_fraction": self.perturbed_steps / max(self.steps, 1)}


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
    check_resume_args(state["args"], dataclasses.asdict(args), RESUME_MAY_CHANGE)
    if state["step"] > args.total_steps:
        raise UserError(f"{path} is at step {state['step']} > --total-steps {args.total_steps}; pass a larger --total-steps")
    return state


def open_run(args, run_name: str, stage: str, state_file: str):
    """The run folder runs/{run_name}/ and, with --resume, the state to continue from: refuses a run name that would
    leave runs/, --resume without --run-name or without state, and a folder that already holds a run (without
    --resume or --overwrite). Nothing is written. -> (run_dir, resumed state or None)."""
    check_name(run_name, "--run-name", "runs/")
    run_dir = os.path.join("runs", run_name)
    if args.resume and args.run_name is None:
        raise UserError("--resume needs --run-name: the folder under runs/ of the run to continue")
    resumed = resume_point(os.path.join(run_dir, state_file), args, stage) if args.resume else None
    if resumed is None and os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and not args.overwrite:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite, or another --run-name")
    return run_dir, resumed


def finished(resumed: Optional[dict], total_steps: int, run_dir: str) -> bool:
    """Whether the resumed run has already done all its steps (then there is nothing to do; it says so)."""
    if resumed is not None and resumed["step"] == total_steps:
        print(f"{run_dir} is already complete ({total_steps} steps); nothing to resume")
        return True
    return False


class Run:
    """A run's outputs besides its checkpoints: the folder (locked to this process), args.json, metrics.jsonl (cut back
    to the resumed save's length, so no row is repeated) and, with --track, W&B. `log(row)` writes one metrics row."""

    def __init__(self, run_dir: str, run_name: str, args, resumed: Optional[dict], **extra):
        lock_run_dir(run_dir)  # refuses a second process on the same folder
        self.dir = run_dir
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**dataclasses.asdict(args), **extra, "run_name": run_name}, f, indent=2)
        self.metrics = open_metrics(os.path.join(run_dir, "metrics.jsonl"), resumed)
        self.wandb = None
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, dir=run_dir,
                       config={**vars(args), **extra}, save_code=True)
            self.wandb = wandb

    def log(self, row: dict):
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def video(self, path: str, key: str, step: int):
        if self.wandb:
            self.wandb.log({key: self.wandb.Video(path, format="mp4")}, step=step)

    def close(self):
        self.metrics.close()
        if self.wandb:
            self.wandb.finish()


class NonFiniteSentinel:
    """The first step whose loss was NaN or inf, kept on the device: `watch` costs no host sync per step; `check` (one
    sync, at logging or evaluation) stops the run with a UserError naming that step."""

    def __init__(self, device, unit: str, run_dir: str):
        self.first_bad, self.unit, self.run_dir = torch.zeros((), dtype=torch.long, device=device), unit, run_dir

    def watch(self, loss: torch.Tensor, step: int):
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad > 0), self.first_bad, step)

    def check(self):
        if self.first_bad.item():
            raise UserError(f"non-finite loss at {self.unit} {self.first_bad.item()}: stopped; {self.run_dir} keeps the last good "
                            f"checkpoint; check the data for NaN/inf or lower --learning-rate, then --resume or start over")


def module_states(modules: dict) -> dict:
    """{name: state_dict} of the run's networks and optimizers, for a checkpoint."""
    return {k: m.state_dict() for k, m in modules.items()}


def load_module_states(modules: dict, saved: dict, device: Optional[torch.device] = None, capturable: bool = False):
    """Load each network's and optimizer's saved state; with `device`, an Adam's flags are set for this run again."""
    for k, m in modules.items():
        m.load_state_dict(saved[k])
        if device is not None and isinstance(m, torch.optim.Adam):
            set_adam_flags(m, device, capturable)


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


# Shared by the stage scripts: the default checkpoint, and Minari datasets (written, and read as flat transitions)
def default_checkpoint() -> str:
    """The first of DEFAULT_CHECKPOINTS that exists: the full-scale run's, then run_pipeline.sh's."""
    found = [p for p in DEFAULT_CHECKPOINTS if os.path.isfile(p)]
    if not found:
        raise UserError(f"no --checkpoint given and none of {', '.join(DEFAULT_CHECKPOINTS)} exists; make one with "
                        f"`bash run_pipeline.sh`, or with `python collect_dataset.py` and `python td3_bc_offline.py`")
    print(f"using checkpoint {found[0]}")
    return found[0]


def write_minari_dataset(dataset_id: str, episodes, env_id: str, ref_min_score: float, ref_max_score: float,
                         description: str, extra_metadata: dict, overwrite: bool = False,
                         max_episode_steps: Optional[int] = None) -> str:
    """Write episode buffers as a Minari dataset into the local store (honours MINARI_DATASETS_PATH).
    The dataset is built in a temporary folder and moved into place, so a failure leaves nothing behind."""
    import shutil
    import tempfile
    import warnings
    from importlib.metadata import version as pkg_version

    import minari
    final = minari.storage.get_dataset_path(dataset_id)
    if os.path.exists(final):
        if not overwrite:
            raise UserError(f"dataset {dataset_id} already exists at {final}; pass --overwrite to replace it")
        shutil.rmtree(final)
    root = minari.storage.get_dataset_path()
    tmp_root = tempfile.mkdtemp(prefix=".partial-", dir=root)
    old = os.environ.get("MINARI_DATASETS_PATH")
    env = gym.make(env_id, **({} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}))
    try:
        os.environ["MINARI_DATASETS_PATH"] = tmp_root
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(author|code_permalink).*")
            ds = minari.create_dataset_from_buffers(
                dataset_id, episodes, env=env, eval_env=env.spec, algorithm_name="TD3 (collect_dataset.py)",
                author="collect_dataset.py", ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                description=description, data_format="hdf5",
                requirements=[f"gymnasium=={pkg_version('gymnasium')}", f"mujoco=={pkg_version('mujoco')}"])
        ds.storage.update_metadata({k: json.dumps(v) for k, v in extra_metadata.items()})
        del ds
        # move into place: namespace metadata files first (only where missing), then the dataset folder
        for dirpath, _, files in os.walk(tmp_root):
            rel = os.path.relpath(dirpath, tmp_root)
            if rel.startswith(dataset_id):
                continue
            for f in files:
                if not os.path.exists(os.path.join(root, rel, f)):
                    os.makedirs(os.path.join(root, rel), exist_ok=True)
                    shutil.copy2(os.path.join(dirpath, f), os.path.join(root, rel, f))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(os.path.join(tmp_root, dataset_id), final)
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
        env.close()
        shutil.rmtree(tmp_root, ignore_errors=True)
    return str(final)


def dataset_to_transitions(dataset) -> dict:
    """Flatten episodes into (s, a, r, s', terminated) arrays. Observations hold T+1 entries per episode, so
    s' is always the real next observation, also for the last step of a truncated episode."""
    obs, act, rew, nxt, term = [], [], [], [], []
    for ep in dataset.iterate_episodes():
        if not isinstance(ep.observations, np.ndarray):
            raise UserError(f"dataset '{dataset.spec.dataset_id}' has dict/tuple observations; only Box observations are supported")
        obs.append(ep.observations[:-1]); nxt.append(ep.observations[1:])
        act.append(ep.actions); rew.append(ep.rewards); term.append(ep.terminations)
    if not obs or sum(len(r) for r in rew) == 0:
        raise UserError(f"dataset '{dataset.spec.dataset_id}' is empty; re-create it with collect_dataset.py")
    def cat(xs):
        return np.concatenate(xs).astype(np.float32)
    return {"obs": cat(obs), "actions": cat(act), "rewards": cat(rew), "next_obs": cat(nxt), "terminations": cat(term)}


def offline_transitions(dataset_id: str, obs_mean: torch.Tensor, obs_std: torch.Tensor, device) -> dict:
    """A checkpoint's dataset from the local Minari store as flat tensors on `device`, normalized with its statistics."""
    import minari
    if not os.path.exists(minari.storage.get_dataset_path(dataset_id)):
        raise UserError(f"the checkpoint's dataset '{dataset_id}' is not in the local Minari store; re-create it with "
                        f"collect_dataset.py (or `minari download {dataset_id}`), or pass --init scratch")
    with reading_dataset(dataset_id):
        data = {k: torch.as_tensor(v, device=device) for k, v in dataset_to_transitions(minari.load_dataset(dataset_id)).items()}
    data["obs"], data["next_obs"] = (data["obs"] - obs_mean) / obs_std, (data["next_obs"] - obs_mean) / obs_std
    return data


# Scores (one scale: 0 = random, 100 = expert) and evaluation under the perturbation conditions
def normalized_score(ret: float, ref_min, ref_max) -> Optional[float]:
    """D4RL-style score, the one scale of every log and file: 0 = random, 100 = expert (None without reference scores)."""
    return None if ref_min is None or ref_max is None else 100.0 * (ret - ref_min) / (ref_max - ref_min)


def reference_scores(ckpt: dict, ref_min=None, ref_max=None, required: bool = False) -> tuple:
    """The returns that normalize scores: the flags' (when given), else the checkpoint's; refuses a pair that cannot
    normalize, and a missing pair when `required` (the adaptive curriculum reads normalized returns)."""
    ref_min = ref_min if ref_min is not None else ckpt.get("ref_min_score")
    ref_max = ref_max if ref_max is not None else ckpt.get("ref_max_score")
    if required and (ref_min is None or ref_max is None):
        raise UserError("the adaptive curriculum needs normalized returns but the checkpoint has no reference scores; "
                        "pass --ref-min-score and --ref-max-score")
    if ref_min is not None and ref_max is not None and not ref_min < ref_max:
        raise UserError(f"the reference scores must satisfy min < max to normalize returns (got {ref_min} and {ref_max}); "
                        f"pass --ref-min-score and --ref-max-score")
    return ref_min, ref_max


def condition_metrics(returns: dict, ref_min, ref_max) -> dict:
    """{condition: returns} -> eval/{condition}_return, _return_std and _normalized (None without reference scores)."""
    return {f"eval/{c}_{stat}": value for c, r in returns.items() for stat, value in (
        ("return", float(r.mean())), ("return_std", float(r.std())), ("normalized", normalized_score(float(r.mean()), ref_min, ref_max)))}


class ConditionEvaluator:
    """A policy's deterministic returns on the same `episodes` episodes (seeds eval_seed + i) under each condition
    (name -> δ set; episode i plays δ_{i mod len}), all in lockstep through `rollout_batch`. `perturb` is the calling
    script's perturbation model (its perturb_action)."""

    def __init__(self, env_id: str, max_episode_steps: Optional[int], conditions: dict, episodes: int, eval_seed: int,
                 model: str, perturb):
        self.env_id, self.max_episode_steps, self.conditions, self.episodes = env_id, max_episode_steps, conditions, episodes
        self.eval_seed, self.model, self.perturb = eval_seed, model, perturb
        self.envs = [gym.make(env_id, max_episode_steps=max_episode_steps) for _ in range(len(conditions) * episodes)]
        self.deltas = np.vstack([d[np.arange(episodes) % len(d)] for d in conditions.values()])
        self.seeds = np.tile(eval_seed + np.arange(episodes), len(conditions))

    def __call__(self, actor, obs_mean, obs_std) -> dict:
        """-> {condition: per-episode returns [episodes]}"""
        returns, _ = rollout_batch(self.envs, actor, obs_mean, obs_std, self.deltas, self.seeds, self.model, self.perturb)
        return {name: returns[i * self.episodes:(i + 1) * self.episodes] for i, name in enumerate(self.conditions)}

    def record(self, run: "Run", step: int, actor, obs_mean, obs_std, condition: str):
        """The condition's first episode (its δ_0, the first evaluation seed), rendered and captioned, into
        {run dir}/videos/eval_step{step}.mp4 and, with --track, to W&B."""
        delta, path = self.conditions[condition][0], os.path.join(run.dir, "videos", f"eval_step{step:08d}.mp4")
        ep = record_episode(self.env_id, self.max_episode_steps, actor, obs_mean, obs_std, delta, self.perturb, self.model,
                            self.eval_seed)
        write_video(path, captioned(ep, f"step {step}, {condition}", delta), ep.fps)
        run.video(path, f"videos/eval_{condition}", step)


def rollout_batch(envs, actor, obs_mean, obs_std, deltas: np.ndarray, seeds, model: str, perturb):
    """Run one episode per (δ_j, seed_j) in lockstep, one batched policy call per step; `perturb` is the calling
    script's perturbation model (its perturb_action). Returns (returns [B], env steps taken)."""
    low, high = envs[0].action_space.low, envs[0].action_space.high
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    returns, alive, steps = np.zeros(len(seeds)), np.ones(len(seeds), bool), 0
    while alive.any():
        idx = np.flatnonzero(alive)
        with torch.no_grad():
            actions = actor((torch.as_tensor(obs[idx], dtype=torch.float32) - obs_mean) / obs_std).numpy()
        executed = perturb(actions, deltas[idx], low, high, model)
        for j, i in enumerate(idx):
            obs[i], reward, terminated, truncated, _ = envs[i].step(executed[j])
            returns[i] += reward
            alive[i] = not (terminated or truncated)
        steps += len(idx)
    return returns, steps


# The scripts' entry point
def cli(main, args_type):
    """The scripts' entry point: parse `args_type` with tyro and run `main`; a problem the user can fix (a UserError, or
    an OSError such as a full disk outside the atomic saves) ends in one `error:` line and a non-zero exit."""
    import sys

    import tyro
    try:
        main(tyro.cli(args_type))
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {io_failure(e)}")


# Plot finishing shared by evaluate_matrix.py and study_report.py
def save_curve_panels(fig, axes, conditions, ylabel: str, title: str, path: str):
    """Finish and save a learning-curve figure with one panel per evaluation condition (evaluate_matrix.py's and
    study_report.py's)."""
    import matplotlib.pyplot as plt
    for ax, cond in zip(axes, conditions):
        ax.set_title(f"evaluated under {cond}" + (" (precomputed δ set)" if cond == "adversarial" else ""))
        ax.set_xlabel("online env steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_q_plot(fig, ax, title: str, path: str):
    """Finish and save a q-trajectory figure (evaluate_matrix.py's and study_report.py's): q in [0, 1] over online env
    steps, the title, a legend and a grid."""
    import matplotlib.pyplot as plt
    ax.set_xlabel("online env steps")
    ax.set_ylabel("perturbation probability q")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
