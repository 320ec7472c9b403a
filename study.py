# The condition grid of the paper as one command: every stage of every (env, seed, condition) run on Ray.
"""A study expands a grid (envs × seeds × fine-tuning conditions × curricula, plus the offline-only and from-scratch
baselines) into the stage commands of the four stage scripts and runs them as a DAG on Ray:

    dataset (per env) -> TD3+BC (per env, seed) -> DE perturbations (per policy) -> fine-tunes -> evaluation (per
    policy)

then aggregates every finished run with rliable (`study_report.py`). It adds no algorithm: each stage is its own
script in its own process, exactly the command a user would type. Re-running the same command skips finished stages
(their files are untouched) and continues interrupted ones with the stage's own `--resume`.

    python study.py --scale tiny --seeds 1 2                         # seconds: every stage, two seeds
    python study.py --env-ids Hopper-v5 --seeds 1 2 3 4 5            # the paper's grid at the medium scale
    python study.py --ray-address auto ...                           # the same study on a running Ray cluster
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import tyro
from tqdm import tqdm

from study_tools.grid import Stage, build_stages, run_tag
from study_tools.running import (
    HERE,
    StageKilled,
    attempts_path,
    chain_stages,
    export_chain,
    is_done,
    log_path,
    marker_path,
    provenance,
    run_stage,
    start_ray,
    write_json_atomic,
)


@dataclass
class Args:
    env_ids: tuple[str, ...] = ("Hopper-v5",)
    """Gymnasium MuJoCo envs; each gets its own dataset and its own rows in the report"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds of the TD3+BC, DE and fine-tuning runs (one chain per env and seed)"""
    finetune_conditions: tuple[Literal["normal", "random", "adversarial"], ...] = ("normal", "random", "adversarial")
    """conditions fine-tuned from the offline policy at the same fixed q (claim 3 compares them; under normal, q has
    nothing to inject)"""
    curricula: tuple[Literal["fixed", "linear", "adaptive"], ...] = ("fixed", "linear", "adaptive")
    """curricula of q run under adversarial fine-tuning (claim 4 compares them; fixed is the adversarial arm above)"""
    q: float = 0.5
    """q of the fixed-curriculum arms"""
    scratch: bool = True
    """also train from scratch (adversarial, adaptive) as the fully online baseline"""
    epsilon: float = 0.3
    """ε: perturbation bound of the DE attacks and of every fine-tune"""
    scale: Literal["tiny", "small", "medium", "decisive", "decisive2", "paper"] = "medium"
    """stage budgets (SCALES in this file): tiny (seconds), small (minutes), medium (hours), decisive (the 100k study of
    docs/protocol.md: about a day on 2 cores), decisive2 (its part 2, docs/protocol-part2.md), paper (days on many)"""
    behaviour_seed: int = 1
    """seed of the behaviour policy that collects each env's dataset, shared by every study seed (another seed when
    one stalls below the medium target; its datasets get the namespace suffix -b{seed})"""
    results_dir: str | None = None
    """where the report goes (if unset: results/study-{scale})"""
    study_name: str | None = None
    """names the study in its manifest and W&B group (if unset: the results folder's name)"""
    ray_address: str | None = None
    """address of an existing Ray cluster (`auto` finds a local one); default: start Ray on this machine"""
    ray_timeout: float = 60.0
    """seconds the cluster at --ray-address has to answer as Ray (a service that accepts connections but is not Ray
    would otherwise hold the driver forever)"""
    num_cpus: int | None = None
    """CPUs Ray may use on this machine when it starts one (if unset: all)"""
    cpus_per_task: int = 1
    """CPUs each stage declares; its torch threads and DE/evaluation workers follow it"""
    cuda: bool = False
    """run TD3+BC and fine-tuning on a GPU (each such task then declares --gpus-per-task)"""
    gpus_per_task: float = 1.0
    """GPUs a training stage declares with --cuda (a fraction packs several on one GPU)"""
    max_retries: int = 2
    """times a stage is retried after its worker (or its process, by a signal) dies; it continues with --resume"""
    overwrite: bool = False
    """forget finished stages and run every stage afresh (--overwrite), replacing their outputs"""
    dry_run: bool = False
    """print the stages in order with their commands, and run nothing"""
    report: bool = True
    """aggregate the finished runs with rliable at the end (study_report.py)"""
    reps: int = 10_000
    """bootstrap replications of the report's confidence intervals"""
    track: bool = False
    """log every stage to Weights & Biases, grouped under the study name (honours WANDB_MODE=offline)"""


def check_args(args: Args) -> tuple:
    """Refuse settings no study can run with, before anything starts. -> (results folder, study name)"""
    if not args.seeds or not args.env_ids:
        raise SystemExit("error: --seeds and --env-ids need at least one value each")
    if not 0 < args.epsilon <= 1 or not 0 <= args.q <= 1 or args.cpus_per_task < 1 or args.max_retries < 0:
        raise SystemExit(
            "error: --epsilon must be in (0, 1], --q in [0, 1], --cpus-per-task >= 1 and --max-retries >= 0"
        )
    if not args.ray_timeout > 0:
        raise SystemExit(f"error: --ray-timeout must be > 0 seconds (got {args.ray_timeout})")
    if len(set(args.seeds)) < len(args.seeds) or len(set(args.env_ids)) < len(args.env_ids):
        raise SystemExit(
            "error: --seeds and --env-ids must not repeat a value (two chains would share one set of runs)"
        )
    cpus = args.num_cpus if args.num_cpus is not None else os.cpu_count() or 1
    if not args.ray_address and not 1 <= args.cpus_per_task <= cpus:
        raise SystemExit(
            f"error: each stage declares --cpus-per-task {args.cpus_per_task} but Ray would have {cpus} CPUs here, so "
            f"no stage could start; pass --num-cpus >= --cpus-per-task >= 1"
        )
    results_dir = args.results_dir or f"results/study-{args.scale}"
    if os.path.exists(results_dir) and not os.path.isdir(results_dir):
        raise SystemExit(f"error: --results-dir {results_dir} is a file; pass a folder for the report")
    return results_dir, args.study_name or os.path.basename(os.path.normpath(results_dir))


def study_manifest(args: Args, name: str, stages: list, cmds: dict, cwd: str) -> dict:
    """study.json: the grid, every policy and command, and where and at which commit the driver ran."""
    return {
        "study": name,
        "scale": args.scale,
        "env_ids": list(args.env_ids),
        "seeds": list(args.seeds),
        "epsilon": args.epsilon,
        "behaviour_seed": args.behaviour_seed,
        "namespace": run_tag(args),
        "policies": [s.policy for s in stages if s.policy],
        "runs_root": cwd,
        **provenance(),
        "commands": {s.id: cmds[s.id][1:] for s in stages},
    }


def stage_env(args: Args, name: str) -> dict:
    """Each stage's environment: its threads set to the CPUs Ray gives it (two torch processes on the same cores
    thrash otherwise), unbuffered output, one W&B group per study."""
    env = {
        "OMP_NUM_THREADS": str(args.cpus_per_task),
        "MKL_NUM_THREADS": str(args.cpus_per_task),
        "PYTHONUNBUFFERED": "1",
        "WANDB_RUN_GROUP": name,
    }
    if "MINARI_DATASETS_PATH" in os.environ:
        env["MINARI_DATASETS_PATH"] = os.environ["MINARI_DATASETS_PATH"]
    return env


def forget_markers(stages: list):
    """--overwrite: every stage runs again, so no marker or attempt count of an earlier run stays."""
    for s in stages:
        for path in (marker_path(s), attempts_path(log_path(s))):
            if os.path.exists(path):
                os.remove(path)


def export_unexported_chains(stages: list, done: set, results_dir: str, cwd: str):
    """Chains finished by a driver that was stopped before exporting them."""
    for env_id, seed in sorted({(s.env_id, s.seed) for s in stages if s.seed is not None}):
        if all(s.id in done for s in chain_stages(stages, env_id, seed)) and not os.path.exists(
            os.path.join(results_dir, "chains", f"{env_id}__seed{seed}.json")
        ):
            export_chain(results_dir, env_id, seed, stages, cwd)


def finished(s: Stage, res: dict, cmds: dict, done: set, stages: list, results_dir: str, cwd: str):
    """A stage that succeeded: its marker (what ran, its cost, every attempt), and its chain's rows once the chain is
    complete."""
    done.add(s.id)
    write_json_atomic(
        marker_path(s),
        {
            "argv": cmds[s.id][1:],
            "flags": res["flags"],
            "wall_s": res["wall_s"],  # all attempts, with those killed earlier
            "cpu_s": res["cpu_s"],
            "attempts": res["attempts"],
            "started": res["attempts"][0]["started"],
            "finished": time.time(),
        },
    )
    attempts = len(res["attempts"])
    tqdm.write(f"done    {s.id}  ({res['wall_s']:.1f} s{f', {attempts} attempts' if attempts > 1 else ''})")
    if s.kind == "evaluate" and all(c.id in done for c in chain_stages(stages, s.env_id, s.seed)):
        export_chain(results_dir, s.env_id, s.seed, stages, cwd)
        tqdm.write(f"chain   {s.env_id} seed {s.seed} finished: its rows are in {results_dir}/chains/")


def run_dag(ray, args: Args, stages: list, cmds: dict, done: set, env: dict, where: tuple) -> tuple:
    """Every stage not done, as a Ray task once its inputs are, as many at a time as the CPUs allow; a stage
    downstream of a failure is skipped. -> (failed: {stage id: error}, skipped stage ids)"""
    name, results_dir, cwd = where
    remote = ray.remote(run_stage)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // args.cpus_per_task))
    failed, skipped, running = {}, set(), {}
    pending = [s for s in stages if s.id not in done]
    bar = tqdm(
        total=len(stages), initial=len(done), desc=f"study {name}", unit="stage", mininterval=1, dynamic_ncols=True
    )
    if done:
        tqdm.write(f"{len(done)} of {len(stages)} stages finished earlier: skipped")

    def status():
        bar.set_postfix(done=len(done), running=len(running), queued=len(pending), failed=len(failed), refresh=False)

    while pending or running:
        for s in list(pending):  # skip everything downstream of a failure
            if any(d in failed or d in skipped for d in s.deps):
                pending.remove(s)
                skipped.add(s.id)
                bar.update(1)
        ready = [s for s in pending if all(d in done for d in s.deps)]
        for s in ready[: max(0, slots - len(running))]:
            pending.remove(s)
            opts = {"num_cpus": args.cpus_per_task, "max_retries": args.max_retries, "retry_exceptions": [StageKilled]}
            if s.gpu:
                opts["num_gpus"] = args.gpus_per_task
            log = os.path.join(cwd, log_path(s))
            ref = remote.options(**opts).remote(cmds[s.id], s.resume_file, s.fresh, cwd, env, log)
            running[ref] = (s, time.time())
        status()
        if not running:
            continue
        ended, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
        for ref in ended:
            s, t0 = running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # the worker died more than --max-retries times
                error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                res = {"returncode": -1, "wall_s": time.time() - t0, "error": error}
            bar.update(1)
            if res["returncode"] == 0:
                finished(s, res, cmds, done, stages, results_dir, cwd)
            else:
                failed[s.id] = res["error"]
                tqdm.write(f"FAILED  {s.id}  ({res['wall_s']:.1f} s): {res['error']}")
        status()
    bar.close()
    return failed, skipped


def main(args: Args) -> int:
    results_dir, name = check_args(args)
    cwd = os.getcwd()
    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.expanduser("~/.minari/datasets")
    stages = build_stages(args, store)
    by_id = {s.id: s for s in stages}
    cmds = {s.id: [sys.executable, os.path.join(HERE, s.script), *s.argv] for s in stages}
    if args.dry_run:
        for s in stages:
            print(f"{s.id}  <-  {', '.join(s.deps) or '-'}\n    {' '.join(cmds[s.id][1:])}")
        return 0
    manifest = study_manifest(args, name, stages, cmds, cwd)

    ray = start_ray(args)  # before anything is written or removed: a cluster that does not answer leaves no trace
    done = set() if args.overwrite else {s.id for s in stages if is_done(s, cmds[s.id])}
    if args.overwrite:
        forget_markers(stages)
    export_unexported_chains(stages, done, results_dir, cwd)
    write_json_atomic(os.path.join(results_dir, "study.json"), manifest)  # before any stage: a partial study reports
    failed, skipped = run_dag(ray, args, stages, cmds, done, stage_env(args, name), (name, results_dir, cwd))
    ray.shutdown()

    print(f"study {name}: {len(done)} of {len(stages)} stages done, {len(failed)} failed, {len(skipped)} skipped")
    for sid, err in failed.items():
        print(f"  failed: {sid}: {err}  (log: {log_path(by_id[sid])})")
    if skipped:
        print(f"  skipped (an input failed): {', '.join(sorted(skipped))}")
    if args.report and any(s.kind == "evaluate" and s.id in done for s in stages):
        import study_report

        study_report.main(study_report.Args(results_dir=results_dir, reps=args.reps))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
