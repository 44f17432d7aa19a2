"""Votes and dynamic routing on the CPU in a compiled kernel (capslab/routing.cpp), built on
first use.

CapsNet's torch code spends a CPU step moving the votes u_hat (737 KB an image at 28x28, 2 MB at
36x36) through memory: a matmul with 8-long sums writes them, a layout copy, 2r - 1 batched
products each way, and the matmul's backward reads grad u_hat back. The kernel makes each
example's votes itself, routes it with its votes in cache, and in backward turns grad u_hat
into grad u and grad W without writing it. It also squashes the primary capsules straight from
the PrimaryCaps convolution's output, in one pass each way (PrimarySquash), and makes that
convolution's input gradient in float32 (conv_input_gradient). Its threads are torch's own
OpenMP threads.
results/README.md §§ "The CPU routing kernel", "Votes inside the kernel", "Votes from a bf16
W, and fewer passes", "The primary capsules' squash in the kernel" and "The PrimaryCaps input
gradient in the kernel" have the timings.

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
from pathlib import Path

import filelock
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from capslab.hardware import cpu_fields

SOURCE = Path(__file__).with_name("routing.cpp")
LANES = 16  # the kernel's capsule width, and the most outputs it routes to
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
# The register width the kernel lays its sums out for: None, the CPU's own (64 bytes with
# AVX-512, else 32), or 32 or 64 on any CPU, which the tests use to run the other CPU's code
# (`pytest --kernel-register-bytes`).
register_bytes: int | None = None
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


def runs(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel is on and built, and takes `tensor` and `dtype`: the CPU, a dtype of
    SUFFIXES."""
    return (
        is_enabled() and tensor.device.type == "cpu" and dtype in SUFFIXES and library() is not None
    )


def usable(u: torch.Tensor, dtype: torch.dtype, num_out: int, dim: int) -> bool:
    """Whether the kernel can make and route the votes of u (B, I, K) in `dtype`: 16-D output
    capsules, at most 16 outputs and at most 16-D inputs, where it runs."""
    return dim == LANES and num_out <= LANES and 1 <= u.shape[-1] <= LANES and runs(u, dtype)


def squash_usable(s: torch.Tensor) -> bool:
    """Whether the kernel can squash the primary capsules from the convolution's output s
    (B, C*D, H, W): wherever it runs."""
    return runs(s, s.dtype)


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


def flags() -> tuple[str, ...]:
    """The compiler's flags: FLAGS, and the register width where one is set."""
    if register_bytes is None:
        return FLAGS
    return (*FLAGS, f"-DCAPSLAB_REGISTER_BYTES={register_bytes}")


def build_key(compiler: str, cpu: str, source: Path = SOURCE) -> str:
    """A hash of everything the build depends on: source, flags, compiler and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = (source.read_bytes(), " ".join(flags()).encode(), version.encode(), cpu.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def cached_build(compiler: str, source: Path = SOURCE) -> Path:
    """Where the build of `source` for this compiler and CPU lies in the cache."""
    return cache_folder() / f"routing-{build_key(compiler, cpu_identity(), source)}.so"


def build(compiler: str, source: Path = SOURCE) -> Path:
    """Compile a routing.cpp once per key (tools/routing_kernel_timing.py builds older ones);
    a concurrent build waits for the first one."""
    target = cached_build(compiler, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(target) + ".lock"):
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                command = [compiler, *flags(), "-o", str(built), str(source)]
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


def compiler_name() -> str:
    """The C++ compiler that builds the kernel: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) where it cannot be built here."""
    compiler = compiler_name()
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


def threads() -> ctypes.c_int64:
    """How many OpenMP threads the kernel splits its work over: torch's own count."""
    return ctypes.c_int64(torch.get_num_threads())


def check_routable(u: torch.Tensor, W: torch.Tensor, iterations: int) -> None:
    """A ValueError naming the first thing the kernel cannot take in u (B, I, K) and W."""
    batch, num_in, in_dim = u.shape
    width = W.shape[-1]
    problems = (
        (iterations < 1, f"the routing kernel takes r >= 1, got r = {iterations}"),
        (
            width % LANES != 0 or not 1 <= width // LANES <= LANES,
            f"the routing kernel takes 1 to {LANES} outputs of {LANES} dimensions, got W "
            f"{tuple(W.shape)}",
        ),
        (
            not 1 <= in_dim <= LANES,
            f"the routing kernel takes inputs of 1 to {LANES} dimensions, got u {tuple(u.shape)}",
        ),
        (
            W.shape != (num_in, in_dim, width),
            f"W {tuple(W.shape)} does not match u {tuple(u.shape)}: it must be (I, K, J*16)",
        ),
        (
            W.dtype != routing_dtype(u.dtype),
            f"W must be in the dtype the kernel routes {u.dtype} capsules in, "
            f"{routing_dtype(u.dtype)}, got {W.dtype}",
        ),
    )
    for failed, message in problems:
        if failed:
            raise ValueError(message)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernel routes (and keeps W) in for capsules u of `dtype`: float32 or float64."""
    return torch.promote_types(dtype, torch.float32)


def address(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


class FusedRouting(torch.autograd.Function):
    """Eq. 2 and Procedure 1: u (B, I, K) and W (I, K, J*16) -> v_j (B, J, 16) and c_ij
    (B, J, I), as CapsNet's DigitCaps computes them with torch. u is float32, bf16 or float64;
    W, v and c are float32, or float64 for float64 u; the votes use W rounded to u's dtype, as
    a bf16 matmul would. Gradients for u and W in their dtype."""

    @staticmethod
    def forward(ctx, u, W, iterations: int, detach_early: bool, eps: float):
        global kernel_calls
        check_routable(u, W, iterations)
        batch, num_in, in_dim = u.shape
        num_out = W.shape[-1] // LANES
        kernel_calls += 1
        u = u.contiguous()
        dtype = W.dtype
        # The votes are made from W in u's dtype, as autocast's bf16 matmul makes them; W's
        # gradient stays in W's own dtype.
        W_votes = W.to(u.dtype).contiguous()
        slot = -(-num_in // LANES) * num_out * LANES  # per-input values in blocks of 16 inputs
        dims = torch.tensor([num_in, batch, num_out, iterations, in_dim], dtype=torch.int64)
        v = torch.empty(batch, num_out, LANES, dtype=dtype)
        c = torch.empty(batch, num_out, num_in, dtype=dtype)
        saved_s = torch.empty(batch, iterations, LANES, LANES, dtype=dtype)
        saved_c = torch.empty(batch, iterations, slot, dtype=dtype)
        getattr(library(), "forward_" + SUFFIXES[u.dtype])(
            *map(address, (u, W_votes, dims)),
            threads(),
            ctypes.c_double(eps),
            *map(address, (v, c, saved_s, saved_c)),
        )
        ctx.save_for_backward(u, W_votes, dims, saved_s, saved_c)  # backward makes the votes again
        ctx.detach_early, ctx.eps = detach_early, eps
        ctx.mark_non_differentiable(c)
        return v, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v, grad_c):
        u, W_votes, dims, saved_s, saved_c = ctx.saved_tensors
        batch = u.shape[0]
        iterations = saved_s.shape[1]
        grad_v = grad_v.to(saved_s.dtype).contiguous()
        scratch = torch.empty_like(saved_c)
        grad_s = torch.empty(batch, iterations, grad_v.shape[1], LANES, dtype=saved_s.dtype)
        v = torch.empty_like(grad_s)  # v_t, each iteration's output
        suffix = SUFFIXES[u.dtype]
        getattr(library(), "backward_" + suffix)(  # through routing, example by example
            *map(address, (u, W_votes, dims)),
            threads(),
            ctypes.c_int64(ctx.detach_early),
            ctypes.c_double(ctx.eps),
            *map(address, (saved_s, saved_c, grad_v, scratch, grad_s, v)),
        )
        grad_u = torch.empty_like(u)
        grad_W = torch.empty(W_votes.shape, dtype=saved_s.dtype)  # W's own dtype
        first = iterations - 1 if ctx.detach_early else 0  # the earliest t the gradient reaches
        getattr(library(), "votes_backward_" + suffix)(  # into u and W, input by input
            *map(address, (u, W_votes, dims)),
            threads(),
            ctypes.c_int64(first),
            *map(address, (saved_c, scratch, grad_s, v, grad_u, grad_W)),
        )
        return grad_u, grad_W, None, None, None


class PrimarySquash(torch.autograd.Function):
    """The primary capsules from the PrimaryCaps convolution's output s (B, C*D, H, W): u
    (B, C*H*W, D), capsule i = (channel, row, col), squashed by Eq. 1 in float32 (float64 for
    float64 s), as PrimaryCaps' torch code makes them, in one pass each way instead of a
    layout copy, a cast and about a dozen passes of squash. s is float32, bf16 or float64;
    its gradient comes back in its dtype."""

    @staticmethod
    def forward(ctx, s, dim: int, eps: float):
        s = s.contiguous()
        batch, channels, height, width = s.shape
        if channels % dim:
            raise ValueError(f"{channels} channels do not split into {dim}-D capsules")
        dims = torch.tensor([batch, channels // dim, dim, height * width], dtype=torch.int64)
        u = torch.empty(batch, channels // dim * height * width, dim, dtype=routing_dtype(s.dtype))
        getattr(library(), "primary_squash_" + SUFFIXES[s.dtype])(
            *map(address, (s, dims)), threads(), ctypes.c_double(eps), address(u)
        )
        ctx.save_for_backward(s, dims)
        ctx.eps = eps
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u):
        s, dims = ctx.saved_tensors
        grad_u = grad_u.to(routing_dtype(s.dtype)).contiguous()
        grad_s = torch.empty_like(s)
        getattr(library(), "primary_squash_backward_" + SUFFIXES[s.dtype])(
            *map(address, (s, grad_u, dims)), threads(), ctypes.c_double(ctx.eps), address(grad_s)
        )
        return grad_s, None, None


def input_gradient_usable(grad_out: torch.Tensor) -> bool:
    """Whether the kernel can make a convolution's input gradient from grad_out: float32,
    wherever it runs."""
    return grad_out.dtype == torch.float32 and runs(grad_out, torch.float32)


def check_convolution(input_shape, weight, grad_out, stride) -> None:
    """A ValueError unless grad_out is what F.conv2d(x, weight, stride=stride), with no
    padding, makes from an x of input_shape (B, C, H, W)."""
    geometry = zip(input_shape[2:], weight.shape[2:], stride)
    sides = [(side - k) // step + 1 for side, k, step in geometry]
    expected = (input_shape[0], weight.shape[0], *sides)
    if input_shape[1] != weight.shape[1] or min(sides) < 1 or tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)} is not the output of a weight {tuple(weight.shape)} "
            f"at stride {tuple(stride)} over an input {tuple(input_shape)}"
        )


def column_blocks(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """(..., M, N) -> (..., ceil(N / width), M, width): the columns in blocks of `width`, zeros
    past N, each block a contiguous (M, width) matrix."""
    padded = F.pad(matrix, (0, -matrix.shape[-1] % width))
    return padded.unflatten(-1, (-1, width)).transpose(-3, -2).contiguous()


def conv_input_gradient(
    input_shape: torch.Size, weight: torch.Tensor, grad_out: torch.Tensor, stride: tuple[int, int]
) -> torch.Tensor:
    """grad x (B, C, H, W) of F.conv2d(x, weight, stride=stride) with no padding, from grad_out
    (B, O, OH, OW), float32: the same numbers as torch.nn.grad.conv2d_input, to float rounding,
    without writing the (B, OH*OW, C*KH*KW) product in between (routing.cpp)."""
    check_convolution(input_shape, weight, grad_out, stride)
    # grad_out's positions in tiles (B, T, O, rows); the weight's columns in panels (N', O, width)
    tiles = column_blocks(grad_out.flatten(2), library().input_gradient_tile_rows_float32())
    panels = column_blocks(weight.flatten(1), library().input_gradient_panel_float32())
    dims = [*grad_out.shape, *input_shape[1:], *weight.shape[2:], *stride]
    dims = torch.tensor(dims, dtype=torch.int64)  # B, O, OH, OW, C, H, W, KH, KW, SH, SW
    grad_x = torch.empty(input_shape, dtype=torch.float32)
    operands = map(address, (tiles, panels, dims))
    library().input_gradient_float32(*operands, threads(), address(grad_x))
    return grad_x
