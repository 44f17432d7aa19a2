"""Where the model runs: device choice, and the CPU allocator setting that training relies on."""

import ctypes
import sys

import torch

from errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, present in available.items() if present))
    if requested not in available:
        raise UserError(f"unknown device {requested!r}: choose {', '.join(DEVICES)}")
    if not available[requested]:
        raise UserError(f"device {requested!r} is not available on this machine")
    return torch.device(requested)


def keep_freed_memory() -> None:
    """On Linux (glibc), keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees tensors of 50 MB and more (Conv1's output is 52 MB at
    batch 128). By default glibc maps each of those afresh and unmaps it on free, so every
    step page-faults them in again. results/README.md has the measurement. Elsewhere this
    does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)
