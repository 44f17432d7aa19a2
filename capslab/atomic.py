"""Files written whole: each goes to a temporary beside its target, then is renamed into place.
It imports no torch, so the light tools that write records (tools/bench_against.py) start at
once."""

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path`, then rename it into place: a crash, a full disk
    or a Ctrl-C midway leaves any earlier `path` whole, and no temporary behind."""
    temporary = temporary_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: one name per file, so no pile-up."""
    return path.with_name(f".{path.name}.tmp")


def remove_temporaries(folder: Path) -> None:
    """Delete the temporaries that a killed writer left in `folder`."""
    for stale in folder.glob(temporary_path(Path("*")).name):
        stale.unlink(missing_ok=True)
