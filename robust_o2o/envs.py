"""The envs the stages run: Gymnasium MuJoCo envs with Box spaces, made once up front, so that a wrong id, an env of
another kind or a checkpoint for another env ends in one line before anything is written."""

import os
import warnings

import gymnasium as gym
import numpy as np

from robust_o2o.cli import UserError


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """gym.make(env_id), refused in one line unless it is a MuJoCo env with Box spaces: resuming a run saves and
    restores MuJoCo's physics state mid-episode, and the networks act on flat float vectors."""
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv  # imports mujoco, which reads MUJOCO_GL: only on use
    except (RuntimeError, AttributeError, ImportError, OSError) as e:  # mujoco reads MUJOCO_GL as it is imported:
        # an unknown backend raises RuntimeError, osmesa without libOSMesa an AttributeError
        backend = os.environ.get("MUJOCO_GL")
        raise UserError(
            f"MuJoCo cannot start with MUJOCO_GL={backend} ({type(e).__name__}: {str(e)[:80]}; its library may be "
            f"missing); set MUJOCO_GL=egl (or osmesa, glfw, with their libraries installed), or unset it"
        ) from None
    route_mujoco_warnings()

    try:
        env = gym.make(env_id, max_episode_steps=max_episode_steps)
    except gym.error.Error as e:
        raise UserError(f"unknown env id '{env_id}' ({e}); pass a Gymnasium MuJoCo id such as Hopper-v5") from None
    spaces = (env.observation_space, env.action_space)
    if not isinstance(env.unwrapped, MujocoEnv) or not all(isinstance(s, gym.spaces.Box) for s in spaces):
        env.close()
        raise UserError(
            f"env '{env_id}' is not a Gymnasium MuJoCo env with Box spaces; this project runs those only (a resumed "
            f"run restores MuJoCo's physics state): pass one such as Hopper-v5, HalfCheetah-v5 or Walker2d-v5"
        )
    return env


def route_mujoco_warnings():
    """MuJoCo's warnings (HalfCheetah's model compiles with a deprecation note) as Python warnings, each shown once per
    process, instead of a line for every env made and a MUJOCO_LOG.TXT left in the working folder."""
    import mujoco

    mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo: {message.strip()}", stacklevel=2))


def env_mismatch(ckpt: dict) -> str | None:
    """How a (schema-valid) checkpoint disagrees with the env it names: observation width, action width, action
    bounds; or None. An env that cannot be made, or is not MuJoCo, is refused by make_env."""
    env = make_env(ckpt["env_id"])
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    low, high = env.action_space.low, env.action_space.high
    env.close()
    if obs_shape != (ckpt["obs_dim"],) or act_shape != (ckpt["act_dim"],):
        return (
            f"it was made for observations {ckpt['obs_dim']} and actions {ckpt['act_dim']} wide, but "
            f"{ckpt['env_id']} here has {obs_shape} and {act_shape}"
        )
    if not (np.allclose(low, ckpt["action_low"].numpy()) and np.allclose(high, ckpt["action_high"].numpy())):
        return f"its action bounds differ from {ckpt['env_id']}'s [{low.tolist()}, {high.tolist()}]"
    return None
