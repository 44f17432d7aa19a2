"""Time the CPU routing kernel's three calls (forward; backward through routing; grad u and
grad W), for one or more versions of capslab/routing.cpp, in alternating rounds in one process,
at CapsNet's shapes (J = 10, K = 8, r = 3; batch 64 in bf16 by default). Prints one JSON line
per source: the best round's milliseconds per call (total_ms: the three routing calls), and the
largest difference of each output from the first source's (0.0: the same bits). Sources that
also squash the primary capsules get that timed too, forward and backward, on 32 channels of
I/32 positions as PrimaryCaps lays them out (I/32 must be whole; else one position each);
null where a source has no such entry points.

    python tools/routing_kernel_timing.py capslab/routing.cpp --inputs 3200   # 36x36 pairs
    python tools/routing_kernel_timing.py capslab/routing.cpp --dtype float32 --batch 128
    git show HEAD~1:capslab/routing.cpp > /tmp/before.cpp
    python tools/routing_kernel_timing.py /tmp/before.cpp capslab/routing.cpp --rounds 30

Kernels from before the votes were made from a bf16 W (they take a float32 W and a logits
buffer) are recognised by their source and called their way. Each text is built once, by the
kernel's compiler ($CXX, else c++) into its cache (~/.cache/capsnet or $CAPSNET_CACHE), so timing
it again does not rebuild it. Run it alone on the machine: the numbers are wall-clock times.
"""

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
import torch

from capslab.errors import UserError, exit_on_user_error, first_line
from capslab.fused_routing import LANES, SUFFIXES, address, build, compiler_name
from capslab.hardware import cpu_name
from CapsNet import EPS as MODEL_EPS
from CapsNet import CapsNetConfig

PAPER = CapsNetConfig()  # the shapes timed are the paper model's
OUTPUTS, ITERATIONS, IN_DIM = PAPER.num_classes, PAPER.routing_iterations, PAPER.primary_dim
# The kernel's entry points by name, for the capsule dtypes whose outputs are float32 buffers.
DTYPES = {name: dtype for dtype, name in SUFFIXES.items() if dtype != torch.float64}
OUTPUT_NAMES = ("v", "c", "grad_s", "v_t", "grad_u", "grad_W")
SQUASH_NAMES = ("u", "grad_conv")  # the primary squash's outputs
PRIMARY_CHANNELS = PAPER.primary_channels
EPS = ctypes.c_double(MODEL_EPS)


class Kernel:
    """One routing.cpp, built once per text into the kernel's cache, with its own output
    buffers."""

    def __init__(self, source: Path, inputs: int, batch: int, dtype: str):
        if source.is_dir():
            raise UserError(f"{source} is a folder, not a kernel source file")
        if not source.is_file():
            raise UserError(f"{source} does not exist")
        text = source.read_text(errors="replace")
        self.source = source
        self.takes_logits = "Acc* saved_c, Acc* logits)" in text
        self.float32_W = "const In* W" not in text
        self.dtype = dtype
        try:  # built once per source text, into the kernel's own cache
            library = build(compiler_name(), source)
        except subprocess.CalledProcessError as error:
            message = first_line(Exception(error.stderr))
            raise UserError(f"{source} does not compile: {message}") from None
        self.library = ctypes.CDLL(str(library))
        if not hasattr(self.library, "votes_backward_bfloat16"):
            raise UserError(f"{source} has no routing kernel's entry points")
        slot = -(-inputs // LANES) * OUTPUTS * LANES
        shape = (batch, ITERATIONS, OUTPUTS, LANES)
        self.buffers = {
            "v": torch.empty(batch, OUTPUTS, LANES),
            "c": torch.empty(batch, OUTPUTS, inputs),
            "saved_s": torch.empty(batch, ITERATIONS, LANES, LANES),
            "saved_c": torch.empty(batch, ITERATIONS, slot),
            "logits": torch.empty(batch, slot),
            "scratch": torch.empty(batch, ITERATIONS, slot),
            "grad_s": torch.empty(shape),
            "v_t": torch.empty(shape),
        }
        self.squashes = hasattr(self.library, "primary_squash_bfloat16")

    def weights(self, W: torch.Tensor) -> torch.Tensor:
        return W if self.float32_W else W.to(DTYPES[self.dtype])

    def calls(self, u, W, grad_v):
        """The three calls, as FusedRouting makes them."""
        dims = torch.tensor([u.shape[1], u.shape[0], OUTPUTS, ITERATIONS, IN_DIM])
        threads = ctypes.c_int64(torch.get_num_threads())
        W = self.weights(W)
        b = self.buffers
        b["grad_u"], b["grad_W"] = torch.empty_like(u), torch.empty_like(W, dtype=torch.float32)
        forward_outputs = [b["v"], b["c"], b["saved_s"], b["saved_c"]]
        forward_outputs += [b["logits"]] if self.takes_logits else []
        return (
            lambda: getattr(self.library, f"forward_{self.dtype}")(
                *map(address, (u, W, dims)), threads, EPS, *map(address, forward_outputs)
            ),
            lambda: getattr(self.library, f"backward_{self.dtype}")(
                *map(address, (u, W, dims)),
                threads,
                ctypes.c_int64(0),
                EPS,
                *map(address, (b["saved_s"], b["saved_c"], grad_v, b["scratch"])),
                *map(address, (b["grad_s"], b["v_t"])),
            ),
            lambda: getattr(self.library, f"votes_backward_{self.dtype}")(
                *map(address, (u, W, dims)),
                threads,
                ctypes.c_int64(0),
                *map(address, (b["saved_c"], b["scratch"], b["grad_s"], b["v_t"])),
                *map(address, (b["grad_u"], b["grad_W"])),
            ),
        )

    def squash_calls(self, s, grad_u):
        """The primary squash's two calls, as PrimarySquash makes them: s (B, C*K, P)."""
        batch, channels, positions = s.shape
        dims = torch.tensor([batch, channels // IN_DIM, IN_DIM, positions])
        threads = ctypes.c_int64(torch.get_num_threads())
        u, grad_conv = torch.empty_like(grad_u), torch.empty_like(s)
        self.buffers.update(u=u, grad_conv=grad_conv)
        return (
            lambda: getattr(self.library, f"primary_squash_{self.dtype}")(
                *map(address, (s, dims)), threads, EPS, address(u)
            ),
            lambda: getattr(self.library, f"primary_squash_backward_{self.dtype}")(
                *map(address, (s, grad_u, dims)), threads, EPS, address(grad_conv)
            ),
        )


def primary_layout(inputs: int) -> tuple[int, int]:
    """(channels, positions) of I primary capsules: 32 channels where 32 divides I."""
    if inputs % PRIMARY_CHANNELS == 0:
        return PRIMARY_CHANNELS, inputs // PRIMARY_CHANNELS
    return inputs, 1


def best_milliseconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="routing.cpp files to compare")
    parser.add_argument("--inputs", type=int, default=3200, help="I: 1152 (28x28) or 3200")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds, best kept")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    parser.add_argument("--batch", type=int, default=64, help="examples per call")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="the capsules' dtype: float32 where the CPU lacks native bf16",
    )
    args = parser.parse_args(argv)
    for flag, value in (
        ("--inputs", args.inputs),
        ("--rounds", args.rounds),
        ("--repeats", args.repeats),
        ("--batch", args.batch),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    torch.manual_seed(0)
    u = (0.3 * torch.randn(args.batch, args.inputs, IN_DIM)).to(DTYPES[args.dtype])
    W = 0.05 * torch.randn(args.inputs, IN_DIM, OUTPUTS * LANES)
    grad_v = torch.randn(args.batch, OUTPUTS, LANES)
    channels, positions = primary_layout(args.inputs)
    s = torch.randn(args.batch, channels * IN_DIM, positions).to(DTYPES[args.dtype])
    grad_u = torch.randn(args.batch, args.inputs, IN_DIM)
    kernels = [Kernel(source, args.inputs, args.batch, args.dtype) for source in args.sources]
    calls = [
        kernel.calls(u, W, grad_v) + (kernel.squash_calls(s, grad_u) if kernel.squashes else ())
        for kernel in kernels
    ]
    best = [[float("inf")] * len(each) for each in calls]
    for _ in range(args.rounds):
        for times, each in zip(best, calls):
            for index, call in enumerate(each):
                times[index] = min(times[index], best_milliseconds(call, args.repeats))
    first = kernels[0].buffers
    for kernel, times in zip(kernels, best):
        names = [name for name in OUTPUT_NAMES + SQUASH_NAMES if name in kernel.buffers]
        differences = {
            name: (kernel.buffers[name].float() - first[name].float()).abs().max().item()
            for name in names
            if name in first
        }
        squash_times = [round(time, 2) for time in times[3:]] or [None, None]
        record = {
            "source": str(kernel.source),
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "inputs": args.inputs,
            "batch": args.batch,
            "dtype": args.dtype,
            "forward_ms": round(times[0], 2),
            "backward_ms": round(times[1], 2),
            "grad_u_and_W_ms": round(times[2], 2),
            "total_ms": round(sum(times[:3]), 2),
            "primary_squash_ms": squash_times[0],
            "primary_squash_backward_ms": squash_times[1],
            "largest_difference_from_first": differences,
        }
        print(json.dumps(record))


if __name__ == "__main__":
    exit_on_user_error(main)
