"""What resuming a run exactly needs: the generators, the env mid-episode, and the networks' and optimizers' states
(plain types and tensors, so they load with torch.load(weights_only=True))."""

import random

import gymnasium as gym
import numpy as np
import torch

from robust_o2o.fast_path import set_adam_flags


def rng_state() -> dict:
    """Python, NumPy and torch generator states as plain types and tensors (they load with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def env_state(env: gym.Env) -> dict:
    """What continuing the current episode exactly needs: MuJoCo's integration state, the time-limit counter, the env's
    and the action space's RNGs, and a perturbation wrapper's RNG and δ (plain types and tensors)."""
    import mujoco  # imported on use: importing it reads MUJOCO_GL, which video.check_rendering must check first

    u, spec = env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, physics, spec)
    state = {
        "mujoco": torch.from_numpy(physics),
        "elapsed_steps": time_limit(env)._elapsed_steps,
        "env_rng": u.np_random.bit_generator.state,
        "action_space_rng": env.action_space.np_random.bit_generator.state,
    }
    if hasattr(env, "delta"):  # ActionPerturbation
        state.update(wrapper_rng=env.rng.bit_generator.state, delta=torch.from_numpy(env.delta.copy()))
    return state


def set_env_state(env: gym.Env, state: dict):
    import mujoco  # imported on use (see env_state)

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


def module_states(modules: dict) -> dict:
    """{name: state_dict} of the run's networks and optimizers, for a checkpoint."""
    return {k: m.state_dict() for k, m in modules.items()}


def load_module_states(modules: dict, saved: dict, device: torch.device | None = None, capturable: bool = False):
    """Load each network's and optimizer's saved state; with `device`, an Adam's flags are set for this run again."""
    for k, m in modules.items():
        m.load_state_dict(saved[k])
        if device is not None and isinstance(m, torch.optim.Adam):
            set_adam_flags(m, device, capturable)
