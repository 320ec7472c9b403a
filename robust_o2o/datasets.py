"""Minari datasets: written atomically into the local store, and read back as flat transitions."""

import contextlib
import json
import multiprocessing
import os
import shutil
import sys
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
    """Write episode buffers as a Minari dataset into the local store (honours MINARI_DATASETS_PATH). It is built in a
    temporary folder by a child process (h5py on a full disk can crash its process) and then moved into place; an
    overwritten dataset is replaced only then. So a failure leaves the store as it was."""
    final = minari.storage.get_dataset_path(dataset_id)
    if os.path.exists(final) and not overwrite:
        raise UserError(f"dataset {dataset_id} already exists at {final}; pass --overwrite to replace it")
    root = minari.storage.get_dataset_path()
    remove_stale_partials(root)
    needed, free = dataset_bytes(episodes), shutil.disk_usage(root).free
    if needed > free:
        raise UserError(
            f"dataset {dataset_id} needs about {needed / 2**20:.1f} MiB, but the Minari store {root} has "
            f"{free / 2**20:.1f} MiB free; free disk space or point MINARI_DATASETS_PATH at a larger disk"
        )
    tmp_root = tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=root)
    try:
        spec = (dataset_id, episodes, env_id, max_episode_steps, ref_min_score, ref_max_score, description)
        failure = build_in_child(tmp_root, *spec, extra_metadata)
        if failure:
            raise UserError(
                f"could not write dataset {dataset_id} into {root} ({failure}); the store is as it was: free disk "
                f"space and run again"
            )
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
        if os.path.exists(final):  # --overwrite: the old dataset goes only now that the new one is whole
            os.rename(final, os.path.join(tmp_root, "replaced"))
        os.rename(os.path.join(tmp_root, dataset_id), final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return str(final)


def build_in_child(tmp_root: str, *spec) -> str | None:
    """Run build_dataset in a forked child (spawned off Linux) with its stderr silenced: h5py reports a failed write
    from its destructors, in pages of tracebacks, and can crash. -> None, or what went wrong in one line."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=build_dataset, args=(send, tmp_root, *spec))
    child.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:  # it died before it could say
        message = None
    child.join()
    if child.exitcode != 0 and message is None:
        return f"the writer died with exit code {child.exitcode}"
    return message


def build_dataset(send, tmp_root, dataset_id, episodes, env_id, max_steps, ref_min, ref_max, description, metadata):
    """The child's work: create the dataset under tmp_root and send None, or the error's first line."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        os.environ["MINARI_DATASETS_PATH"] = tmp_root
        env = gym.make(env_id, **({} if max_steps is None else {"max_episode_steps": max_steps}))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(author|code_permalink).*")
            ds = minari.create_dataset_from_buffers(
                dataset_id,
                episodes,
                env=env,
                eval_env=env.spec,
                algorithm_name="TD3 (collect_dataset.py)",
                author="collect_dataset.py",
                ref_min_score=ref_min,
                ref_max_score=ref_max,
                description=description,
                data_format="hdf5",
                requirements=[f"gymnasium=={pkg_version('gymnasium')}", f"mujoco=={pkg_version('mujoco')}"],
            )
        ds.storage.update_metadata({k: json.dumps(v) for k, v in metadata.items()})
        del ds
        env.close()
        send.send(None)
    except Exception as e:
        send.send(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
    finally:
        send.close()


def dataset_bytes(episodes) -> int:
    """What an hdf5 Minari dataset of these episodes takes on disk, with a margin: its arrays, plus about 16 KiB per
    episode of hdf5 groups and metadata (13.8-15.2 KiB on three Hopper datasets: benchmarks/evaluation_facts.py)."""
    fields = ("observations", "actions", "rewards", "terminations", "truncations")
    arrays = sum(np.asarray(getattr(ep, f)).nbytes for ep in episodes for f in fields)
    return int(1.2 * (arrays + 16 * 2**10 * len(episodes))) + 2**20


def remove_stale_partials(root: str):
    """A dataset write killed outright (kill -9, a crash in h5py) cannot clean up after itself: its .partial-{pid}-*
    folder is removed by the next write into the store, once that pid is gone."""
    for name in os.listdir(root):
        pid = name.split("-")[1] if name.startswith(".partial-") else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    flat = {"obs": cat(obs), "actions": cat(act), "rewards": cat(rew), "next_obs": cat(nxt), "terminations": cat(term)}
    for key, values in flat.items():  # a NaN here would train every network on NaN: refused before any run folder
        if not np.isfinite(values).all():
            raise UserError(
                f"dataset '{dataset.spec.dataset_id}' holds NaN or inf in its {key} (first at transition "
                f"{int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])}); re-create it with "
                f"collect_dataset.py"
            )
    return flat


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
    if data["obs"].shape[1:] != obs_mean.shape:  # another env's data under the checkpoint's dataset id
        raise UserError(
            f"dataset '{dataset_id}' holds observations {tuple(data['obs'].shape[1:])} wide, the checkpoint's policy "
            f"{tuple(obs_mean.shape)}: not the data the policy was trained on; re-create it, or pass --init scratch"
        )
    data["obs"], data["next_obs"] = (data["obs"] - obs_mean) / obs_std, (data["next_obs"] - obs_mean) / obs_std
    return data
