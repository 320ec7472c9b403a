"""The scripts' entry point and the errors a user can fix: one `error:` line and a non-zero exit, never a traceback."""

import ctypes
import dataclasses
import math
import os
import signal
import sys
import typing

import tyro


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one line and exit non-zero."""


def io_failure(e: OSError) -> str:
    """One line for a failed read or write: what failed, that what was saved before is intact, and how to go on."""
    return (
        f"{e.strerror or type(e).__name__} on {e.filename or 'a file'}: stopped; whatever was saved before is intact "
        f"(checkpoints and state are written atomically), so free disk space or fix the folder's permissions, then "
        f"rerun with --resume"
    )


INT_MAX = 2**31 - 1  # every int flag stays below it: seeds (plus their offsets) must fit numpy's 32-bit seeds


class Range:
    """A field's valid values, declared next to it: `x: Annotated[float, Range(0, 1)] = 0.5`. Bounds are inclusive
    unless `open` names them ("lo", "hi"); every number must also be finite, every int at most INT_MAX; a tuple is
    checked element by element."""

    def __init__(self, lo=None, hi=None, open: str = ""):
        self.lo, self.hi, self.open = lo, hi, open

    def ok(self, x) -> bool:
        if isinstance(x, (tuple, list)):
            return all(self.ok(v) for v in x)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        if isinstance(x, int) and abs(x) > INT_MAX:
            return False
        lo_ok = self.lo is None or (x > self.lo if "lo" in self.open else x >= self.lo)
        hi_ok = self.hi is None or (x < self.hi if "hi" in self.open else x <= self.hi)
        return lo_ok and hi_ok

    def __str__(self):
        if self.lo is None and self.hi is None:
            return "a finite number"
        if self.hi is None:
            return f"{'>' if 'lo' in self.open else '>='} {self.lo}"
        return f"in {'(' if 'lo' in self.open else '['}{self.lo}, {self.hi}{')' if 'hi' in self.open else ']'}"


def check_ranges(args):
    """Every field with a declared Range holds a value inside it (None, where allowed, means unset), before anything
    runs."""
    hints = typing.get_type_hints(type(args), include_extras=True)
    for f in dataclasses.fields(args):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            value = getattr(args, f.name)
            if isinstance(meta, Range) and value is not None and not meta.ok(value):
                flag = f"--{f.name.replace('_', '-')}"
                if isinstance(value, int) and abs(value) > INT_MAX:
                    raise UserError(f"{flag} must be at most {INT_MAX} in size (got {value})")
                if not Range().ok(value):
                    raise UserError(f"{flag} must be a finite number (got {value})")
                raise UserError(f"{flag} must be {meta} (got {value})")


def check_name(value: str | None, flag: str, store: str):
    """A name that becomes a path inside `store` (a run name under runs/, a Minari namespace) must stay inside it."""
    if value is None:
        return
    if any(not ch.isprintable() for ch in value):  # a newline would split every line that names the run in two
        raise UserError(f"{flag} {value!r} holds a control character; use plain names (letters, digits, '-', '_')")
    parts = value.replace("\\", "/").split("/")
    if not value or os.path.isabs(value) or any(p in ("", ".", "..") for p in parts):
        raise UserError(
            f"{flag} '{value}' would leave {store}: use plain names (letters, digits, '-', '_'), "
            f"without '..', empty parts or a leading '/'"
        )


def die_with_parent():
    """In a child process, before it runs (`preexec_fn`): on Linux it gets SIGKILL when the process that started it
    dies, so a killed study or matrix leaves no stage or attack running and writing beside a rerun."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def close_progress_bars():
    """Erase the open tqdm bars, so an error line starts a line of its own and no bar is drawn after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def cli(main, args_type):
    """The scripts' entry point: parse `args_type` with tyro and run `main`; a problem the user can fix (a UserError, or
    an OSError such as a full disk outside the atomic saves) ends in one `error:` line and a non-zero exit."""

    try:
        main(tyro.cli(args_type))
    except UserError as e:
        close_progress_bars()
        sys.exit(f"error: {e}")
    except OSError as e:
        close_progress_bars()
        sys.exit(f"error: {io_failure(e)}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the atomic saves left the last state whole
        close_progress_bars()
        sys.stderr.write("error: interrupted: what was saved is intact; rerun (with --resume where it applies)\n")
        sys.exit(130)
