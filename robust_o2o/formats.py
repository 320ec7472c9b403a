"""The files the stages hand to each other, checked on load against their schema (docs/file_contracts.md): the
checkpoint (TD3+BC's and fine-tuning's) and the perturbations file (DE's)."""

import glob
import os

import numpy as np
import torch

from robust_o2o.cli import UserError
from robust_o2o.envs import env_mismatch
from robust_o2o.files import read_npz, recorded_stage, recreate

CHECKPOINT_FORMAT = "o2o-adv-checkpoint"
CHECKPOINT_VERSION = 1
PERTURBATION_FORMAT = "o2o-adv-perturbations"
DEFAULT_CHECKPOINTS = (
    "runs/local-hopper-medium-v0__td3_bc_offline__1/checkpoint.pt",
    "runs/local-quick-hopper-medium-v0__td3_bc_offline__1/checkpoint.pt",
)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint of this project without running any code (torch.load(weights_only=True)) and check its
    format."""
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {path} not found; train one with `python td3_bc_offline.py` (or run "
            f"`bash run_pipeline.sh`), or pass the right path"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable or not a plain-tensor checkpoint ({type(e).__name__}); "
            f"{recreate(recorded_stage(path))}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (format '{CHECKPOINT_FORMAT}' expected)")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has checkpoint format version {ckpt['format_version']} > {CHECKPOINT_VERSION}; update this code"
        )
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {path} is malformed: {problem}; {recreate(ckpt.get('stage'))}")
    try:
        problem = env_mismatch(ckpt)
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from None
    if problem:
        raise UserError(f"checkpoint {path} does not fit its env: {problem}; {recreate(ckpt.get('stage'))}")
    return ckpt


REQUIRED_KEYS = {
    "env_id": str,
    "dataset_id": str,
    "obs_dim": int,
    "act_dim": int,
    "hidden_dim": int,
    "action_low": torch.Tensor,
    "action_high": torch.Tensor,
    "obs_mean": torch.Tensor,
    "obs_std": torch.Tensor,
    "actor": dict,
    "args": dict,
}


FINETUNE_KEYS = {"init": str, "finetune_condition": str, "curriculum": str}  # a fine-tune's record of how it was made


def checkpoint_problem(ckpt: dict) -> str | None:
    """The first way `ckpt` breaks the schema every stage relies on (docs/file_contracts.md), or None: presence and
    type of every key a stage reads, every tensor's dtype (float32) and shape against the checkpoint's own obs, action
    and hidden sizes, and finite values. Agreement with the env it names is checked by load_checkpoint."""
    required = {**REQUIRED_KEYS, **(FINETUNE_KEYS if "finetune_condition" in ckpt else {})}
    for key, kind in required.items():
        if not isinstance(ckpt.get(key), kind) or (kind is int and isinstance(ckpt[key], bool)):
            return f"'{key}' is missing or not a {kind.__name__}"
    seed, limit = ckpt["args"].get("seed"), ckpt.get("max_episode_steps")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return "'args' records no integer seed"
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        return f"'max_episode_steps' must be a positive int or None (got {limit!r})"
    for key in ("ref_min_score", "ref_max_score"):
        value = ckpt.get(key)
        if value is not None and (not isinstance(value, (int, float)) or not np.isfinite(value)):
            return f"'{key}' must be a finite number or None (got {value!r})"
    no, na, h = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]
    if min(no, na, h) < 1:
        return f"obs_dim, act_dim and hidden_dim must be >= 1 (got {no}, {na}, {h})"
    shapes = {
        "action_low": (na,),
        "action_high": (na,),
        "obs_mean": (no,),
        "obs_std": (no,),
        "actor/net.0.weight": (h, no),
        "actor/net.0.bias": (h,),
        "actor/net.2.weight": (h, h),
        "actor/net.2.bias": (h,),
        "actor/net.4.weight": (na, h),
        "actor/net.4.bias": (na,),
    }
    for net in ("critic", "critic_target"):
        if net in ckpt:
            shapes.update(
                {
                    f"{net}/net.0.weight": (2, no + na, h),
                    f"{net}/net.2.weight": (2, h, h),
                    f"{net}/net.4.weight": (2, h, 1),
                }
            )
    for name, shape in shapes.items():
        parent, _, key = name.rpartition("/")
        holder = ckpt.get(parent) if parent else ckpt
        t = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            return f"'{name}' has shape {tuple(t.shape) if isinstance(t, torch.Tensor) else None}, expected {shape}"
        if t.dtype != torch.float32:
            return f"'{name}' is {t.dtype}, expected torch.float32"
    problem = tensor_problem(ckpt)  # a NaN weight acts as NaN actions, a NaN Adam state trains NaN: refused
    if problem:
        return problem
    if not (ckpt["obs_std"] > 0).all():
        return "obs_std holds a non-positive std"
    if not (ckpt["action_low"] < ckpt["action_high"]).all():
        return "action_low must be below action_high"
    for net in ("actor", "critic", "critic_target"):
        for key, tensor in (ckpt.get(net) or {}).items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
                return f"'{net}/{key}' is not a float32 tensor"
    lo, hi = ckpt.get("ref_min_score"), ckpt.get("ref_max_score")
    if lo is not None and hi is not None and not lo < hi:
        return f"its reference scores cannot normalize a return (ref_min_score {lo} is not below ref_max_score {hi})"
    return None


def tensor_problem(tree, path: str = "") -> str | None:
    """The first tensor anywhere in a checkpoint (networks, targets, optimizer states) without values, or NaN/inf."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type != "cpu":
            return f"'{path}' is a tensor on the {tree.device.type} device, which holds no values"
        if (tree.is_floating_point() or tree.is_complex()) and not torch.isfinite(tree).all():
            return f"'{path}' holds NaN or inf"
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    problems = (tensor_problem(value, f"{path}/{key}" if path else str(key)) for key, value in items)
    return next((problem for problem in problems if problem), None)


def load_perturbations(path: str, env_id: str | None = None, width: int | None = None, require=()) -> dict:
    """A perturbations file of this project (allow_pickle=False), checked before any use: its keys (and `require`), a
    non-empty δ set and random draws of finite values inside [−ε, ε], an ε its model can take, and the env and δ
    width it must fit. Whether the reader can apply its perturbation is the reader's PERTURBATION.check."""
    if not os.path.isfile(path):
        raise UserError(
            f"perturbations {path} not found; make them with "
            f"`python de_perturbations.py --checkpoint <checkpoint>` (or run `bash run_pipeline.sh`)"
        )
    try:
        npz = read_npz(path)
    except Exception as e:
        raise UserError(
            f"perturbations {path} are unreadable ({type(e).__name__}: {str(e)[:80]}); re-create them with "
            "de_perturbations.py"
        ) from None
    if str(npz.get("format", "")) != PERTURBATION_FORMAT:
        raise UserError(f"{path} is not a perturbations file of this project; re-create it with de_perturbations.py")
    problem = perturbations_problem(npz, require)
    if problem:
        raise UserError(f"perturbations {path} are malformed: {problem}; re-create them with de_perturbations.py")
    check_fit(npz, path, env_id, width)
    return npz


def check_fit(npz: dict, path: str, env_id: str | None, width: int | None):
    """A δ set fits the env a checkpoint is for and the width of its perturbation's δ."""
    if (env_id is not None and str(npz["env_id"]) != env_id) or (
        width is not None and npz["perturbations"].shape[1:] != (width,)
    ):
        raise UserError(
            f"{path} was made for {npz['env_id']} with δ of width {npz['perturbations'].shape[1:]}, but the "
            f"checkpoint is {env_id} and its perturbation's δ has width {width} (the action dimension for a "
            f"perturbation of actions); run de_perturbations.py on this checkpoint"
        )


def perturbations_problem(npz: dict, require=()) -> str | None:
    """The first way a perturbations file breaks its schema (docs/file_contracts.md), or None."""
    missing = [
        k
        for k in ("env_id", "epsilon", "perturbation_model", "perturbations", "random_deltas", *require)
        if k not in npz
    ]
    if missing:
        return f"'{missing[0]}' is missing"
    model, eps = str(npz["perturbation_model"]), np.asarray(npz["epsilon"])
    if not model:  # which names a stage can apply is its script's to say (its PERTURBATION, checked by the reader)
        return "the perturbation model is unnamed"
    if eps.dtype.kind not in "fiu":
        return f"ε must be a real number (got {eps.dtype} {eps!r})"
    eps = eps.astype(float)
    if eps.shape != () or not (np.isfinite(eps) and eps > 0 and (model == "additive" or eps < 1)):
        return f"ε = {eps} does not fit the {model} model (0 < ε{' < 1' if model == 'multiplicative' else ''})"
    for key in ("perturbations", "random_deltas"):
        d = np.asarray(npz[key])
        if d.ndim != 2 or len(d) == 0 or d.shape[1] == 0:
            return f"'{key}' must be a non-empty [K, Na] set (shape {d.shape})"
        if d.dtype.kind not in "fiu":
            return f"'{key}' must hold real numbers (dtype {d.dtype})"
        if not np.isfinite(d).all():
            return f"'{key}' holds NaN or inf"
        if np.abs(d).max() > float(eps) * (1 + 1e-6):
            return f"'{key}' reaches |δ| = {np.abs(d).max():.3g}, outside [−ε, ε] with ε = {float(eps)}"
    if npz["perturbations"].shape[1] != npz["random_deltas"].shape[1]:
        return "'perturbations' and 'random_deltas' disagree on the width of δ"
    return None


def default_checkpoint() -> str:
    """The first of DEFAULT_CHECKPOINTS that exists: the full-scale run's, then run_pipeline.sh's."""
    found = [p for p in DEFAULT_CHECKPOINTS if os.path.isfile(p)]
    if not found:
        raise UserError(
            f"no --checkpoint given and none of {', '.join(DEFAULT_CHECKPOINTS)} exists; make one with "
            f"`bash run_pipeline.sh`, or with `python collect_dataset.py` and `python td3_bc_offline.py`"
        )
    print(f"using checkpoint {found[0]}")
    return found[0]


def find_checkpoints(patterns) -> list:
    """Each checkpoint file once: folders are walked without following links (a link loop adds nothing) and without
    entering runs that --overwrite moved aside (*.replaced-*: superseded, named explicitly if wanted), and a file
    reached by two names (a link, a copy's link) counts once."""
    paths = []
    for p in patterns:
        if os.path.isdir(p):
            for folder, subfolders, files in os.walk(p):
                subfolders[:] = [name for name in subfolders if ".replaced-" not in name]
                paths += [os.path.join(folder, "checkpoint.pt")] if "checkpoint.pt" in files else []
        else:
            paths += [m for m in glob.glob(p) if os.path.isfile(m)]
    by_file = {os.path.realpath(p): os.path.normpath(p) for p in sorted(paths, reverse=True)}
    return sorted(by_file.values())
