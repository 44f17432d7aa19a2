"""Time Conv1 + ReLU, forward and backward with weight gradients (the input needs none, as in
training), two ways in alternating rounds in one process: plain autograd, and with the
gradients from oneDNN's channels-last kernels (CapsNet.ChannelsLastGradients, which Conv1 uses
on a CPU in float32). Prints one JSON line: each way's best and median milliseconds, and the
largest difference between their weight and bias gradients (0.0: the same bits).

    python tools/conv1_gradient_timing.py                      # 28x28, batch 128, float32
    python tools/conv1_gradient_timing.py --size 36 --batch 64 # MultiMNIST's pairs
    python tools/conv1_gradient_timing.py --dtype bfloat16     # what bf16 autocast would run

Conv1 under bf16 autocast keeps plain autograd; --dtype bfloat16 times what switching it
would give. Run it alone on the machine: the numbers are wall-clock times.
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import UserError, exit_on_user_error  # noqa: E402
from capslab.hardware import cpu_name  # noqa: E402
from CapsNet import CapsNetConfig, ChannelsLastGradients  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def conv1_step(convolve, x, weight, bias, grad_out):
    """Conv1 + ReLU forward, then backward from grad_out (B, 256, H', W'): weight gradients."""
    weight.grad = bias.grad = None
    F.relu(convolve(x, weight, bias)).backward(grad_out)
    return weight.grad, bias.grad


def milliseconds(step, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default: 28)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default: 1)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the convolution's (default: float32)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--repeats", type=int, default=2, help="steps per round (default: 2)")
    args = parser.parse_args(argv)
    for flag in ("batch", "channels", "rounds", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    config = CapsNetConfig(in_channels=args.channels)
    if args.size < config.kernel_size:
        raise UserError(f"--size must be at least {config.kernel_size}, got {args.size}")
    dtype, side = DTYPES[args.dtype], args.size - config.kernel_size + 1
    torch.manual_seed(0)
    x = torch.rand(args.batch, args.channels, args.size, args.size, dtype=dtype)
    kernel = (config.conv1_channels, args.channels, config.kernel_size, config.kernel_size)
    weight = (0.05 * torch.randn(kernel)).to(dtype).requires_grad_()
    bias = torch.zeros(config.conv1_channels, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(args.batch, config.conv1_channels, side, side, dtype=dtype)
    ways = {"plain_autograd": F.conv2d, "channels_last_gradients": ChannelsLastGradients.apply}
    grads = {name: conv1_step(way, x, weight, bias, grad_out) for name, way in ways.items()}
    times = {name: [] for name in ways}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both ways
        for name, way in ways.items():
            step = partial(conv1_step, way, x, weight, bias, grad_out)
            times[name].append(milliseconds(step, args.repeats))
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    result |= vars(args)
    for name, values in times.items():
        result[f"{name}_best_ms"] = round(min(values), 2)
        result[f"{name}_median_ms"] = round(statistics.median(values), 2)
    result["largest_difference"] = {
        which: (mine - reference).abs().max().item()
        for which, mine, reference in zip(
            ("grad_weight", "grad_bias"),
            grads["channels_last_gradients"],
            grads["plain_autograd"],
        )
    }
    print(json.dumps(result))


if __name__ == "__main__":
    exit_on_user_error(main)
