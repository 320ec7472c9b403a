"""Minari datasets: written atomically into the local store, and read back as flat transitions."""

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from importlib.metadata import version as pkg_version

import gymnasium as gym
import minari
import numpy as np
import torch

from robust_o2o.cli import UserError


@contextlib.contextmanager
def reading_dataset(dataset_id: str):
    """Every read of a Minari dataset (its files are read lazily, episode by episode) ends, if the files are damaged, in
    one line that names the dataset and the fix, instead of an h5py traceback."""
    try:
        yield
    except (OSError, KeyError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(
            f"dataset '{dataset_id}' is damaged or unreadable ({type(e).__name__}: {msg}); re-create it with "
            f"`python collect_dataset.py ... --overwrite` (or, for an official id, `minari download {dataset_id}`)"
        ) from None


def write_minari_dataset(
    dataset_id: str,
    episodes,
    env_id: str,
    ref_min_score: float,
    ref_max_score: float,
    description: str,
    extra_metadata: dict,
    overwrite: bool = False,
    max_episode_steps: int | None = None,
) -> str:
    """Write episode buffers as a Minari dataset into the local store (honours MINARI_DATASETS_PATH).
    The dataset is built in a temporary folder and moved into place, so a failure leaves nothing behind."""
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
                dataset_id,
                episodes,
                env=env,
                eval_env=env.spec,
                algorithm_name="TD3 (collect_dataset.py)",
                author="collect_dataset.py",
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                description=description,
                data_format="hdf5",
                requirements=[f"gymnasium=={pkg_version('gymnasium')}", f"mujoco=={pkg_version('mujoco')}"],
            )
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
            raise UserError(
                f"dataset '{dataset.spec.dataset_id}' has dict/tuple observations; only Box observations are supported"
            )
        obs.append(ep.observations[:-1])
        nxt.append(ep.observations[1:])
        act.append(ep.actions)
        rew.append(ep.rewards)
        term.append(ep.terminations)
    if not obs or sum(len(r) for r in rew) == 0:
        raise UserError(f"dataset '{dataset.spec.dataset_id}' is empty; re-create it with collect_dataset.py")

    def cat(xs):
        return np.concatenate(xs).astype(np.float32)

    return {"obs": cat(obs), "actions": cat(act), "rewards": cat(rew), "next_obs": cat(nxt), "terminations": cat(term)}


def offline_transitions(dataset_id: str, obs_mean: torch.Tensor, obs_std: torch.Tensor, device) -> dict:
    """A checkpoint's dataset from the local Minari store as flat tensors on `device`, normalized with its
    statistics."""
    if not os.path.exists(minari.storage.get_dataset_path(dataset_id)):
        raise UserError(
            f"the checkpoint's dataset '{dataset_id}' is not in the local Minari store; re-create it with "
            f"collect_dataset.py (or `minari download {dataset_id}`), or pass --init scratch"
        )
    with reading_dataset(dataset_id):
        data = {
            k: torch.as_tensor(v, device=device)
            for k, v in dataset_to_transitions(minari.load_dataset(dataset_id)).items()
        }
    data["obs"], data["next_obs"] = (data["obs"] - obs_mean) / obs_std, (data["next_obs"] - obs_mean) / obs_std
    return data
