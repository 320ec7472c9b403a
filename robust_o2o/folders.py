"""Who owns a run folder: the lock that makes runs/{name}/ one process's, the earlier run that --overwrite moves aside,
and what dead writers left (temporary files of interrupted atomic writes, a folder that holds only its lock)."""

import atexit
import fcntl
import os
import time

from robust_o2o.cli import UserError

_LOCKED = {}  # run folder -> its open, locked .lock file (held for the life of this process)


def move_old_run_aside(run_dir: str) -> str | None:
    """--overwrite: everything in `run_dir` but the lock this process holds (the earlier run's checkpoint, state, logs,
    and files made beside it such as its perturbations.npz) moves, whole, to runs/{name}.replaced-{time}/, so nothing
    of it mixes with the new run's files and nothing of it is lost if the new run dies. -> where it went (or None)"""
    names = [name for name in os.listdir(run_dir) if name != ".lock"]
    if not names:
        return None
    aside = f"{os.path.normpath(run_dir)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.makedirs(aside)
    for name in names:
        os.rename(os.path.join(run_dir, name), os.path.join(aside, name))
    print(f"--overwrite: the earlier run in {run_dir} moved to {aside} (delete it once the new run is what you want)")
    return aside


def lock_run_dir(run_dir: str):
    """Create `run_dir` and own it while this process lives: an OS lock (flock) on run_dir/.lock, which the kernel
    releases when the process dies, kill -9 included, so no stale lock survives. Another process asking for the same
    folder is refused in one line. Re-entrant within one process."""
    key = os.path.realpath(run_dir)
    if key in _LOCKED:
        return
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise UserError(
            f"{run_dir} is in use by another running process (pid {owner}); wait for it to end, or pass "
            f"another --run-name"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKED[key] = f
    remove_dead_writers_files(run_dir)
    atexit.register(release_if_empty, run_dir)


def remove_dead_writers_files(run_dir: str):
    """Temporary files of atomic writes whose writer died mid-write (`kill -9`): `checkpoint.pt.{pid}.tmp`."""
    for name in os.listdir(run_dir):
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[2] == "tmp" and parts[1].isdigit() and not pid_alive(int(parts[1])):
            os.remove(os.path.join(run_dir, name))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def release_if_empty(run_dir: str):
    """At exit: a run folder that holds nothing but its lock (a run refused or failed before writing) is removed."""
    try:
        if os.listdir(run_dir) == [".lock"]:
            os.remove(os.path.join(run_dir, ".lock"))
            os.rmdir(run_dir)
    except OSError:
        pass
