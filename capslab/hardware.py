"""Where the model runs: device choice, and the CPU allocator setting that training relies on."""

import argparse
import ctypes
import os
import platform
import sys
from pathlib import Path

import torch

from capslab.errors import UserError

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


def add_device_flags(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """--device, and --threads where the command lets the user set torch's CPU threads."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: auto)",
    )
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for torch (default: torch's choice)",
        )


MAX_THREADS = 1024  # more would only oversubscribe any CPU there is, or overflow torch's int


def set_threads(threads: int | None) -> None:
    """Apply --threads; None keeps torch's choice."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    torch.set_num_threads(threads)


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where the platform does not say (Windows, or
    sysconf's -1). A container's own limit (cgroups) is not counted."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def has_native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast is native here: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX. Elsewhere bf16 is emulated, which can be slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def emulated_bf16_warning(device: torch.device) -> str | None:
    """The warning for bf16 autocast where it is emulated, else None: on Zen 3 (AVX2) a bf16
    step took 21-27 times a float32 one (results/README.md § bfloat16)."""
    if has_native_bf16(device):
        return None
    return (
        f"bf16 is emulated on this {device.type} (no AVX512-BF16 or AMX) and can be "
        "many times slower than float32"
    )


# The widest vector instructions, which set CPU speed here, as /proc/cpuinfo flags name them.
VECTOR_UNITS = (
    ("amx_tile", "AMX"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512f", "AVX512"),
    ("avx2", "AVX2"),
)


def cpu_fields(cpuinfo: Path) -> dict[str, str]:
    """The first processor's "key: value" lines of a Linux /proc/cpuinfo."""
    first_processor = cpuinfo.read_text().split("\n\n")[0]
    pairs = (line.partition(":") for line in first_processor.splitlines())
    return {key.strip(): value.strip() for key, _, value in pairs}


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name with its family, model and widest vector unit, from Linux's
    /proc/cpuinfo ("AMD EPYC (family 25 model 17, AVX512-BF16)": a virtual machine may name
    Zen 3 and Zen 4 alike), else what the platform module knows."""
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    fields = cpu_fields(cpuinfo)
    flags = set(fields.get("flags", "").split())
    details = (
        [f"family {fields['cpu family']} model {fields['model']}"]
        if {"cpu family", "model"} <= fields.keys()
        else []
    )
    details += [name for flag, name in VECTOR_UNITS if flag in flags][:1]
    name = fields.get("model name", platform.machine())
    return f"{name} ({', '.join(details)})" if details else name


def device_name(device: torch.device) -> str:
    """What a run trained on, for its records: the GPU's name, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


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
