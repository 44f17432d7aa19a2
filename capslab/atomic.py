"""Files written whole: each goes to a temporary beside its target, then is renamed into place.
It imports no torch, so the light tools that write records (tools/bench_against.py) start at
once."""

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path`, then rename it into place: a crash, a full disk
    or a Ctrl-C midway leaves any earlier `path` whole, and no temporary behind. The bytes
    reach the disk before the rename, and the rename before this returns, so a power cut
    leaves the old file or the new one, never an empty one."""
    temporary = temporary_path(path)
    try:
        write(temporary)
        sync(temporary)
        os.replace(temporary, path)
        sync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def sync(path: Path) -> None:
    """fsync a file, or a folder's entries where the system allows it (not on Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # Windows opens no folder
        raise
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: one name per file, so no pile-up."""
    return path.with_name(f".{path.name}.tmp")


def remove_temporaries(folder: Path) -> None:
    """Delete the temporaries that a killed writer left in `folder`."""
    for stale in folder.glob(temporary_path(Path("*")).name):
        stale.unlink(missing_ok=True)
