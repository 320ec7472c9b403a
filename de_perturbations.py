# Stage 2 of robust offline-to-online RL by adversarial fine-tuning (Ayabe, Kera & Kawamoto, arXiv 2510.13358):
# differential evolution finds action perturbations δ ∈ [−ε, ε]^Na that minimise a policy's return -> .npz
"""The perturbation model (an actuator fault, fixed for a whole episode):

    multiplicative (default):  ã = clip(a ⊙ (1 + δ), low, high)
    additive:                  ã = clip(a + δ ⊙ (high − low)/2, low, high)

Conditions, with the same meaning in every stage: normal (δ = 0), random (δ ~ U([−ε, ε]^Na) per episode),
adversarial (δ from the set found here). The objective of DE run k is the policy's mean return over M episodes
whose seeds are fixed for the run (common random numbers), evaluated for the whole population at once.
Output schema: docs/file_contracts.md ("Perturbations file schema").
"""

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Annotated, Literal, NamedTuple

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from scipy.optimize._differentialevolution import DifferentialEvolutionSolver  # differential_evolution's engine
from tqdm import tqdm

from robust_o2o.cli import Range, UserError, check_ranges, cli
from robust_o2o.envs import route_mujoco_warnings
from robust_o2o.evaluation import MAX_LOCKSTEP_ENVS, rollout_batch
from robust_o2o.files import read_npz, save_npz, sha256_file
from robust_o2o.formats import PERTURBATION_FORMAT, default_checkpoint, load_checkpoint
from robust_o2o.perturbation import Perturbation, chosen
from robust_o2o.plots import save_figure
from robust_o2o.runs import check_resume_args

PERTURBATION_VERSION = 1


@dataclass
class Args:
    # the paper's knobs: the box [−ε, ε]^Na of δ and how δ acts on the executed action
    epsilon: Annotated[float, Range(0, open="lo")] = 0.3
    """ε: perturbation bound, δ ∈ [−ε, ε]^Na (the paper uses 0.3 or 0.5 depending on the env)"""
    perturbation_model: str = "multiplicative"
    """multiplicative: ã = a ⊙ (1 + δ); additive: ã = a + δ ⊙ half-range (both clipped to the action bounds); or a
    model of the script named by --perturbation-from"""
    perturbation_from: str | None = None
    """a fork's script whose PERTURBATION to apply instead of this script's (docs/forking.md); the policy's checkpoint
    must record that perturbation"""

    # the adversary: differential evolution (scipy)
    num_perturbations: Annotated[int, Range(1)] = 5
    """K: independent DE runs (own seed and own episode seeds each); their best δ form the set {δ_a}"""
    de_episodes: Annotated[int, Range(1)] = 5
    """M: episodes averaged in the DE objective (the same seeds for every candidate of a run)"""
    popsize: Annotated[int, Range(4)] = 10
    """scipy popsize: the population has popsize × Na candidates"""
    maxiter: Annotated[int, Range(1)] = 20
    """maximum DE generations"""
    mutation: Annotated[tuple[float, float], Range(0, 2, open="hi")] = (0.5, 1.0)
    """DE mutation (dithering range)"""
    recombination: Annotated[float, Range(0, 1)] = 0.7
    """DE crossover probability"""
    strategy: Literal[
        "best1bin",
        "best1exp",
        "rand1bin",
        "rand1exp",
        "rand2bin",
        "rand2exp",
        "randtobest1bin",
        "randtobest1exp",
        "currenttobest1bin",
        "currenttobest1exp",
        "best2exp",
        "best2bin",
    ] = "best1bin"
    """DE strategy (scipy name)"""
    tol: Annotated[float, Range(0)] = 0.01
    """DE relative convergence tolerance"""
    polish: bool = False
    """polish the best δ with L-BFGS-B (off: the objective is piecewise and noisy)"""
    de_seed: Annotated[int, Range(0)] = 20_000
    """DE run k uses episode seeds de_seed + 1000 k + i and optimizer seed de_seed + k"""

    # inputs and outputs
    checkpoint: str | None = None
    """policy checkpoint (if unset: the first of DEFAULT_CHECKPOINTS that exists: full-scale, then run_pipeline.sh's)"""
    output: str | None = None
    """output .npz (if unset: perturbations.npz next to the checkpoint); a PNG of DE convergence goes beside it"""

    # evaluation
    eval_episodes: Annotated[int, Range(1)] = 10
    """episodes (seeds eval_seed + i) for the reported returns: nominal, random draws and each δ_a"""
    eval_seed: Annotated[int, Range(0)] = 10_000
    """first seed of the reporting episodes (the same as the other stages' evaluations)"""
    random_draws: Annotated[int, Range(1)] = 20
    """R: random δ ~ U([−ε, ε]^Na) evaluated for the random-condition baseline"""
    max_episode_steps: Annotated[int | None, Range(1)] = None
    """override the checkpoint's episode time limit (shorter, cheaper episodes)"""

    # run management
    num_workers: Annotated[int, Range(0)] = 0
    """processes stepping the environments (0: one per CPU core)"""
    seed: Annotated[int, Range(0)] = 1
    """seed for the random draws"""
    resume: bool = False
    """continue an interrupted run from {output}.state.npz (written after every DE generation)"""
    overwrite: bool = False
    """replace an existing --output (a fine-tune that recorded the old set then refuses the new one)"""
    track: bool = False
    """log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "robust-o2o"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""


# ALGO LOGIC: the policy network (a copy of td3_bc_offline.Actor; tests/test_contracts.py proves the copies agree)
class Actor(nn.Module):
    """Deterministic policy π(s): 2×hidden ReLU MLP, tanh output rescaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, hidden_dim: int = 256):
        super().__init__()
        hidden = [nn.Linear(obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        self.net = nn.Sequential(*hidden, nn.Linear(hidden_dim, act_dim), nn.Tanh())
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.action_scale + self.action_bias


def actor_from_checkpoint(ckpt: dict) -> Actor:
    actor = Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["action_low"], ckpt["action_high"], ckpt["hidden_dim"])
    actor.load_state_dict(ckpt["actor"])
    return actor.eval()


# ALGO LOGIC: the perturbation model (copied verbatim into td3_adv_finetune.py and evaluate_matrix.py; fine-tuning
# also wraps it as an env wrapper that draws δ per episode)
PERTURBATION_MODELS = ("multiplicative", "additive")


def perturb_action(action: np.ndarray, delta: np.ndarray, low, high, perturbation_model: str) -> np.ndarray:
    """Executed action ã for the chosen action a under perturbation δ; works row-wise on batches [..., Na]."""
    if perturbation_model == "multiplicative":
        executed = action * (1.0 + delta)
    elif perturbation_model == "additive":
        executed = action + delta * (high - low) / 2.0
    else:
        raise ValueError(f"unknown perturbation model {perturbation_model!r}")
    return np.clip(executed, low, high).astype(action.dtype, copy=False)


# what δ perturbs and how; --perturbation-from takes a fork's instead (robust_o2o/perturbation.py)
PERTURBATION = Perturbation(target="action", models=PERTURBATION_MODELS, apply=perturb_action)


# ALGO LOGIC: one DE run, the paper's adversary
class DERun(NamedTuple):
    delta: np.ndarray  # the best δ found [Na]
    objective: float  # its mean return on the run's own DE episodes
    history: list  # the best return of each generation


def run_de(evaluate, bounds: list, seeds: np.ndarray, de_seed: int, args: Args, on_generation=None, resume_from=None):
    """Differential evolution over δ ∈ [−ε, ε]^Na minimising the policy's mean return on the episodes `seeds` (the same
    for every candidate: common random numbers), the whole population evaluated at once. After every generation,
    on_generation(solver state) is called; `resume_from` (such a state) continues a run where it stopped. -> DERun"""
    history = [] if resume_from is None else list(resume_from["history"])

    def objective(x):  # x: [Na, S] (scipy's vectorized layout) -> mean returns [S]
        return evaluate(np.ascontiguousarray(x.T), seeds)

    def callback(intermediate_result):
        history.append(float(intermediate_result.fun))
        if on_generation is not None:
            on_generation(solver_state(solver, history))

    # scipy's own solver object (what scipy.optimize.differential_evolution runs), so that its state can be saved
    with DifferentialEvolutionSolver(
        objective,
        bounds,
        strategy=args.strategy,
        maxiter=args.maxiter,
        popsize=args.popsize,
        tol=args.tol,
        mutation=args.mutation,
        recombination=args.recombination,
        rng=de_seed,
        polish=args.polish,
        vectorized=True,
        updating="deferred",
        callback=callback,
    ) as solver:
        if resume_from is not None:
            restore_solver(solver, resume_from, generations_done=len(history), maxiter=args.maxiter)
        result = solver.solve()
    return DERun(np.asarray(result.x), float(result.fun), history)


# Batched evaluation: many (δ, episode seed) pairs step together, one policy forward per step
_WORKER = {}


def _init_worker(ckpt_small: dict, env_id: str, max_episode_steps, perturbation_model: str, perturbation_from):
    torch.set_num_threads(1)
    route_mujoco_warnings()  # a worker process makes its envs without make_env
    _WORKER.update(actor=actor_from_checkpoint(ckpt_small), obs_stats=(ckpt_small["obs_mean"], ckpt_small["obs_std"]))
    _WORKER.update(env_spec=(env_id, max_episode_steps), perturbation_model=perturbation_model, envs=[])
    _WORKER.update(perturbation=chosen(PERTURBATION, perturbation_from))  # a worker imports the fork itself


def _worker_rollout(deltas: np.ndarray, seeds: np.ndarray):
    w = _WORKER
    while len(w["envs"]) < min(len(seeds), MAX_LOCKSTEP_ENVS):
        env_id, max_episode_steps = w["env_spec"]
        w["envs"].append(gym.make(env_id, max_episode_steps=max_episode_steps))
    envs, (obs_mean, obs_std) = w["envs"][: min(len(seeds), MAX_LOCKSTEP_ENVS)], w["obs_stats"]
    return rollout_batch(envs, w["actor"], obs_mean, obs_std, deltas, seeds, w["perturbation_model"], w["perturbation"])


class PopulationEvaluator:
    """Evaluates returns of many (δ, seed) pairs, split across `num_workers` processes (in-process for 1), under this
    script's perturbation or, given `fork` (a script's path), that script's."""

    def __init__(self, ckpt: dict, model: str, max_episode_steps: int | None, num_workers: int = 1, fork=None):
        acting = ("obs_dim", "act_dim", "action_low", "action_high", "hidden_dim", "actor", "obs_mean", "obs_std")
        small = {key: ckpt[key] for key in acting}  # what a worker needs to act
        env_id = ckpt["env_id"]
        self.num_workers, self.env_steps = max(1, num_workers), 0
        if self.num_workers == 1:
            _init_worker(small, env_id, max_episode_steps, model, fork)
            self.pool = None
        else:
            self.pool = ProcessPoolExecutor(
                self.num_workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(small, env_id, max_episode_steps, model, fork),
            )

    def returns(self, deltas: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Mean return of each δ (rows of deltas [S, Na]) over the episode seeds [M]: returns [S]."""
        return self.episode_returns(deltas, seeds).mean(1)

    def episode_returns(self, deltas: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Return of every (δ, episode seed) pair: [S, M]."""
        S, M = len(deltas), len(seeds)
        pair_deltas, pair_seeds = np.repeat(deltas, M, axis=0), np.tile(seeds, S)
        if self.pool is None:
            chunks = [_worker_rollout(pair_deltas, pair_seeds)]
        else:
            # fewer pairs than workers
            parts = [p for p in np.array_split(np.arange(S * M), self.num_workers) if len(p)]
            chunks = list(
                self.pool.map(_worker_rollout, [pair_deltas[p] for p in parts], [pair_seeds[p] for p in parts])
            )
        self.env_steps += sum(c[1] for c in chunks)
        return np.concatenate([c[0] for c in chunks]).reshape(S, M)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


# Resuming scipy's solver. It relies on two private fields of scipy's DifferentialEvolutionSolver besides its public
# population, population_energies and random_number_generator: _nfev (evaluations so far, which maxfun caps) and
# _random_population_index (the order in which candidates are drawn, shuffled in place every generation); and on its
# generator being a legacy RandomState (what it makes from an integer seed). tests/test_perturbations.py fails if a
# scipy version changes any of these.
SOLVER_PRIVATE_FIELDS = ("_nfev", "_random_population_index")


def solver_state(solver: DifferentialEvolutionSolver, history: list) -> dict:
    """Everything that continues a DE run exactly, as plain arrays (saved with allow_pickle=False)."""
    return {
        "history": np.asarray(history),
        "population": solver.population,
        "energies": solver.population_energies,
        "nfev": solver._nfev,
        "sample_order": solver._random_population_index,
        "rng": json.dumps(legacy_rng_state(solver.random_number_generator)),
    }


def legacy_rng_state(rng: np.random.RandomState) -> list:
    name, keys, position, has_gauss, cached_gaussian = rng.get_state()
    return [name, keys.tolist(), position, has_gauss, cached_gaussian]


def restore_solver(solver: DifferentialEvolutionSolver, state: dict, generations_done: int, maxiter: int):
    solver.population, solver.population_energies = state["population"].copy(), state["energies"].copy()
    solver._nfev, solver._random_population_index = int(state["nfev"]), state["sample_order"].copy()
    name, keys, *rest = json.loads(str(state["rng"]))
    solver.random_number_generator.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    # the generations left (maxfun, set from maxiter at construction, stays the uninterrupted run's); none if it had
    # converged right after this save: only the ending (and the polish) is left
    solver.maxiter = 0 if solver.converged() else maxiter - generations_done


def check_args(args: Args):
    check_ranges(args)  # each field's range is declared next to it in Args
    if args.perturbation_model == "multiplicative" and args.epsilon >= 1:
        raise UserError(
            f"--epsilon must be in (0, 1) for the multiplicative model (got {args.epsilon}): δ = −1 would "
            f"switch an actuator off and δ < −1 reverse it; use 0.3 or 0.5 as the paper does"
        )
    models = chosen(PERTURBATION, args.perturbation_from).models
    if args.perturbation_model not in models:
        raise UserError(f"--perturbation-model must be one of {', '.join(models)} (got {args.perturbation_model!r})")
    if args.mutation[0] > args.mutation[1]:
        raise UserError(f"--mutation is a (min, max) dithering range; got min > max ({args.mutation})")


def as_evaluated(pair_returns: np.ndarray) -> float:
    """The evaluators' estimator (robust_o2o.evaluation.ConditionEvaluator) from a [S, M] table of (δ, episode)
    returns: episode i plays δ_{i mod S}, and the condition's return is the mean over the M episodes."""
    S, M = pair_returns.shape
    return float(pair_returns[np.arange(M) % S, np.arange(M)].mean())


def plot_convergence(path: str, history: np.ndarray, nominal: float, random_mean: float, adversarial, title: str):
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k, h in enumerate(history):
        h = h[~np.isnan(h)]
        ax.plot(np.arange(1, len(h) + 1), h, marker=".", label=f"DE run {k} (best of population)")
    ax.axhline(nominal, color="k", ls="--", label=f"normal (δ = 0): {nominal:.1f}")
    ax.axhline(random_mean, color="gray", ls=":", label=f"random δ, mean: {random_mean:.1f}")
    found = f"found δ on eval episodes, mean: {adversarial.mean():.1f}"
    ax.axhline(adversarial.mean(), color="tab:red", ls="-.", label=found)
    ax.set_xlabel("DE generation")
    ax.set_ylabel("mean episodic return (DE episodes)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def padded(histories: list) -> np.ndarray:
    """Per-run best-return histories of unequal length as one NaN-padded [K, max length] array."""
    out = np.full((len(histories), max([len(h) for h in histories], default=0)), np.nan)
    for k, h in enumerate(histories):
        out[k, : len(h)] = h
    return out


def load_state(path: str, args: Args) -> dict | None:
    """With --resume, the interrupted run's state (allow_pickle=False), refused if it was made with other arguments;
    without, None (refused if an interrupted run is there, which a fresh run would overwrite)."""
    if args.resume and not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist; run without --resume")
    if not args.resume:
        if os.path.isfile(path):
            raise UserError(f"{path} holds an interrupted run; pass --resume to continue it, or delete the file")
        return None
    try:
        state = read_npz(path)  # sizes checked before anything is inflated
        saved = json.loads(str(state["args"]))
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete it and run without --resume") from None
    check_resume_args(saved, json.loads(json.dumps(asdict(args))), ("resume", "overwrite", "track", "num_workers"))
    keys = ("k", "baseline", "deltas", "objective", "histories", "env_steps", "wall_time_sec", "history", "population")
    missing = [k for k in keys + ("energies", "nfev", "sample_order", "rng") if k not in state]
    if missing:  # every generation's save holds all of these
        raise UserError(f"{path} is not a complete DE state (no '{missing[0]}'); delete it and run without --resume")
    if np.ndim(state["baseline"]) != 2:  # before the per-(δ, episode) baseline: its summary cannot be continued
        raise UserError(f"{path} was written by an older version of this script; delete it and run without --resume")
    histories = [h[~np.isnan(h)].tolist() for h in state["histories"]]  # the runs it had finished:
    state["runs"] = [DERun(state["deltas"][k], float(state["objective"][k]), histories[k]) for k in range(state["k"])]
    return state


# Setup, the files, the plot (main reads these by name)
def resolve_inputs(args: Args) -> tuple:
    """The checkpoint (loaded and checked), its env (made once, to fail early), the episode limit and the output path.
    -> (checkpoint, env_id, max_episode_steps, output)"""
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
    ckpt = load_checkpoint(args.checkpoint)
    if "finetune_condition" in ckpt:  # a fine-tuned policy is attacked under the perturbation it was trained with
        script = args.perturbation_from or os.path.basename(__file__)
        chosen(PERTURBATION, args.perturbation_from).check(ckpt, f"the checkpoint {args.checkpoint}", script)
    env_id = ckpt["env_id"]
    max_steps = args.max_episode_steps if args.max_episode_steps is not None else ckpt.get("max_episode_steps")
    output = args.output or os.path.join(os.path.dirname(args.checkpoint) or ".", "perturbations.npz")
    if not output.endswith(".npz"):
        raise UserError(f"--output must end in .npz (got {output})")
    if os.path.exists(output) and not (args.overwrite or args.resume):
        raise UserError(f"{output} already exists (fine-tunes may record it); pass --overwrite, or another --output")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    return ckpt, env_id, max_steps, output


def start_wandb(args: Args, env_id: str):
    import wandb  # only with --track

    name = f"{env_id}__de_perturbations__{args.seed}"
    wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=name)
    return wandb


def stacked(runs: list, width: int) -> dict:
    """Finished runs as arrays for the state file."""
    deltas = np.asarray([run.delta for run in runs]).reshape(-1, width)
    objective = np.asarray([run.objective for run in runs])
    return {"deltas": deltas, "objective": objective, "histories": padded([run.history for run in runs])}


def file_header(args: Args, env_id: str, max_steps: int | None, act_dim: int, perturbation: Perturbation) -> dict:
    """What the perturbations file says besides the results: its format, the threat model (ε and the perturbation:
    target, model, code), the env, the policy and the DE settings (docs/file_contracts.md); evaluate_matrix.py's fresh
    attack repeats them."""
    de_settings = {key: getattr(args, key) for key in ("de_seed", "de_episodes", "popsize", "maxiter", "strategy")}
    de_settings.update(mutation=np.asarray(args.mutation), recombination=args.recombination, tol=args.tol)
    return {
        "format": PERTURBATION_FORMAT,
        "format_version": PERTURBATION_VERSION,
        "epsilon": args.epsilon,
        **perturbation.record(args.perturbation_model),
        "env_id": env_id,
        "max_episode_steps": -1 if max_steps is None else int(max_steps),
        "act_dim": act_dim,
        "checkpoint_path": args.checkpoint,
        "checkpoint_sha256": sha256_file(args.checkpoint),
        **de_settings,
        "polish": args.polish,
    }


def main(args: Args):
    check_args(args)
    ckpt, env_id, max_steps, output = resolve_inputs(args)
    perturbation, eps = chosen(PERTURBATION, args.perturbation_from), args.epsilon
    width = perturbation.width(ckpt["obs_dim"], ckpt["act_dim"])  # of δ: Na for a perturbation of actions
    state_path = output + ".state.npz"  # written after every DE generation; removed when the run is complete
    saved = load_state(state_path, args)
    wandb = start_wandb(args, env_id) if args.track else None
    workers = args.num_workers or os.cpu_count() or 1
    evaluator = PopulationEvaluator(ckpt, args.perturbation_model, max_steps, workers, args.perturbation_from)
    eval_seeds = args.eval_seed + np.arange(args.eval_episodes)
    random_deltas = np.random.default_rng(args.seed).uniform(-eps, eps, size=(args.random_draws, width))
    t0 = time.time()
    try:
        # the baselines on the evaluation episodes: δ = 0 (row 0) and each random draw
        if saved is None:
            baseline = evaluator.episode_returns(np.vstack([np.zeros((1, width)), random_deltas]), eval_seeds)
        else:
            baseline, evaluator.env_steps = saved["baseline"], int(saved["env_steps"])
            t0 -= float(saved["wall_time_sec"])
        nominal, random_returns = float(baseline[0].mean()), baseline[1:].mean(1)
        print(
            f"{env_id}: nominal return {nominal:.1f}; random δ (ε={eps}, {args.perturbation_model}): "
            f"{as_evaluated(baseline[1:]):.1f} (episode i under draw i mod {args.random_draws}, as evaluators play it)"
        )
        # ALGO LOGIC: K independent DE runs, each on its own episode seeds; their best δ form the set {δ_a}
        runs = [] if saved is None else saved["runs"]
        generations_done = args.maxiter * len(runs) + (0 if saved is None else len(saved["history"]))
        pbar = tqdm(total=args.num_perturbations * args.maxiter, desc="DE generations", initial=generations_done)
        for k in range(len(runs), args.num_perturbations):
            seeds = args.de_seed + 1000 * k + np.arange(args.de_episodes)

            def on_generation(solver_state: dict, k=k):
                pbar.update(1)
                pbar.set_postfix(best_return=f"{solver_state['history'][-1]:.1f}")
                runs_so_far = {"k": k, "baseline": baseline, **stacked(runs, width), **solver_state}
                spent = {"env_steps": evaluator.env_steps, "wall_time_sec": time.time() - t0}
                save_npz(state_path, {"args": json.dumps(asdict(args)), **runs_so_far, **spent})

            resume_from = saved if saved is not None and k == int(saved["k"]) else None
            bounds = [(-eps, eps)] * width  # δ ∈ [−ε, ε]^Na
            run = run_de(evaluator.returns, bounds, seeds, args.de_seed + k, args, on_generation, resume_from)
            pbar.update(args.maxiter - len(run.history))  # a run that converged early
            runs.append(run)
            if wandb is not None:
                wandb.log({f"de/run{k}_best_return": run.objective})
        pbar.close()
        deltas = np.stack([run.delta for run in runs])
        adversarial_pairs = evaluator.episode_returns(deltas, eval_seeds)
        env_steps, wall = evaluator.env_steps, time.time() - t0
    finally:
        evaluator.close()
    if not (np.isfinite(baseline).all() and np.isfinite(adversarial_pairs).all()):
        raise UserError(f"a return against {args.checkpoint} is NaN or inf; {output} was not written")
    adversarial_returns, history = adversarial_pairs.mean(1), padded([run.history for run in runs])
    results = {"perturbations": deltas, "perturbation_returns": adversarial_returns, "history": history}
    results.update(de_objective=np.asarray([run.objective for run in runs]), nominal_return=nominal)
    results.update(random_deltas=random_deltas, random_returns=random_returns, eval_seeds=eval_seeds)
    results.update(random_return_mean=random_returns.mean(), random_return_std=random_returns.std())
    cost = {"env_steps": env_steps, "wall_time_sec": wall, "num_workers": workers}
    header = file_header(args, env_id, max_steps, int(ckpt["act_dim"]), perturbation)
    save_npz(output, {**header, **results, **cost})
    if os.path.exists(state_path):
        os.remove(state_path)
    png = output[:-4] + ".png"
    policy = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    title = f"DE against {policy}\n{env_id}, ε={eps}, {args.perturbation_model}, K={len(deltas)}"
    plot_convergence(png, history, nominal, float(random_returns.mean()), adversarial_returns, title)
    print(
        f"adversarial δ_a (K={len(deltas)}): return {as_evaluated(adversarial_pairs):.1f} on the {args.eval_episodes} "
        f"eval episodes, episode i under δ_(i mod {len(deltas)}) as the evaluators play it (nominal {nominal:.1f}, "
        f"random {as_evaluated(baseline[1:]):.1f}); per δ over all eval episodes: "
        + ", ".join(f"{r:.1f}" for r in adversarial_returns)
    )
    print(f"{env_steps} env steps in {wall:.1f}s ({env_steps / wall:.0f}/s, {workers} workers); wrote {output}, {png}")
    if wandb is not None:
        summary = {"nominal_return": nominal, "random_return": float(random_returns.mean())}
        summary.update(adversarial_return=float(adversarial_returns.mean()), steps_per_sec=env_steps / wall)
        wandb.log({**{f"de/{key}": value for key, value in summary.items()}, "de/convergence": wandb.Image(png)})
        wandb.finish()


if __name__ == "__main__":
    cli(main, Args)
