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

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import tyro
from tqdm import tqdm

from robust_o2o.cli import die_with_parent
from robust_o2o.files import write_text

HERE = os.path.dirname(os.path.abspath(__file__))

# Stage budgets per scale. medium: a behaviour policy at D4RL's medium level (a third of the expert reference) and
# budgets under which the fine-tuned and offline-only policies differ, sized for a 5-seed Hopper study in one sitting
# on 2 CPU cores (docs/study.md, "What the medium scale costs").
SCALES = {
    "tiny": dict(
        namespace="local-tiny",
        collect="--levels medium --num-transitions 1000 --max-train-steps 1500 --learning-starts 500".split()
        + "--batch-size 64 --eval-freq 500 --eval-episodes 2 --ref-episodes 3".split()
        + "--medium-target-return 50 --max-episode-steps 100".split(),
        pretrain="--total-steps 200 --eval-freq 100 --eval-episodes 2 --batch-size 64".split(),
        de="--num-perturbations 1 --popsize 4 --maxiter 2 --de-episodes 2 --eval-episodes 2 --random-draws 2".split(),
        finetune="--total-steps 300 --eval-freq 150 --eval-episodes 2 --batch-size 64".split(),
        scratch_starts=100,
        evaluate="--eval-episodes 2".split(),
    ),
    "small": dict(  # a weak "medium" (return ~200 where D4RL's Hopper medium is ~1400): exercises every stage
        namespace="local-quick",
        collect="--levels random medium --num-transitions 50000 --max-train-steps 40000 --learning-starts 5000".split()
        + "--eval-freq 5000 --eval-episodes 5 --ref-episodes 20 --medium-target-return 200".split(),
        pretrain="--total-steps 10000 --eval-freq 2500 --eval-episodes 5".split(),
        de="--num-perturbations 3 --maxiter 10".split(),
        finetune="--total-steps 20000 --eval-freq 5000 --eval-episodes 5".split(),
        scratch_starts=5000,
        evaluate="--eval-episodes 10".split(),
    ),
    "medium": dict(  # sized so that 5 Hopper seeds finish in one sitting (~2 hours) on 2 cores after the dataset
        namespace="local-medium",
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 20000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--num-perturbations 3 --maxiter 10".split(),
        finetune="--total-steps 30000 --eval-freq 5000 --eval-episodes 10".split(),
        scratch_starts=10000,
        evaluate=[],
    ),
    "decisive": dict(  # the 100k study's budgets (docs/protocol.md §4): TD3+BC past its plateau, 100k fine-tuning
        namespace="local-medium",  # steps, the final matrix at its defaults (30 episodes, fresh attacks with every
        tag="decisive",  # setting of the precomputed one); the medium dataset, its own runs
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 50000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--de-episodes 2".split(),  # K, popsize and generations at their defaults; episodes cut for cost (§6)
        finetune="--total-steps 100000 --eval-freq 5000 --eval-episodes 10".split(),
        scratch_starts=10000,
        evaluate=[],
    ),
    "decisive2": dict(  # part 2's budgets (docs/protocol-part2.md): decisive's, plus the policies of the last 4
        namespace="local-medium",  # evaluations kept and evaluated on held-out episodes (averaged endpoints); no
        tag="decisive2",  # fresh attack where no endpoint reads it (scratch: claim 2 reads its learning curve)
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 50000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--de-episodes 2".split(),
        finetune="--total-steps 100000 --eval-freq 5000 --eval-episodes 10 --keep-checkpoints 4".split(),
        scratch_starts=10000,
        evaluate="--kept-episodes 10".split(),
        scratch_evaluate=["--no-fresh-attack"],
    ),
    "paper": dict(
        namespace="local",
        collect=[],
        pretrain="--total-steps 5000000".split(),
        de=[],
        finetune="--total-steps 1000000".split(),
        scratch_starts=25000,
        evaluate=[],
    ),
}


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


@dataclass
class Stage:
    id: str
    kind: str  # dataset, pretrain, attack, finetune, evaluate
    script: str
    argv: list
    deps: list
    env_id: str
    seed: int | None = None
    resume_file: str | None = None  # exists -> the stage continues with --resume
    fresh: list = field(default_factory=list)  # flags for a fresh start
    done_file: str | None = None  # for a dataset: exists (and resume_file does not) -> finished outside the study
    gpu: bool = False
    policy: dict | None = None  # evaluate stages: what the report needs to know of the policy
    ns: str = ""  # the scale's Minari namespace: markers and logs live in runs/_study/{ns}/


def env_short(env_id: str) -> str:
    return env_id.split("-")[0].lower()


def namespace(args: Args) -> str:
    """The scale's Minari namespace; a behaviour seed other than 1 gets its own datasets (suffix -b{seed})."""
    ns = SCALES[args.scale]["namespace"]
    return ns if args.behaviour_seed == 1 else f"{ns}-b{args.behaviour_seed}"


def run_tag(args: Args) -> str:
    """What names the study's runs and markers: the dataset namespace, plus the scale's tag where two scales share
    one dataset (decisive reuses medium's) so that their runs never collide."""
    tag = SCALES[args.scale].get("tag")
    return namespace(args) + (f"-{tag}" if tag else "")


def build_stages(args: Args, store: str) -> list:
    """The DAG in an order that finishes one (env, seed) chain before the next where the CPUs allow."""
    sc, ns, tag = SCALES[args.scale], namespace(args), run_tag(args)
    gpu = ["--cuda"] if args.cuda else ["--no-cuda"]
    track = ["--track"] if args.track else []
    workers = ["--num-workers", str(args.cpus_per_task)]
    stages = []
    for env_id in args.env_ids:
        dataset = f"{ns}/{env_short(env_id)}/medium-v0"
        ds = Stage(
            f"dataset:{env_id}",
            "dataset",
            "collect_dataset.py",
            ["--env-id", env_id, "--namespace", ns, "--seed", str(args.behaviour_seed), *sc["collect"], *gpu],
            [],
            env_id,
            resume_file=f"runs/collect_dataset__{ns}-{env_short(env_id)}-v0/state.pt",
            fresh=["--overwrite"],
            done_file=os.path.join(store, dataset),
        )
        stages.append(ds)
        for seed in args.seeds:
            run = f"runs/{tag}-{env_short(env_id)}-medium-v0__td3_bc_offline__{seed}"
            ckpt, npz = f"{run}/checkpoint.pt", f"{run}/perturbations.npz"
            pre = Stage(
                f"pretrain:{env_id}:{seed}",
                "pretrain",
                "td3_bc_offline.py",
                ["--dataset-id", dataset, "--seed", str(seed), "--run-name", run[5:], *sc["pretrain"], *gpu, *track],
                [ds.id],
                env_id,
                seed,
                resume_file=ckpt,
                fresh=["--overwrite"],
                gpu=args.cuda,
            )
            att = Stage(
                f"attack:{env_id}:{seed}",
                "attack",
                "de_perturbations.py",
                [
                    "--checkpoint",
                    ckpt,
                    "--output",
                    npz,
                    "--epsilon",
                    str(args.epsilon),
                    "--seed",
                    str(seed),
                    *sc["de"],
                    *workers,
                    *track,
                ],
                [pre.id],
                env_id,
                seed,
                resume_file=npz + ".state.npz",
                fresh=["--overwrite"] if args.overwrite else [],  # else an existing set is refused, never replaced
            )
            stages += [pre, att]
            policies = [(pre, run, {"init": "offline", "finetune_condition": "", "curriculum": ""})]
            specs = [("offline", c, "fixed") for c in args.finetune_conditions]
            specs += [
                ("offline", "adversarial", c) for c in args.curricula if ("offline", "adversarial", c) not in specs
            ]
            if args.scratch:
                specs.append(("scratch", "adversarial", "adaptive"))
            for init, cond, curr in specs:
                name = f"{tag}-{env_id}__td3_adv_finetune__{init}-{cond}-{curr}__{seed}"
                extra = ["--learning-starts", str(sc["scratch_starts"])] if init == "scratch" else []
                extra += ["--q", str(args.q)] if curr == "fixed" else []
                ft = Stage(
                    f"finetune:{env_id}:{seed}:{init}-{cond}-{curr}",
                    "finetune",
                    "td3_adv_finetune.py",
                    [
                        "--checkpoint",
                        ckpt,
                        "--perturbations",
                        npz,
                        "--seed",
                        str(seed),
                        "--run-name",
                        name,
                        "--init",
                        init,
                        "--finetune-condition",
                        cond,
                        "--curriculum",
                        curr,
                        *sc["finetune"],
                        *extra,
                        *gpu,
                        *track,
                    ],
                    [att.id],
                    env_id,
                    seed,
                    resume_file=f"runs/{name}/state.pt",
                    fresh=["--overwrite"],
                    gpu=args.cuda,
                )
                stages.append(ft)
                policies.append((ft, f"runs/{name}", {"init": init, "finetune_condition": cond, "curriculum": curr}))
            for st, run_dir, info in policies:
                out = f"runs/{tag}-study-eval/{os.path.basename(run_dir)}"
                stages.append(
                    Stage(
                        f"evaluate:{st.id}",
                        "evaluate",
                        "evaluate_matrix.py",
                        [
                            "--checkpoints",
                            f"{run_dir}/checkpoint.pt",
                            "--output-dir",
                            out,
                            *sc["evaluate"],
                            *(sc.get("scratch_evaluate", []) if info["init"] == "scratch" else []),
                            *workers,
                        ],
                        [st.id, att.id],
                        env_id,
                        seed,
                        policy={
                            "env_id": env_id,
                            "seed": seed,
                            "run_dir": run_dir,
                            "stage": st.kind,
                            "matrix": f"{out}/matrix.csv",
                            **info,
                        },
                    )
                )
    for s in stages:
        s.ns = tag
    return stages


# Running one stage (inside a Ray worker)
class StageKilled(Exception):
    """The stage's process died by a signal (out of memory, a killed node): Ray retries the task, which resumes."""


HEARTBEAT_S = 30.0  # how often a running stage's time so far is saved: a killed attempt loses at most this much


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process and of the children it has reaped (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name: field 3 (state) onwards
    except OSError:
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def attempts_path(log_path: str) -> str:
    return os.path.splitext(log_path)[0] + ".attempts.json"


def run_stage(
    cmd: list, resume_file: str | None, fresh: list, cwd: str, env: dict, log_path: str, heartbeat_s=HEARTBEAT_S
) -> dict:
    """Run one stage command to completion: --resume where it left resume state, else its fresh-start flags.

    Every attempt's wall and CPU time is kept in {log}.attempts.json, saved every heartbeat_s while it runs, so an
    attempt killed with its session (its resume state continues it later) still counts in what the stage cost."""
    flags = ["--resume"] if resume_file and os.path.exists(os.path.join(cwd, resume_file)) else fresh
    if cmd[1].endswith("collect_dataset.py") and flags == ["--resume"]:
        flags = ["--resume", "--overwrite"]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    attempts = []  # this stage's earlier attempts, killed with their sessions
    if os.path.exists(attempts_path(log_path)):
        with open(attempts_path(log_path)) as f:
            attempts = json.load(f)
    attempt = {"started": time.time(), "flags": flags, "wall_s": 0.0, "cpu_s": 0.0}
    attempts.append(attempt)
    cpu_before = children_cpu_seconds()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd + flags)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd + flags,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # no orphan outlives a killed study
        )
        while True:
            try:
                proc.wait(timeout=heartbeat_s)
                break
            except subprocess.TimeoutExpired:
                attempt["wall_s"] = time.time() - attempt["started"]
                attempt["cpu_s"] = cpu_seconds(proc.pid) or attempt["cpu_s"]
                write_json_atomic(attempts_path(log_path), attempts)
    attempt["wall_s"] = time.time() - attempt["started"]
    attempt["cpu_s"] = children_cpu_seconds() - cpu_before
    write_json_atomic(attempts_path(log_path), attempts)
    if proc.returncode < 0:
        raise StageKilled(f"{' '.join(cmd)} was killed by signal {-proc.returncode}")
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f.read().splitlines()[-200:] if ln.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
    return {
        "returncode": proc.returncode,
        "wall_s": sum(a["wall_s"] for a in attempts),
        "cpu_s": sum(a["cpu_s"] for a in attempts),
        "attempts": attempts,
        "flags": flags,
        "error": None if proc.returncode == 0 else error,
    }


# The driver
def marker_path(stage: Stage) -> str:
    return os.path.join("runs", "_study", stage.ns, stage.id.replace(":", "__") + ".json")


def log_path(stage: Stage) -> str:
    return os.path.join("runs", "_study", stage.ns, "logs", stage.id.replace(":", "__") + ".log")


def _json_or_raw(v):
    """Minari keeps its own metadata as plain values and ours JSON-encoded (collect_dataset.py)."""
    try:
        return json.loads(v) if isinstance(v, str) else v
    except json.JSONDecodeError:
        return v


def is_done(stage: Stage, cmd: list) -> bool:
    """Finished before: the study's marker with the same command, or a dataset in the store with no resume state."""
    path = marker_path(stage)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)["argv"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # a 0-byte or torn marker (a disk that filled)
            raise SystemExit(
                f"error: the marker of finished stage {stage.id} ({path}) is damaged ({type(e).__name__}); delete it "
                f"to run that stage again (its resume state, if any, continues it)"
            ) from None
        if saved != cmd[1:]:
            raise SystemExit(
                f"error: stage {stage.id} finished earlier with other arguments ({marker_path(stage)}); "
                f"pass --overwrite to redo it, or give this study another --scale or --results-dir"
            )
        return True
    if not (stage.done_file and os.path.isdir(stage.done_file) and not os.path.exists(stage.resume_file)):
        return False
    if "--strict-targets" in stage.argv:  # never take a weak policy's data for medium, whoever made it
        with open(os.path.join(stage.done_file, "data", "metadata.json")) as f:
            meta = {k: _json_or_raw(v) for k, v in json.load(f).items()}
        target = meta.get("target_return") or meta["collect_args"].get("medium_target_return")
        if target is None:
            from collect_dataset import EXPERT_RETURN

            target = EXPERT_RETURN[stage.env_id.split("-")[0]] / 3
        if meta["policy_eval_return"] < target:
            raise SystemExit(
                f"error: {stage.done_file} was collected by a policy with return {meta['policy_eval_return']:.1f}, "
                f"below the medium target {target:.1f}; delete it, or pass another --behaviour-seed"
            )
    return True


def provenance() -> dict:
    """What produced a chain: this code's git commit (+dirty if it has uncommitted changes) and the machine."""

    def git(*a):
        try:
            return subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    commit = git("rev-parse", "HEAD") or "unknown"
    return {
        "commit": commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
        "machine": f"{platform.node()} ({cpu or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores)",
    }


def chain_stages(stages: list, env_id: str, seed: int) -> list:
    """The stages of one (env, seed) chain: TD3+BC, DE, the fine-tunes and every policy's evaluation."""
    return [s for s in stages if s.env_id == env_id and s.seed == seed]


def export_chain(results_dir: str, env_id: str, seed: int, stages: list, cwd: str):
    """A finished (env, seed) chain's per-seed rows into {results_dir}/chains/: its evaluations and fine-tuning curves
    (the report's inputs) and its provenance (commit, machine, wall time of its stages), so that the chain can be
    committed as soon as it finishes and the report built from committed files alone."""
    from study_tools.loading import ReportError, load_runs
    from study_tools.tables import per_seed_tables

    mine = chain_stages(stages, env_id, seed)
    try:
        rows, curves, missing = load_runs({"policies": [s.policy for s in mine if s.policy]}, cwd)
    except ReportError as e:  # a damaged matrix.csv or log: its stage must run again
        raise SystemExit(f"error: chain {env_id} seed {seed} cannot be exported: {e}") from None
    if missing:
        return
    base = os.path.join(results_dir, "chains", f"{env_id}__seed{seed}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    evaluations, curve_table = per_seed_tables(rows, curves)
    write_text(f"{base}__evaluations.csv", evaluations)
    write_text(f"{base}__curves.csv", curve_table)
    markers = [json.load(open(marker_path(s))) for s in mine if os.path.exists(marker_path(s))]
    write_json_atomic(
        f"{base}.json",
        {
            "env_id": env_id,
            "seed": seed,
            **provenance(),
            "wall_s": sum(m["wall_s"] for m in markers),
            "cpu_s": sum(m["cpu_s"] for m in markers) if all("cpu_s" in m for m in markers) else None,
            "stages": len(markers),
            "started": min(m["started"] for m in markers),
            "finished": max(m["finished"] for m in markers),
        },
    )


def write_json_atomic(path: str, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


CONNECT_TIMEOUT_S = 10  # a cluster address that does not accept a connection within this is refused


def start_ray(args: Args):
    """A private Ray on this machine (address "local": never a head that happens to run here, such as a user's own
    `ray start --head`), or the cluster at --ray-address, which must answer within CONNECT_TIMEOUT_S. Ray 2.60's heads
    require a token by default: a driver that has one (RAY_AUTH_TOKEN, or ~/.ray/auth_token as `ray start` writes it)
    sends it."""
    if args.ray_address:  # read when ray is imported, so set first
        has_token = os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(os.path.expanduser("~/.ray/auth_token"))
        if has_token and "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    if not args.ray_address:
        ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=100 * 1024**2, **quiet)
        return ray
    if args.ray_address != "auto":
        host, _, port = args.ray_address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"error: nothing answers at --ray-address {args.ray_address} within {CONNECT_TIMEOUT_S} s "
                f"({type(e).__name__}); start the head there (`ray start --head --port PORT`) or fix the address "
                f"(HOST:PORT, or auto for a head on this machine)"
            ) from None
    stderr, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)  # Ray's C++ client logs each failed attempt (about 20) straight to fd 2: one line below instead
    joined = {}
    joining = threading.Thread(target=lambda: joined.update(error=join_ray(ray, args.ray_address, quiet)), daemon=True)
    joining.start()
    joining.join(args.ray_timeout)
    if joining.is_alive():  # a live TCP service that is not Ray: ray.init would wait forever; nothing was written yet
        os.dup2(stderr, 2)
        sys.stderr.write(
            f"error: {args.ray_address} accepts connections but did not answer as a Ray cluster within "
            f"{args.ray_timeout:g} s; check the address (the head's GCS port, default 6379), or raise --ray-timeout\n"
        )
        sys.stderr.flush()
        os._exit(1)  # the joining thread cannot be stopped, and Ray's exit handlers would wait on it
    try:
        if joined["error"] is not None:
            raise joined["error"]
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SystemExit(
            f"error: could not join the Ray cluster at {args.ray_address} ({first}); if it uses token authentication "
            f"(Ray's default), give this machine the head's token (`ray get-auth-token` there; RAY_AUTH_TOKEN or "
            f"~/.ray/auth_token here)"
        ) from None
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(sink)
    return ray


def join_ray(ray, address: str, quiet: dict) -> Exception | None:
    """ray.init(address): None once joined, else the exception it raised."""
    try:
        ray.init(address=address, **quiet)
    except Exception as e:  # noqa: BLE001 (start_ray names it in one line)
        return e
    return None


def main(args: Args) -> int:
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
    name = args.study_name or os.path.basename(os.path.normpath(results_dir))
    cwd = os.getcwd()
    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.expanduser("~/.minari/datasets")
    stages = build_stages(args, store)
    by_id = {s.id: s for s in stages}
    cmds = {s.id: [sys.executable, os.path.join(HERE, s.script), *s.argv] for s in stages}
    if args.dry_run:
        for s in stages:
            print(f"{s.id}  <-  {', '.join(s.deps) or '-'}\n    {' '.join(cmds[s.id][1:])}")
        return 0
    manifest = {
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

    ray = start_ray(args)  # before anything is written or removed: a cluster that does not answer leaves no trace
    done = set() if args.overwrite else {s.id for s in stages if is_done(s, cmds[s.id])}
    if args.overwrite:
        for s in stages:
            for path in (marker_path(s), attempts_path(log_path(s))):
                if os.path.exists(path):
                    os.remove(path)

    env = {
        "OMP_NUM_THREADS": str(args.cpus_per_task),
        "MKL_NUM_THREADS": str(args.cpus_per_task),
        "PYTHONUNBUFFERED": "1",
        "WANDB_RUN_GROUP": name,
    }
    if "MINARI_DATASETS_PATH" in os.environ:
        env["MINARI_DATASETS_PATH"] = os.environ["MINARI_DATASETS_PATH"]
    for env_id, seed in sorted({(s.env_id, s.seed) for s in stages if s.seed is not None}):
        if all(s.id in done for s in chain_stages(stages, env_id, seed)) and not os.path.exists(
            os.path.join(results_dir, "chains", f"{env_id}__seed{seed}.json")
        ):
            # finished by a driver that was stopped before exporting
            export_chain(results_dir, env_id, seed, stages, cwd)
    write_json_atomic(os.path.join(results_dir, "study.json"), manifest)  # before any stage: a partial study reports
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
        finished, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
        for ref in finished:
            s, t0 = running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # the worker died more than --max-retries times
                res = {
                    "returncode": -1,
                    "wall_s": time.time() - t0,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                }
            bar.update(1)
            if res["returncode"] == 0:
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
            else:
                failed[s.id] = res["error"]
                tqdm.write(f"FAILED  {s.id}  ({res['wall_s']:.1f} s): {res['error']}")
        status()
    bar.close()
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
