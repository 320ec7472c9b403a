"""Wall time of a small study through Ray (study.py) against the same stage commands run one after another.

    python benchmarks/study_ray.py    # tiny scale, 2 seeds, normal + adversarial + scratch: ~6 min (2 cores)
    python benchmarks/study_ray.py --seeds 1 2 3    # a bigger grid

Both runs start from nothing in their own throwaway folder and Minari store, and run the identical commands (the
sequential one takes them from study.build_stages in its DAG order, with the same one-thread-per-stage setting).
Prints a Markdown table with the machine named.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import study  # noqa: E402


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    grid = [
        "--scale",
        a.scale,
        "--seeds",
        *map(str, a.seeds),
        "--finetune-conditions",
        "normal",
        "adversarial",
        "--curricula",
        "adaptive",
        "--no-report",
    ]
    args = study.Args(
        scale=a.scale,
        seeds=tuple(a.seeds),
        finetune_conditions=("normal", "adversarial"),
        curricula=("adaptive",),
        report=False,
    )
    times = {}
    for mode in ("sequential", "ray"):
        work = Path(tempfile.mkdtemp(prefix=f"study-bench-{mode}-"))
        env = {
            **os.environ,
            "MINARI_DATASETS_PATH": str(work / "minari"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        t0 = time.time()
        if mode == "ray":
            proc = subprocess.run(
                [sys.executable, str(ROOT / "study.py"), *grid], cwd=work, env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"error: the study failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        else:
            for s in study.build_stages(args, str(work / "minari")):
                proc = subprocess.run(
                    [sys.executable, str(ROOT / s.script), *s.argv, *s.fresh],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    sys.exit(f"error: {s.id} failed:\n{proc.stderr[-2000:]}")
        times[mode] = time.time() - t0
        shutil.rmtree(work, ignore_errors=True)
        print(f"{mode}: {times[mode]:.1f} s", flush=True)
    n = len(study.build_stages(args, ""))
    print(
        f"\nMachine: {cpu_name()}, {os.cpu_count()} cores; {n} stages ({a.scale} scale, seeds "
        f"{' '.join(map(str, a.seeds))}), "
        f"one torch thread per stage.\n"
    )
    print("| runner | wall time | speed-up |\n|---|---|---|")
    print(f"| stages one after another | {times['sequential']:.1f} s | 1.00× |")
    print(
        f"| `study.py` on local Ray ({os.cpu_count()} CPUs, 1 per stage) | {times['ray']:.1f} s | "
        f"{times['sequential'] / times['ray']:.2f}× |"
    )


if __name__ == "__main__":
    main()
