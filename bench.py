"""Measure CapsNet speed against the convolution floor, in one process, and print one JSON object.

    python bench.py                              # batch 128, torch's default threads
    python bench.py --batch-size 64 --steps 10 --threads 1
    python bench.py --bf16                       # bfloat16 autocast, model and floor alike
    python bench.py --model paper-cnn --bf16     # a baseline CNN's speed (it has no floor)
    python bench.py --dataset multimnist --bf16  # 36x36 pairs: 3,200 primary capsules
    python bench.py --bf16 --batch-size 64 --profile results/profile.txt  # time by op, too
    python bench.py --bf16 --routing torch       # routing in torch code, not the CPU kernel

The floor is what Conv1 and the PrimaryCaps convolution alone cost (forward+backward with
weight gradients for training, forward only for evaluation): ~95% of CapsNet's arithmetic.
Model and floor are timed in alternating rounds and each keeps its best round, so a noisy
neighbour on the machine hurts both alike.
"""

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # first: torch takes seconds to load

# isort: split
import argparse
import copy
import json
import resource
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from capslab import fused_routing
from capslab.atomic import write_atomically
from capslab.data import IMAGE_SIZE, Split, to_model_input
from capslab.errors import UserError, exit_on_user_error, flag_name, make_output_folder, warn
from capslab.hardware import (
    add_device_flags,
    cpu_name,
    emulated_bf16_warning,
    keep_freed_memory,
    pick_device,
    set_threads,
)
from capslab.models import MODEL_KINDS
from capslab.multimnist import PairPool
from capslab.run_plan import as_user_error
from capslab.training import TrainConfig, Trainer, epoch_generator
from CapsNet import CapsNet

MAX_COUNT = 100_000  # --batch-size, --steps, --rounds: beyond any real measurement


def images_per_second(function, images_per_call: int, steps: int) -> float:
    """Images per second over `steps` calls, after one warm-up call."""
    function()
    started = time.perf_counter()
    for _ in range(steps):
        function()
    return images_per_call * steps / (time.perf_counter() - started)


def conv_floor(model: CapsNet):
    """Conv1 + ReLU + the PrimaryCaps convolution alone: copies of the model's own layers, so
    they compute as the model does (Conv1's channels-last gradients included)."""
    conv1, primary = copy.deepcopy(model.conv1), copy.deepcopy(model.primary_caps.conv)
    return lambda x: primary(conv1(x))


def synthetic_split(size: int, dataset: str) -> Split:
    """Random 28x28 digits of classes 0, 1, ..., 9, 0, ...; for MultiMNIST a pool that pairs
    them into 36x36 images (at least two digits, of two classes, however small the batch)."""
    generator = torch.Generator().manual_seed(0)
    if dataset == "multimnist":
        size = max(size, 2)
    images = torch.randint(0, 256, (size, 28, 28), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.arange(size) % 10)
    return PairPool(split) if dataset == "multimnist" else split


def profile_training(train_step, steps: int, path: Path) -> None:
    """torch.profiler over `steps` training steps: a table of self time by op, into `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            train_step()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    text = f"{steps} training steps, {cpu_name()}, torch {torch.__version__}\n{table}"
    write_atomically(path, partial(Path.write_text, data=text))


def bench_trainer(args: argparse.Namespace, device: torch.device, steps_taken: int) -> Trainer:
    """A Trainer of a fresh, seeded model whose one "epoch" spans exactly the steps timed."""
    torch.manual_seed(0)
    try:
        config = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            batch_size=args.batch_size,
            epochs=1,  # one "epoch" of steps_taken steps: the schedule spans exactly the calls
            val_size=0,
            compile=args.compile,
            bf16=args.bf16,
        )
    except ValueError as error:  # e.g. a CNN on pairs
        raise as_user_error(error) from error
    kind = MODEL_KINDS[args.model]
    model = kind.model_class(kind.config_class(image_size=IMAGE_SIZE[args.dataset]))
    unused = Path("unused")  # a dry-run trainer saves nothing
    return Trainer(config, model, device, steps_taken, unused, dry_run=True)


def timed_steps(args: argparse.Namespace, trainer: Trainer, device: torch.device) -> dict:
    """The calls timed, by name: a training step and the model's forward passes, each beside
    the same work of the convolutions alone (the floor; None for a CNN, which has none)."""
    split = synthetic_split(args.batch_size, args.dataset)
    generator = epoch_generator(0, 0)
    images, labels = split.images[: args.batch_size], split.labels[: args.batch_size]
    x = to_model_input(split.training_batch(images, labels, 0, generator).images, device)
    model = trainer.model
    floor = conv_floor(model) if isinstance(model, CapsNet) else None

    def autocast():
        # --bf16: model and floor alike run their forward passes under autocast, and their
        # backward passes outside it, as the trainer does (routing stays float32 throughout).
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def train_step():
        # Shifts (or pairs), forward (autocast per config.bf16), loss, backward, Adam.
        trainer.train_step(images, labels, generator, split)

    def floor_step():
        with autocast():
            out = floor(x)
        out.sum().backward()

    def forward(inputs: torch.Tensor, module) -> Callable[[], None]:
        def step():
            with autocast():
                module(inputs)

        return step

    return {
        "train": train_step,
        "train_floor": floor_step if floor else None,
        "eval": forward(x, model),
        "eval_floor": forward(x, floor) if floor else None,
        "single": forward(x[:1], model),
    }


def time_rounds(args: argparse.Namespace, steps: dict, model: torch.nn.Module) -> dict:
    """Images/s of each step, per round; the single image's latency in ms. The rounds
    alternate the model and its floor, so drift in machine load hits both sides."""
    rates = {name: [] for name in ("train", "train_floor", "eval", "eval_floor")}
    latencies = []
    for _ in range(args.rounds):
        for name in ("train", "train_floor"):
            if steps[name]:
                rates[name].append(images_per_second(steps[name], args.batch_size, args.steps))
        with torch.inference_mode():
            model.eval()
            for name in ("eval", "eval_floor"):
                if steps[name]:
                    rates[name].append(images_per_second(steps[name], args.batch_size, args.steps))
            latencies.append(1000 / images_per_second(steps["single"], 1, 20))
        model.train()
    return {"rates": rates, "latencies": latencies}


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    kernel_calls_before = fused_routing.kernel_calls  # "routing" says which one really ran
    # The first call, then per round a warm-up call (images_per_second's) and the timed steps.
    steps_taken = 1 + args.rounds * (1 + args.steps) + (args.steps if args.profile else 0)
    trainer = bench_trainer(args, device, steps_taken)
    steps = timed_steps(args, trainer, device)
    started = time.perf_counter()
    steps["train"]()  # with --compile, this first call compiles
    first_step_seconds = time.perf_counter() - started
    timed = time_rounds(args, steps, trainer.model)
    if args.profile:
        profile_training(steps["train"], args.steps, args.profile)
    rates = timed["rates"]
    result = {
        "device": str(device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "dataset": args.dataset,
        "image_size": IMAGE_SIZE[args.dataset],
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "compile": args.compile,
        "bf16": args.bf16,
        "routing": "kernel" if fused_routing.kernel_calls > kernel_calls_before else "torch",
        **{f"{name}_img_per_s": max(values, default=None) for name, values in rates.items()},
        "single_image_latency_ms": min(timed["latencies"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_train_step_s": first_step_seconds,
    }
    for phase in ("train", "eval"):  # the share of the floor's speed the model reaches
        floor_rate = result[f"{phase}_floor_img_per_s"]
        result[f"{phase}_ratio"] = floor_rate and result[f"{phase}_img_per_s"] / floor_rate
    return {
        key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per step (default: 128)"
    )
    parser.add_argument(
        "--model",
        default="capsnet",
        choices=tuple(MODEL_KINDS),
        help="the model to time; only CapsNet has a convolution floor (default: capsnet)",
    )
    parser.add_argument(
        "--dataset",
        default="mnist",
        choices=("mnist", "multimnist"),
        help="mnist times 28x28 images; multimnist 36x36 pairs, made as training makes them "
        "(default: mnist)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds, best kept (default: 3)"
    )
    add_device_flags(parser)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model; reports the first step's time (default: off)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for model and floor alike (default: off)",
    )
    parser.add_argument(
        "--routing",
        choices=("kernel", "torch"),
        default="kernel",
        help="route on the CPU in the compiled kernel, or in torch code, as on a GPU; torch "
        "also turns off the kernel's primary squash and PrimaryCaps input gradient "
        "(default: kernel)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also profile --steps training steps and write the time by op to FILE (default: no)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Counts in range, and --profile's folder made before the benchmark, not after it."""
    for name in ("batch_size", "steps", "rounds"):
        if not 1 <= getattr(args, name) <= MAX_COUNT:
            raise UserError(
                f"{flag_name(name)} must be between 1 and {MAX_COUNT:,}, got {getattr(args, name)}"
            )
    if args.profile:
        if args.profile.is_dir():
            raise UserError(f"--profile {args.profile} is a folder, not a file")
        make_output_folder(args.profile.parent, "--profile's folder")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    set_threads(args.threads)
    keep_freed_memory()  # as train.py does, for model and floor alike
    device = pick_device(args.device)
    if args.bf16 and (warning := emulated_bf16_warning(device)):
        warn(f"{warning}: a round can take minutes")
    with fused_routing.kernel_enabled(args.routing == "kernel"):
        print(json.dumps(measure(args, device)))


if __name__ == "__main__":
    exit_on_user_error(main)
