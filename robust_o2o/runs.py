"""The run folder runs/{run_name}/: its name, the lock that makes it one process's, args.json, metrics.jsonl, W&B,
seeding, the resume point, and the sentinel that stops a run whose losses go non-finite."""

import dataclasses
import json
import os
import random

import numpy as np
import torch

from robust_o2o.cli import UserError, check_name
from robust_o2o.files import check_recorded_set, write_text
from robust_o2o.folders import lock_run_dir, move_old_run_aside
from robust_o2o.resume import rng_state


@dataclasses.dataclass
class RunOptions:
    """The run-management flags this module reads from a training script's Args, declared once: td3_bc_offline.py's
    and td3_adv_finetune.py's Args extend it (a fork inherits it). open_run also reads `run_name` and `total_steps`,
    which each script declares itself: how a run is named by default and what a step is are the stage's."""

    overwrite: bool = False
    """replace an existing run folder of the same name"""
    resume: bool = False
    """continue runs/{run_name}/ (give --run-name) from its last saved state (same arguments; --total-steps may grow)"""
    track: bool = False
    """log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "robust-o2o"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""


def seed_everything(seed: int, torch_deterministic: bool = True):
    """Seed Python's, NumPy's and torch's global generators; cuDNN deterministic or not (CleanRL's seeding block)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


RESUME_MAY_CHANGE = (
    "resume",
    "overwrite",
    "total_steps",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
)


def check_resume_args(saved: dict, now: dict, may_change=()):
    """--resume continues a run only with its own arguments (bar `may_change`); tuples compare as the lists JSON
    made."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    changed = [k for k in now if k not in may_change and plain(saved.get(k)) != plain(now[k])]
    if changed:
        k = changed[0]
        raise UserError(
            f"--resume needs the run's own arguments, but --{k.replace('_', '-')} was {saved.get(k)!r} and is "
            f"now {now[k]!r}; pass the original value or start a new run"
        )


def resume_point(path: str, args, stage: str) -> dict:
    """The saved state to continue from; refuses a different stage or different arguments (bar RESUME_MAY_CHANGE)."""
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path} is unreadable or not a plain-tensor state ({type(e).__name__}); start the run without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("stage") != stage or "rng" not in state:
        raise UserError(f"{path} is not a resumable {stage} state; start the run without --resume")
    check_resume_args(state["args"], dataclasses.asdict(args), RESUME_MAY_CHANGE)
    if "perturbations_sha256" in state:  # a fine-tune continues against the very δ set it started with, by content
        check_recorded_set(state["perturbations_path"], state["perturbations_sha256"], f"the run in {path}")
    if state["step"] > args.total_steps:
        raise UserError(
            f"{path} is at step {state['step']} > --total-steps {args.total_steps}; pass a larger --total-steps"
        )
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
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite, or another --run-name"
        )
    return run_dir, resumed


def already_complete(resumed: dict | None, total_steps: int, run_dir: str) -> bool:
    """Whether the resumed run has already done all its steps (then there is nothing to do; it says so)."""
    if resumed is not None and resumed["step"] == total_steps:
        print(f"{run_dir} is already complete ({total_steps} steps); nothing to resume")
        return True
    return False


class Run:
    """A run's outputs besides its checkpoints: the folder (locked to this process), args.json, metrics.jsonl (cut back
    to the resumed save's length, so no row is repeated) and, with --track, W&B. `log(row)` writes one metrics row."""

    def __init__(self, run_dir: str, run_name: str, args, resumed: dict | None, **extra):
        lock_run_dir(run_dir)  # refuses a second process on the same folder
        if resumed is not None:  # before anything is written
            check_metrics(os.path.join(run_dir, "metrics.jsonl"), resumed["metrics_bytes"])
        if resumed is None and args.overwrite:
            move_old_run_aside(run_dir)  # the replaced run goes whole: nothing of it can mix with this run's files
        self.dir = run_dir
        record = {**dataclasses.asdict(args), **extra, "run_name": run_name}
        write_text(
            os.path.join(run_dir, "args.json"), json.dumps(record, indent=2)
        )  # atomic: names the file if it fails
        self.metrics = open_metrics(os.path.join(run_dir, "metrics.jsonl"), resumed)
        self.wandb = None
        if args.track:
            import wandb

            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                name=run_name,
                dir=run_dir,
                config={**vars(args), **extra},
                save_code=True,
            )
            self.wandb = wandb

    def resume_state(self) -> dict:
        """What a resume needs from the run itself: the generators now, and metrics.jsonl's length (cut back to it). The
        log is made durable first, so a state never records rows that a power loss could take from the log."""
        self.metrics.flush()
        os.fsync(self.metrics.fileno())
        return {"rng": rng_state(), "metrics_bytes": self.metrics.tell()}

    def log(self, row: dict):
        try:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        except OSError as e:  # a full disk: the error names the log
            e.filename = e.filename or self.metrics.name
            raise
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def video(self, path: str, key: str, step: int):
        if self.wandb:
            self.wandb.log({key: self.wandb.Video(path, format="mp4")}, step=step)

    def close(self):
        self.metrics.close()
        if self.wandb:
            self.wandb.finish()


def check_metrics(path: str, recorded_bytes: int):
    """A resumed run's log must hold every row its state records (a log cut short would be extended with NUL bytes)."""
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size is None or size < recorded_bytes:
        raise UserError(
            f"{path} holds {size or 0} bytes but the state being resumed records {recorded_bytes}: rows of the run's "
            f"log are lost, so it cannot be continued as one record; restore the log, or start the run again "
            f"(--overwrite)"
        )


def open_metrics(path: str, resumed: dict | None):
    """metrics.jsonl for appending: fresh, or cut back to the length it had at the resumed save (no duplicate rows)."""
    if resumed is None:
        return open(path, "w")
    with open(path, "r+") as f:
        f.truncate(resumed["metrics_bytes"])
    return open(path, "a")


class NonFiniteSentinel:
    """The first step whose loss was NaN or inf, kept on the device: `watch` costs no host sync per step; `check` (one
    sync, at logging or evaluation) stops the run with a UserError naming that step."""

    def __init__(self, device, unit: str, run_dir: str):
        self.first_bad, self.unit, self.run_dir = torch.zeros((), dtype=torch.long, device=device), unit, run_dir

    def watch(self, loss: torch.Tensor, step: int):
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad > 0), self.first_bad, step)

    def check(self):
        if self.first_bad.item():
            saved = os.path.isfile(os.path.join(self.run_dir, "checkpoint.pt"))  # say only what is there
            kept = "keeps the last good checkpoint" if saved else "holds no checkpoint yet"
            raise UserError(
                f"non-finite loss at {self.unit} {self.first_bad.item()}: stopped; {self.run_dir} {kept}; check the "
                f"data for NaN/inf or lower --learning-rate, then {'--resume or ' if saved else ''}start over"
            )
