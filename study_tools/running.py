"""Running a study's stages: each stage a subprocess in a Ray task (its CPU time, heartbeat, log and done-marker), the
checks that a finished stage's outputs are whole, each finished chain's rows and provenance exported for committing,
and starting or joining Ray."""

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time

from robust_o2o.cli import die_with_parent
from robust_o2o.files import write_text
from study_tools.grid import Stage

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the stage scripts


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


def start_ray(args):
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
