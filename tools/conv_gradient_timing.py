"""Time one of CapsNet's convolutions, forward and backward, two ways in alternating rounds in
one process: plain autograd, and the way the model takes its gradients on a CPU in float32.

    conv1    Conv1 + ReLU, weight gradients only (the image needs none, as in training); the
             other way: oneDNN's channels-last kernels (CapsNet.ChannelsLastGradients)
    primary  the PrimaryCaps convolution, input and weight gradients; the other way: the
             weight gradient as a forward convolution and the input gradient from the
             compiled kernel (CapsNet.PrimaryConvGradients)

Prints one JSON line: each way's best and median milliseconds, and the largest difference
between their gradients (0.0: the same bits).

    python tools/conv_gradient_timing.py                           # Conv1, 28x28, batch 128
    python tools/conv_gradient_timing.py --layer primary --batch 64
    python tools/conv_gradient_timing.py --size 36 --batch 64      # MultiMNIST's pairs
    python tools/conv_gradient_timing.py --dtype bfloat16          # what bf16 autocast would run

Under bf16 autocast on a CPU, Conv1 keeps plain autograd (its channels-last gradients were
slower in bf16), and the PrimaryCaps convolution takes its weight gradient as a convolution,
its input gradient from autograd (the kernel's is float32 only): --dtype bfloat16 times both
ways in bf16. Run it alone on the machine: the numbers are wall-clock times.
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
import torch
import torch.nn.functional as F

from capslab.errors import UserError, exit_on_user_error
from capslab.hardware import cpu_name
from CapsNet import (
    CapsNetConfig,
    ChannelsLastGradients,
    PrimaryCaps,
    PrimaryConvGradients,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def conv1_ways(config: CapsNetConfig, args: argparse.Namespace):
    """Conv1's tensors and its two ways: x (B, C, S, S) without a gradient, ReLU after."""
    dtype = DTYPES[args.dtype]
    x = torch.rand(args.batch, args.channels, args.size, args.size, dtype=dtype)
    kernel = (config.conv1_channels, args.channels, config.kernel_size, config.kernel_size)
    ways = {
        "plain_autograd": lambda *t: F.relu(F.conv2d(*t)),
        "channels_last_gradients": lambda *t: F.relu(ChannelsLastGradients.apply(*t)),
    }
    return x, kernel, ways


def primary_ways(config: CapsNetConfig, args: argparse.Namespace):
    """The PrimaryCaps convolution's tensors and its two ways: x (B, 256, S-8, S-8), a ReLU
    output with a gradient, as Conv1 hands it on."""
    dtype, side = DTYPES[args.dtype], args.size - config.kernel_size + 1
    x = torch.rand(args.batch, config.conv1_channels, side, side, dtype=dtype)
    conv = PrimaryCaps(config).conv  # the model's own shape and stride
    ways = {
        "plain_autograd": partial(F.conv2d, stride=conv.stride),
        "primary_conv_gradients": lambda *t: PrimaryConvGradients.apply(*t, conv.stride),
    }
    return x.requires_grad_(), tuple(conv.weight.shape), ways


LAYERS = {"conv1": conv1_ways, "primary": primary_ways}


def gradients(convolve, x, weight, bias, grad_out) -> dict:
    """Forward, then backward from grad_out: every gradient autograd makes."""
    for tensor in (x, weight, bias):
        tensor.grad = None
    convolve(x, weight, bias).backward(grad_out)
    named = {"grad_input": x.grad, "grad_weight": weight.grad, "grad_bias": bias.grad}
    return {name: grad for name, grad in named.items() if grad is not None}


def milliseconds(step, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1000


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", choices=LAYERS, default="conv1", help="(default: conv1)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default: 28)")
    parser.add_argument(
        "--channels", type=int, default=1, help="the image's channels, for conv1 (default: 1)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the convolution's (default: float32)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--repeats", type=int, default=2, help="steps per round (default: 2)")
    args = parser.parse_args(argv)
    for flag in ("batch", "channels", "rounds", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    kernel = CapsNetConfig().kernel_size
    smallest = {"conv1": kernel, "primary": 2 * kernel - 1}[args.layer]  # two kernels deep
    if args.size < smallest:
        raise UserError(
            f"--size must be at least {smallest} for --layer {args.layer}, got {args.size}"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        time_both_ways(args)
    except RuntimeError as error:  # torch.OutOfMemoryError, or the CPU allocator's message
        if not isinstance(error, torch.OutOfMemoryError) and "allocate" not in str(error):
            raise
        raise UserError(
            f"out of memory at --batch {args.batch} --size {args.size}: lower them"
        ) from error


def time_both_ways(args: argparse.Namespace) -> None:
    config = CapsNetConfig(in_channels=args.channels)
    torch.manual_seed(0)
    x, kernel, ways = LAYERS[args.layer](config, args)
    weight = (0.05 * torch.randn(kernel)).to(x.dtype).requires_grad_()
    bias = torch.zeros(kernel[0], dtype=x.dtype, requires_grad=True)
    with torch.no_grad():  # made once, outside the timed steps
        grad_out = torch.randn_like(ways["plain_autograd"](x, weight, bias))
    grads = {name: gradients(way, x, weight, bias, grad_out) for name, way in ways.items()}
    times = {name: [] for name in ways}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both ways
        for name, way in ways.items():
            step = partial(gradients, way, x, weight, bias, grad_out)
            times[name].append(milliseconds(step, args.repeats))
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    result |= vars(args)
    for name, values in times.items():
        result[f"{name}_best_ms"] = round(min(values), 2)
        result[f"{name}_median_ms"] = round(statistics.median(values), 2)
    reference, ours = grads.values()
    result["largest_difference"] = {
        name: (ours[name] - reference[name]).abs().max().item() for name in reference
    }
    print(json.dumps(result))


if __name__ == "__main__":
    exit_on_user_error(main)
