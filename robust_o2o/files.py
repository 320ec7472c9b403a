"""Atomic writes (a temporary file beside the target, fsync, rename), so a crash or a full disk never leaves half a
file; files identified by content (sha256)."""

import hashlib
import io
import os
import pickletools
import zipfile

import numpy as np
import torch

from robust_o2o.cli import UserError, io_failure


def _atomic(path: str, write):
    """write(file) into a temporary file beside `path` (unique to this process), fsync, then rename over `path`. A
    failure (a full disk, a read-only folder) leaves `path` as it was and ends in one line (UserError)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = e.filename or tmp
        raise UserError(f"could not write {path}: {io_failure(e)}") from None
    finally:
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
        except OSError:
            pass


# what torch.load(weights_only=True) reads back: exactly these types (a numpy scalar is not one, though np.float64
# subclasses float), tensors, and dicts, lists and tuples of them
SAFE_VALUES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def unsafe_value(value, key: str = "") -> tuple[str, str] | None:
    """The first value under `value` that torch.load(weights_only=True) would refuse: (its key path, its type), or
    None."""
    if isinstance(value, torch.Tensor) or type(value) in SAFE_VALUES:
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{key}/{k}" if key else str(k)
            found = unsafe_value(k, path + " (a key)") if type(k) not in (str, int) else unsafe_value(v, path)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((f for i, v in enumerate(value) if (f := unsafe_value(v, f"{key}[{i}]"))), None)
    kind = type(value)
    return key or "(the checkpoint)", f"{kind.__module__}.{kind.__qualname__}"


def save_checkpoint(path: str, ckpt: dict):
    """Atomic: a temporary file next to `path`, fsync, then rename over it. Serialized in memory first, so that a full
    disk fails in the file write (an OSError, one line) and not inside torch's zip writer (a RuntimeError). A value
    that would not load with weights_only=True (a numpy scalar, say, from a fork's np.cos) is refused before anything
    is written, naming its key and type: every reader loads with weights_only=True."""
    found = unsafe_value(ckpt)
    if found:
        raise UserError(
            f"cannot save {path}: '{found[0]}' is a {found[1]}, which torch.load(weights_only=True) does not read; "
            f"store a Python number (float(x), int(x)), a str, a list or a tensor instead"
        )
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    _atomic(path, lambda f: f.write(buffer.getbuffer()))


def write_text(path: str, text: str):
    """Atomic text write (tables, CSV)."""
    _atomic(path, lambda f: f.write(text.encode()))


def save_npz(path: str, arrays: dict):
    """Atomic write: a temporary file beside `path` (unique to this process), fsync, then rename. Strings are stored as
    unicode arrays, so the file loads with allow_pickle=False."""
    _atomic(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def sha256_file(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_recorded_set(path: str, recorded_sha256: str, who: str):
    """A δ set a checkpoint or state records is read only if it is that very file: its sha256 must be the one recorded
    (a set made again, e.g. by de_perturbations.py run with another --de-seed, is another set under the same name)."""
    actual = sha256_file(path)
    if actual != str(recorded_sha256):
        raise UserError(
            f"{path} is not the δ set {who} recorded: its sha256 is {actual[:16]}…, the record says "
            f"{str(recorded_sha256)[:16]}… (the file was made again since); restore that set, or fine-tune anew "
            f"against this one (td3_adv_finetune.py)"
        )


NPZ_MAX_BYTES = 256 * 1024**2  # this project's .npz files hold kilobytes to megabytes: far more is not one of them


def read_npz(path: str) -> dict:
    """The arrays of an .npz (allow_pickle=False). The zip's directory is read first: entries that are not .npy
    arrays, or that would inflate past NPZ_MAX_BYTES together (a zip bomb: 8 MB that deflate to 8 GiB), are refused
    (ValueError) before anything is decompressed."""
    with np.load(path, allow_pickle=False) as f:
        entries = f.zip.infolist()
        odd = next((e.filename for e in entries if not e.filename.endswith(".npy")), None)
        if odd is not None or sum(e.file_size for e in entries) > NPZ_MAX_BYTES:
            size = sum(e.file_size for e in entries)
            raise ValueError(f"entry {odd} is no array" if odd else f"its arrays would inflate to {size} bytes")
        return {k: f[k] for k in f.files}


def recreate(stage) -> str:
    """The fix for a bad checkpoint: the script that wrote it (its recorded stage: a fork records its own name)."""
    if isinstance(stage, str) and stage.isidentifier():
        return f"re-create it with `python {stage}.py`, the script that wrote it"
    return "re-create it with the script that wrote it (td3_bc_offline.py or td3_adv_finetune.py)"


def recorded_stage(path: str) -> str | None:
    """The 'stage' a checkpoint that torch.load(weights_only=True) refuses says it was written by, read from the
    pickle's opcodes without running any of them (pickletools), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            if z.getinfo(name).file_size > 16 * 1024**2:
                return None
            strings = [arg for _, arg, _ in pickletools.genops(z.read(name)) if isinstance(arg, str)]
        return next((value for key, value in zip(strings, strings[1:]) if key == "stage"), None)
    except Exception:
        return None
