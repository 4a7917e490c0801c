"""The one rule for every file a command writes (bench, sass --json, bench/gpu.sh through
bench/gpu_report.py): replace only a regular file, or create a new one. No torch import here:
gpu_report.py loads this file by its path, without importing the package."""

from __future__ import annotations

import os
import stat


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_output_file(path: str) -> str:
    """The real path a command may write `path` through: absent (its folder may be made) or a regular
    file. A device, FIFO, socket or directory is refused before any work starts: writers replace
    their file atomically, which would put a regular file in place of /dev/null. ValueError if not."""
    real = os.path.realpath(path)  # a symlink to a regular file: write the file it names
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        folder = os.path.dirname(real)
        while not os.path.exists(folder):  # the nearest existing ancestor must be a folder
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"{path}: {folder} is not a directory") from None
        return real
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_kind(mode)}; only a regular file (or a new one) may be written")
    return real


def replace_file(path: str, data: bytes | str) -> None:
    """Write `data` to `path` atomically (a reader, or a kill, never sees half a file), under
    check_output_file's rule, checked again here: the path may have changed since the arguments."""
    real = check_output_file(path)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    tmp = f"{real}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
