"""Dynamic routing on the CPU in a compiled kernel (capslab/routing.cpp), built on first use.

CapsNet.DynamicRouting spends a CPU step moving the votes u_hat (737 KB an image at 28x28,
2 MB at 36x36) through memory: a layout copy, 2r - 1 batched products each way and their
backward. The kernel routes one example at a time with its votes in cache and reads them in the
layout the votes' matmul writes. results/README.md § "bf16 near its floor" has the timings.

It is built with the system's C++ compiler (GCC: it uses GCC's vector extensions) for the CPU
it runs on, into ~/.cache/capsnet or $CAPSNET_CACHE, under a name that hashes the source, the
compiler and the CPU, so no machine loads a build made for another. Where no compiler builds
it, `library()` returns None after one warning and routing runs the torch code.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import filelock
import torch
from torch.autograd.function import once_differentiable

from capslab.hardware import cpu_fields

SOURCE = Path(__file__).with_name("routing.cpp")
LANES = 16  # the kernel's capsule width, and the most outputs it routes to
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
SUFFIXES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
_enabled = True
kernel_calls = 0  # forward passes the kernel has routed in this process (bench.py reports it)


@contextlib.contextmanager
def kernel_enabled(enabled: bool):
    """Route with the kernel (True, the default) or with the torch code (bench.py's baseline)
    inside the block; the setting before it comes back after."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def is_enabled() -> bool:
    return _enabled


def usable(votes: torch.Tensor, num_out: int, dim: int) -> bool:
    """Whether the kernel can route these votes: CPU, 16-D capsules, at most 16 outputs."""
    return (
        is_enabled()
        and votes.device.type == "cpu"
        and votes.dtype in SUFFIXES
        and dim == LANES
        and num_out <= LANES
        and library() is not None
    )


# The /proc/cpuinfo fields code generation depends on; "cpu MHz" and "bogomips" change between
# reads on a machine that scales its clock, and must not change the key.
CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")
CPU_FIELDS_ARM = ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


def cache_folder() -> Path:
    return Path(os.environ.get("CAPSNET_CACHE") or Path.home() / ".cache" / "capsnet")


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What the CPU can run, from /proc/cpuinfo's stable fields, else the platform's name."""
    if not cpuinfo.exists():
        return platform.machine() + " " + platform.processor()
    fields = cpu_fields(cpuinfo)
    return "\n".join(f"{name}: {fields.get(name, '')}" for name in CPU_FIELDS + CPU_FIELDS_ARM)


def build_key(compiler: str, cpu: str) -> str:
    """A hash of everything the build depends on: source, flags, compiler and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), cpu.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build(compiler: str) -> Path:
    """Compile routing.cpp once per key; a concurrent build waits for the first one."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"routing-{build_key(compiler, cpu_identity())}.so"
    with filelock.FileLock(str(target) + ".lock"):
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                built = Path(scratch) / target.name
                command = [compiler, *FLAGS, "-o", str(built), str(SOURCE)]
                subprocess.run(command, check=True, capture_output=True, text=True)
                os.replace(built, target)  # whole or absent, never half-written
    return target


def load(compiler: str) -> ctypes.CDLL:
    """The built kernel; a cached file that does not load (damaged) is built again, once."""
    target = build(compiler)
    try:
        return ctypes.CDLL(str(target))
    except OSError:
        target.unlink(missing_ok=True)
        return ctypes.CDLL(str(build(compiler)))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) where it cannot be built here."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return unavailable(f"no C++ compiler {compiler!r}")
    try:
        return load(compiler)
    except subprocess.CalledProcessError as error:
        first_line = (error.stderr or "").strip().splitlines()[:1]
        return unavailable(f"{compiler} failed: {' '.join(first_line)}")
    except (OSError, RuntimeError) as error:  # RuntimeError: Path.home() without a home
        return unavailable(str(error))


def unavailable(reason: str) -> None:
    warnings.warn(
        f"routing runs without its compiled CPU kernel ({reason}); it is slower", stacklevel=3
    )
    return None


@functools.cache
def helper_threads(count: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix="routing")


def in_parallel(entry_point, batch: int, leading: tuple, trailing: tuple) -> None:
    """entry_point(*leading, begin, end, *trailing) over torch's thread count, in contiguous
    ranges of examples; the calling thread takes the first range. ctypes releases the GIL."""
    threads = max(1, min(torch.get_num_threads(), batch))
    bounds = [batch * k // threads for k in range(threads + 1)]
    ranges = [(ctypes.c_int64(a), ctypes.c_int64(b)) for a, b in zip(bounds, bounds[1:])]
    pending = [
        helper_threads(threads - 1).submit(entry_point, *leading, *span, *trailing)
        for span in ranges[1:]
    ]
    try:
        entry_point(*leading, *ranges[0], *trailing)
    finally:  # even on Ctrl-C: the helpers write into tensors the caller is about to free
        wait(pending)
    for job in pending:
        job.result()


def address(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


class FusedRouting(torch.autograd.Function):
    """Procedure 1 on votes (I, B, J*16) -> v_j (B, J, 16), c_ij (B, J, I): CapsNet's
    DynamicRouting, computed by the kernel. Float32 out for float32 or bf16 votes."""

    @staticmethod
    def forward(ctx, votes, iterations: int, detach_early: bool, num_out: int, eps: float):
        global kernel_calls
        num_in, batch, width = votes.shape
        if iterations < 1 or not 1 <= num_out <= LANES or width != num_out * LANES:
            raise ValueError(
                f"the routing kernel takes r >= 1 and 1 to {LANES} outputs of {LANES} dimensions,"
                f" got r = {iterations}, {num_out} outputs, votes {tuple(votes.shape)}"
            )
        kernel_calls += 1
        votes = votes.contiguous()
        dtype = torch.float64 if votes.dtype == torch.float64 else torch.float32
        slot = -(-num_in // LANES) * num_out * LANES  # per-input values in blocks of 16 inputs
        dims = torch.tensor([num_in, batch, num_out, iterations], dtype=torch.int64)
        v = torch.empty(batch, num_out, LANES, dtype=dtype)
        c = torch.empty(batch, num_out, num_in, dtype=dtype)
        saved_s = torch.empty(batch, iterations, LANES, LANES, dtype=dtype)
        saved_c = torch.empty(batch, iterations, slot, dtype=dtype)
        logits = torch.empty(batch, slot, dtype=dtype)
        entry_point = getattr(library(), "forward_" + SUFFIXES[votes.dtype])
        outputs = (address(v), address(c), address(saved_s), address(saved_c), address(logits))
        leading = (address(votes), address(dims))
        in_parallel(entry_point, batch, leading, (ctypes.c_double(eps), *outputs))
        ctx.save_for_backward(votes, dims, saved_s, saved_c)
        ctx.detach_early, ctx.eps = detach_early, eps
        ctx.mark_non_differentiable(c)
        return v, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v, grad_c):
        votes, dims, saved_s, saved_c = ctx.saved_tensors
        grad_v = grad_v.to(saved_s.dtype).contiguous()
        grad_votes = torch.empty_like(votes)
        scratch = torch.empty_like(saved_c)
        entry_point = getattr(library(), "backward_" + SUFFIXES[votes.dtype])
        trailing = (
            ctypes.c_int64(ctx.detach_early),
            ctypes.c_double(ctx.eps),
            address(saved_s),
            address(saved_c),
            address(grad_v),
            address(grad_votes),
            address(scratch),
        )
        in_parallel(entry_point, votes.shape[1], (address(votes), address(dims)), trailing)
        return grad_votes, None, None, None, None
