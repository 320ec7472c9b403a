"""Run whole (env, seed) chains of a running study on a lent GPU machine, without Ray, and hand them back to it.

A study's protocol does not change with the hardware (docs/protocol.md), but its stages may run elsewhere. Ray does
not fit in what travels to the lent machine, so this script runs one chain's stage commands itself, in dependency
order, straight from the study's manifest (study.json's `commands`, the exact argv the study would run):

  TD3+BC  ->  DE attack  ->  the offline policy's evaluation and every fine-tune (at once)  ->  fine-tune evaluations

Two changes make a stage fit the lent machine, and both are recorded beside its result: training stages run
`--cuda --cudagraphs` instead of `--no-cuda` (the CUDA-graph update agrees with eager: tests/test_fast_path.py), and
DE and evaluation stages get more `--num-workers` (a speed knob: resumes ignore it). A stage still running at
`--deadline` is stopped and left to the study; every finished stage's files come back.

On the lent machine, from a copy of the study's pinned commit (the manifest's `commit`):
    python3 benchmarks/device_chains.py run --manifest study.json --seeds 19 20 --out $OUT
Here, once its files are back (writes each finished stage's files and the study's marker, which the driver reads at
start as "done"; the marker also says where the stage ran and with which argv):
    python3 benchmarks/device_chains.py adopt --files DIR --runs-root /work/study-100k --manifest study.json
A smoke run on CPU with tiny budgets, which `adopt` refuses: `run ... --no-gpu --smoke` (tests/test_device_chains.py
checks the orchestration with stub stage scripts instead, in seconds)."""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time

PART_BYTES = 15 * 1024**2  # the lent machine returns files of at most 16 MiB


def stage_ids(commands: dict, env_id: str, seed: int) -> dict:
    """The chain's stage ids by role: pretrain, attack, evaluations and fine-tunes (as study.py names them)."""
    tail = f"{env_id}:{seed}"
    finetunes = sorted(k for k in commands if k.startswith(f"finetune:{tail}:"))
    return {
        "pretrain": f"pretrain:{tail}",
        "attack": f"attack:{tail}",
        "finetunes": finetunes,
        "evaluations": [f"evaluate:pretrain:{tail}"] + [f"evaluate:{k}" for k in finetunes],
    }


def replace_flag(argv: list, flag: str, value: str) -> list:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def argv_to_run(stage_id: str, argv: list, gpu: bool, workers: int, smoke: bool) -> list:
    """The study's argv for this stage, as it runs here: the script by its name in this checkout, CUDA for training
    on a GPU, more DE/evaluation workers, and (--smoke) tiny budgets."""
    argv = [os.path.basename(argv[0]), *argv[1:]]
    kind = stage_id.split(":")[0]
    if gpu and kind in ("pretrain", "finetune"):
        argv = [a for a in argv if a not in ("--no-cuda", "--cuda")] + ["--cuda", "--cudagraphs"]
    if "--num-workers" in argv:
        argv = replace_flag(argv, "--num-workers", str(workers))
    if smoke:
        if kind in ("pretrain", "finetune"):
            argv = replace_flag(argv, "--total-steps", "400")
            argv = replace_flag(argv, "--eval-freq", "200")
            argv = replace_flag(argv, "--eval-episodes", "1")
        elif kind == "attack":
            argv += ["--num-perturbations", "2", "--popsize", "4", "--maxiter", "2", "--eval-episodes", "1"]
            argv = replace_flag(argv, "--de-episodes", "1") + ["--random-draws", "2"]
        else:
            argv += ["--eval-episodes", "1", "--attack-maxiter", "1", "--attack-popsize", "4"]
            argv += ["--attack-num-perturbations", "1"]
    return argv


def outputs(stage_id: str, argv: list) -> list:
    """What a finished stage leaves that the study reads later (never resume state, never a lock)."""
    kind = stage_id.split(":")[0]
    if kind == "attack":
        out = argv[argv.index("--output") + 1]
        return [out, out.replace(".npz", ".png")]
    if kind == "evaluate":
        return sorted(glob.glob(os.path.join(argv[argv.index("--output-dir") + 1], "*")))
    run_dir = os.path.join("runs", argv[argv.index("--run-name") + 1])
    return [os.path.join(run_dir, name) for name in ("args.json", "checkpoint.pt", "metrics.jsonl")]


class Chains:
    """Runs the chains' stages as subprocesses and records each one's argv, wall time and exit code."""

    def __init__(self, commands: dict, args):
        self.commands, self.args = commands, args
        self.t0 = time.time()
        self.records, self.procs, self.lock = {}, set(), threading.Lock()
        os.makedirs(args.logs, exist_ok=True)

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.t0)

    def stage(self, stage_id: str, workers: int = 1) -> bool:
        """Run one stage to completion (or until the deadline): whether it finished with exit code 0."""
        study_argv = self.commands[stage_id]
        argv = argv_to_run(stage_id, study_argv, self.args.gpu, workers, self.args.smoke)
        threads = str(workers if stage_id.startswith(("attack", "evaluate")) else 1)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        log = os.path.join(self.args.logs, stage_id.replace(":", "__") + ".log")
        started = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs.add(proc)
            try:
                code = proc.wait(timeout=max(1.0, self.left()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        record = {
            "argv": study_argv,
            "argv_ran": argv,
            "returncode": code,
            "wall_s": time.time() - started,
            "started": started,
            "finished": time.time(),
        }
        with self.lock:
            self.records[stage_id] = record
        print(f"{'done  ' if code == 0 else 'FAILED'}  {stage_id}  ({record['wall_s']:.1f} s)", flush=True)
        return code == 0

    def chain(self, env_id: str, seed: int):
        ids = stage_ids(self.commands, env_id, seed)
        if not (self.stage(ids["pretrain"]) and self.stage(ids["attack"], workers=self.args.attack_workers)):
            return
        evaluations = dict(zip([ids["pretrain"], *ids["finetunes"]], ids["evaluations"]))

        def train_then_evaluate(train_id: str):
            trained = train_id == ids["pretrain"] or self.stage(train_id)
            # an evaluation starts only if it can finish before the deadline
            if trained and self.left() > self.args.eval_estimate:
                self.stage(evaluations[train_id], workers=self.args.eval_workers)

        branches = [threading.Thread(target=train_then_evaluate, args=(k,)) for k in evaluations]
        for t in branches:
            t.start()
        for t in branches:
            t.join()


def pack(records: dict, commands: dict, out: str):
    """Each finished stage's outputs into {out}/stages.tgz (split into parts of at most 15 MiB), its record into
    {out}/stages.json."""
    done = [k for k, r in records.items() if r["returncode"] == 0]
    path = os.path.join(out, "stages.tgz")
    with tarfile.open(path, "w:gz") as tar:
        for stage_id in done:
            for f in outputs(stage_id, commands[stage_id]):
                if os.path.exists(f):
                    tar.add(f)
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    for i in range(0, len(data), PART_BYTES):
        with open(f"{path}.part{i // PART_BYTES}", "wb") as part:
            part.write(data[i : i + PART_BYTES])
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump(records, f, indent=1)


def machine() -> str:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    gpu = ""
    try:
        import torch

        gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        gpu += f", torch {torch.__version__}"
    except ImportError:
        pass
    return f"{platform.node()} ({cpu or 'unknown CPU'}, {os.cpu_count()} cores{gpu})"


def run(args) -> int:
    with open(args.manifest) as f:
        manifest = json.load(f)
    commands = manifest["commands"]
    env_id = args.env_id or manifest["env_ids"][0]
    chains = Chains(commands, args)
    threads = [threading.Thread(target=chains.chain, args=(env_id, s)) for s in args.seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.makedirs(args.out, exist_ok=True)
    where = {"ran_on": machine(), "manifest_commit": manifest["commit"], "smoke": args.smoke}
    records = {k: {**r, **where} for k, r in chains.records.items()}
    pack(records, commands, args.out)
    with tarfile.open(os.path.join(args.out, "logs.tgz"), "w:gz") as tar:
        tar.add(args.logs, arcname="logs")
    finished = sum(r["returncode"] == 0 for r in records.values())
    print(f"{finished} of {len(records)} stages finished in {time.time() - chains.t0:.0f} s; files in {args.out}")
    return 0


def adopt(args) -> int:
    """Unpack the finished stages into the study's runs root and write the study's marker for each: the driver then
    skips them at its next start. Refuses a stage the study already finished or holds files for."""
    with open(os.path.join(args.files, "stages.json")) as f:
        records = {k: r for k, r in json.load(f).items() if r["returncode"] == 0}
    with open(args.manifest) as f:
        manifest = json.load(f)
    markers = os.path.join(args.runs_root, "runs", "_study", manifest["namespace"])
    for stage_id, record in records.items():
        if record["smoke"]:
            raise SystemExit("error: these stages ran with --smoke budgets; a study adopts only real runs")
        if record["argv"] != manifest["commands"][stage_id]:
            raise SystemExit(f"error: {stage_id} ran another command than this manifest's; pass the study's manifest")
        marker = os.path.join(markers, stage_id.replace(":", "__") + ".json")
        if os.path.exists(marker):
            raise SystemExit(f"error: the study already finished {stage_id} ({marker}); adopt nothing twice")
    parts = sorted(glob.glob(os.path.join(args.files, "stages.tgz.part*")), key=lambda p: int(p.rsplit("part", 1)[1]))
    os.makedirs(markers, exist_ok=True)
    joined = os.path.join(markers, "device-stages.tgz")
    with open(joined, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                out.write(f.read())
    with tarfile.open(joined) as tar:
        clashes = [
            m.name for m in tar.getmembers() if m.isfile() and os.path.exists(os.path.join(args.runs_root, m.name))
        ]
        if clashes:
            raise SystemExit(f"error: {clashes[0]} exists in {args.runs_root}; move it away or adopt into another root")
        tar.extractall(args.runs_root, filter="data")
    os.remove(joined)
    for stage_id, record in records.items():
        marker = {**record, "flags": []}
        for key in ("returncode", "smoke"):
            marker.pop(key)
        with open(os.path.join(markers, stage_id.replace(":", "__") + ".json"), "w") as f:
            json.dump(marker, f, indent=1)
        print(f"adopted {stage_id}  ({record['wall_s']:.1f} s on {record['ran_on']})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the chains' stages here")
    r.add_argument("--manifest", required=True, help="the study's study.json")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--env-id", default=None, help="default: the manifest's first")
    r.add_argument("--out", required=True, help="where stages.json, stages.tgz.part* and logs.tgz go")
    r.add_argument("--logs", default="runs/_device_logs")
    r.add_argument("--deadline", type=float, default=540.0, help="seconds; stages still running then are stopped")
    r.add_argument("--eval-estimate", type=float, default=240.0, help="an evaluation starts only with this much left")
    r.add_argument("--attack-workers", type=int, default=6)
    r.add_argument("--eval-workers", type=int, default=2)
    r.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True, help="training stages on CUDA")
    r.add_argument("--smoke", action="store_true", help="tiny budgets (a test of this script, not of the study)")
    a = sub.add_parser("adopt", help="hand the finished stages to the study here")
    a.add_argument("--files", required=True, help="the folder holding what `run` wrote to --out")
    a.add_argument("--runs-root", required=True, help="the study's working directory (its manifest's runs_root)")
    a.add_argument("--manifest", required=True, help="the study's study.json")
    args = p.parse_args(argv)
    return run(args) if args.command == "run" else adopt(args)


if __name__ == "__main__":
    sys.exit(main())
