"""Run folders: where they go, how they are named, and files written so that a reader never sees half of one.

    <output_path>/<prefix>-<date>-<time>-<random>/
        args.json  metrics.json  latents.npz  grid.png  sample_<i>/step_<k>.png
"""
import io
import json
import os
import secrets
import time
import zipfile

import numpy as np
from PIL import Image

from .errors import UsageError, cannot_write

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_output_path(path):
    """Fail before sampling if run folders cannot be created under path."""
    if not path or not path.strip():
        raise UsageError("--output_path must not be empty")
    _, probe = missing_folders(path)
    if os.path.islink(probe) and not os.path.exists(probe):
        raise UsageError(f"--output_path {path}: {probe} is a symbolic link to nothing (or a loop of links)")
    if not os.path.isdir(probe) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise UsageError(f"--output_path is not a folder: {path}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--output_path is not writable: {path}")
    # the run folder's name adds ~30 characters; the file system's limits, checked here rather than after loading
    name_max, path_max = _limit(probe, "PC_NAME_MAX", 255), _limit(probe, "PC_PATH_MAX", 4096)
    full = os.path.join(os.path.abspath(path), "x" * 64)
    if len(full.encode()) >= path_max or any(len(part.encode()) > name_max for part in full.split(os.sep)):
        raise UsageError(f"--output_path is too long for the file system (a folder name over {name_max} bytes or "
                         f"a path over {path_max}): {path[:60]}...")


def missing_folders(path):
    """(the folders of path that do not exist yet, the deepest first; the nearest one that does exist)."""
    missing, probe = [], os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    return missing, probe


def _limit(path, name, default):
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def create_run_dir(output_path, prefix):
    """A new folder <prefix>-<date>-<time>-<random>: two runs started in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    missing, _ = missing_folders(output_path)  # the folders this call creates
    try:
        os.makedirs(output_path, exist_ok=True)
        while True:
            path = os.path.join(output_path, f"{prefix}-{stamp}-{secrets.token_hex(3)}")
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                continue
    except OSError as e:  # checked before loading, but the file system can change (or fill up) meanwhile
        for folder in missing:  # no empty folders left behind
            try:
                os.rmdir(folder)
            except OSError:
                pass
        raise UsageError(f"--output_path {output_path}: cannot create a run folder ({e.strerror or e})") from None


def upscale(img, min_side=64):
    """Integer nearest upscaling so that tiny images (the 8x8 digits) can be looked at."""
    k = max(1, -(-min_side // min(img.shape[:2])))
    return img.repeat(k, 0).repeat(k, 1) if k > 1 else img


def write_atomic(path, write):
    """write(tmp_path) then rename: an interrupted run never leaves a half-written file under the real name."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a signal or an error mid-write leaves no temporary file behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk: one line naming the file, not an "unexpected" OSError
            raise cannot_write(path, e) from None
        raise


def save_png(img, path):
    write_atomic(path, lambda p: Image.fromarray(upscale(img)).save(p))


def save_json(obj, path, default=None):
    """obj as JSON, written whole or not at all (write_atomic); default: json.dump's, for values it cannot write."""
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1, default=default)
    write_atomic(path, write)


def save_npz(path, **arrays):
    """Like np.savez, but byte-identical for identical arrays (fixed zip timestamps)."""
    def write(p):
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as z:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    write_atomic(path, write)


def portable(value):
    """Paths inside this repository (the embedded defaults) are recorded relative to it, never as this
    machine's absolute path."""
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(REPO_ROOT + os.sep):
        return os.path.relpath(value, REPO_ROOT)
    return value


def save_args(args, run_dir):
    """The flags (names starting with _ are the scripts' own bookkeeping, e.g. presets.apply_preset's, not flags)."""
    save_json({k: portable(v) for k, v in vars(args).items() if not k.startswith("_")},
              os.path.join(run_dir, "args.json"))
