"""Train a CapsNet on MNIST (or Fashion-MNIST) on CUDA, MPS or CPU, checkpointing every epoch.

    python train.py                      # the paper's setup, checkpoints in checkpoints/
    python train.py --resume             # continue checkpoints/last.pt exactly where it stopped
    python train.py --resume checkpoints/capsnet_mnist.pt --checkpoint-dir runs/more
                                         # continue a weights-only checkpoint (Adam restarts)
    python train.py --train-subset 2000 --epochs 5 --data-dir ../shared/data
    python train.py --model cnn --checkpoint-dir checkpoints/cnn   # the small CNN baseline
    torchrun --standalone --nproc_per_node 2 train.py ...          # data-parallel (DDP)

Ctrl-C finishes the current batch, saves a resumable checkpoint and exits.

Under torchrun (WORLD_SIZE > 1) every process trains a DistributedDataParallel replica (gloo
on CPU, nccl on CUDA). --batch-size stays the global batch: all ranks draw the same epoch
order and shifts and each takes its own batch_size / world_size slice of every batch, so the
run matches a single-process run up to float rounding. The learning rate therefore needs no
scaling; if you raise --batch-size to give each rank more work, scale --lr linearly with it.
Only rank 0 prints, logs and writes checkpoints.
"""

import argparse
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from baseline import BaselineCNN
from CapsNet import CapsNet, CapsNetConfig, capsule_loss
from common import (
    MODEL_KINDS, UserError, exit_on_user_error, keep_freed_memory, load_checkpoint, pick_device, save_checkpoint,
)
from data import DATASETS, batches, load_split, random_shift, to_float, train_val_split
from evaluate import predict_lengths

LAUNCHED = time.perf_counter()  # the run's wall clock counts from here, data loading included

# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_FLAGS = {"epochs", "device", "threads", "resume", "data_dir", "checkpoint_dir", "compile", "bf16", "quiet"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="mnist", choices=DATASETS, help="dataset to train on (default: mnist)")
    add("--model", default="capsnet", choices=tuple(MODEL_KINDS),
        help="capsnet, or cnn for the small baseline in baseline.py (cross-entropy loss) (default: capsnet)")
    add("--epochs", type=int, default=30, help="number of epochs (default: 30)")
    add("--batch-size", type=int, default=128, help="training batch size, summed over all torchrun processes (default: 128)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    add("--lr-decay", type=float, default=0.9, help="learning rate factor per epoch, --schedule exponential (default: 0.9)")
    add("--schedule", default="exponential", choices=("exponential", "onecycle"),
        help="exponential: --lr decayed by --lr-decay every epoch; onecycle: warm up to --lr over 30%% of "
             "the --epochs budget, then cosine-anneal to about zero (default: exponential)")
    add("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
        help="Adam's betas (default: 0.9 0.999)")
    add("--ema-decay", type=float, default=None,
        help="also keep an exponential moving average of the weights with this decay per step; "
             "validation chooses raw or averaged weights (default: off)")
    add("--routing-iterations", type=int, default=3, help="routing iterations r (default: 3)")
    add("--detach-early-routing", action="store_true",
        help="stop gradients through u_hat in all but the last routing iteration, as some public ports do; "
             "not in the paper (default: off)")
    add("--max-shift", type=int, default=2, help="random shift in pixels, 0 for none (default: 2)")
    add("--data-dir", default="data", help="dataset root, downloaded into if absent (default: data)")
    add("--checkpoint-dir", default="checkpoints", help="where last.pt, best.pt and the log go (default: checkpoints)")
    add("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed for init, split, order and shifts (default: 0)")
    add("--train-subset", type=int, default=None, help="train on the first N training images (default: all)")
    add("--val-size", type=int, default=5000, help="held-out validation images that choose best.pt, 0 for none (default: 5000)")
    add("--test-subset", type=int, default=None, help="score only the first N test images (default: all)")
    add("--test-every", type=int, default=1, help="score the test set every N epochs and at the end (default: 1)")
    add("--max-grad-norm", type=float, default=None, help="clip the gradient norm to this (default: no clipping)")
    add("--on-nonfinite", default="stop", choices=("stop", "skip"), help="a NaN/inf loss or gradient stops the run or skips the batch (default: stop)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--bf16", action="store_true",
        help="bfloat16 autocast for the training step's convolutions and decoder, for GPUs and CPUs with "
             "AVX512-BF16 or AMX; routing and the loss stay float32, evaluation is float32 (default: off)")
    add("--resume", nargs="?", const="last", default=None, metavar="PATH",
        help="continue PATH (or CHECKPOINT_DIR/last.pt) with its saved flags; only --epochs, --device, "
             "--threads, --data-dir, --checkpoint-dir, --compile, --bf16 may change (default: off)")
    add("--dry-run", action="store_true", help="run 2 training and 2 test batches, save nothing (default: off)")
    add("--quiet", action="store_true", help="no progress bars (default: off)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "routing_iterations", "test_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        raise UserError(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if not 0 <= args.max_shift <= 8:
        raise UserError(f"--max-shift must be between 0 and 8, got {args.max_shift}")
    if not all(0 <= beta < 1 for beta in args.adam_betas):
        raise UserError(f"--adam-betas must be in [0, 1), got {args.adam_betas}")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise UserError(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.test_subset is not None and args.test_subset < 1:
        raise UserError(f"--test-subset must be at least 1, got {args.test_subset}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order and shifts: a resumed epoch replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class StopRequest:
    """First Ctrl-C asks the loop to stop after the current batch; a second one aborts."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("\nstopping after this batch (Ctrl-C again to abort without saving)")


class NonFiniteError(UserError):
    pass


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1; return this process's device."""
    device = pick_device(args.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} torchrun processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"data-parallel training runs on cuda or cpu, not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; a plain run is rank 0


def log(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def build_model(args: argparse.Namespace, config: CapsNetConfig | None) -> torch.nn.Module:
    if args.model == "cnn":
        return BaselineCNN()
    return CapsNet(config, routing_iterations=args.routing_iterations,
                   detach_early_routing=args.detach_early_routing)


def build_scheduler(optimizer, args: argparse.Namespace, num_train: int):
    """exponential: stepped per epoch. The paper decays the learning rate exponentially without
    giving the rate; 0.9 per epoch is XifengGuo's CapsNet-Keras/Pytorch choice.
    onecycle: stepped per batch over the whole --epochs budget (not in the paper)."""
    if args.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    steps_per_epoch = 2 if args.dry_run else math.ceil(num_train / args.batch_size)
    # Momentum cycling off: Adam's betas are their own setting.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, cycle_momentum=False
    )


def ema_update(decay: float):
    """AveragedModel's update with warm-up: the decay grows as (1 + n) / (10 + n) up to `decay`,
    so the average soon forgets the random initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1 - min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        torch._foreach_lerp_(averaged, current, weight)

    return update


class Trainer:
    """Holds the model, optimizer and run state; one method per phase of an epoch."""

    def __init__(self, args, device, train_split, val_split, test_split, config: CapsNetConfig | None = None):
        self.args, self.device = args, device
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.model = build_model(args, config).to(device)
        replica = self.model
        if self.world_size > 1:  # all-reduces (averages) the gradients inside backward()
            replica = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_model = torch.compile(replica) if args.compile else replica
        # One fused kernel for all 8.2M parameters: on this CPU, 4.6 ms a step instead of 20.4 ms.
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=args.lr, betas=tuple(args.adam_betas), fused=True
        )
        self.scheduler = build_scheduler(self.optimizer, args, len(train_split))
        self.ema = None
        if args.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(self.model, multi_avg_fn=ema_update(args.ema_decay))
        self.clock_offset, self.clock_start = 0.0, LAUNCHED  # wall clock of the whole run
        self.epoch, self.step = 0, 0  # completed epochs; batches done in the current epoch
        self.partial = {"loss_sum": 0.0, "seen": 0, "grad_norm_sum": 0.0, "steps": 0, "seconds": 0.0}
        self.metrics, self.best_val, self.skipped = [], -1.0, 0
        self.shift_generator = None
        self.checkpoint_dir = Path(args.checkpoint_dir)

    # --- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema else 0,
            "wall_seconds": self.wall_seconds(),
            "model_kind": self.args.model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "partial": dict(self.partial),
            "shift_rng": self.shift_generator.get_state() if self.step else None,
            "metrics": self.metrics,
            "chosen": self.metrics[-1].get("chosen", "raw") if self.metrics else "raw",
            "best_val": self.best_val,
            "skipped": self.skipped,
            "config": self.model.config.to_dict(),
            "dataset": self.args.dataset,
            "args": vars(self.args),
        }

    def load_state(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.epoch, self.metrics = checkpoint["epoch"], checkpoint["metrics"]
        self.clock_offset = checkpoint.get("wall_seconds", 0.0)
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
            self.ema.n_averaged.fill_(checkpoint["ema_updates"])
        if "optimizer" not in checkpoint:
            self.warm_restart()
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step, self.partial = checkpoint["step"], checkpoint["partial"]
        self.best_val, self.skipped = checkpoint["best_val"], checkpoint["skipped"]
        if self.step:
            self.shift_generator = epoch_generator(self.args.seed, self.epoch)
            self.shift_generator.set_state(checkpoint["shift_rng"])

    def warm_restart(self) -> None:
        """Continue weights-only at the scheduled lr; Adam's moments start again from zero."""
        self.scheduler.last_epoch = self.epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.args.lr_decay**self.epoch
        recorded = [record["val_acc"] for record in self.metrics if "val_acc" in record]
        self.best_val = max(recorded, default=-1.0)

    def save(self, name: str) -> Path:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteError(f"the weights are not finite at epoch {self.epoch + 1}; {name} was not written")
        path = self.checkpoint_dir / name
        if not self.args.dry_run and self.rank == 0:
            save_checkpoint(self.state(), path)
        return path

    # --- across torchrun processes (no-ops in a single process) -------------------------
    def local_indices(self, batch_size: int) -> torch.Tensor:
        """This rank's contiguous share of a global batch: all of it in a single process."""
        return torch.tensor_split(torch.arange(batch_size), self.world_size)[self.rank]

    def sum_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.to(self.device)  # nccl reduces on the GPU
            dist.all_reduce(value)
        return value.item()

    # --- one training epoch ------------------------------------------------------------
    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; False if a stop was requested."""
        self.model.train()
        order_generator = epoch_generator(self.args.seed, self.epoch)
        order = torch.randperm(len(self.train_split), generator=order_generator)
        if self.step == 0:
            self.shift_generator = order_generator  # continues the same stream after the order
        all_batches = list(batches(self.train_split, self.args.batch_size, order))
        if self.args.dry_run:
            all_batches = all_batches[:2]
        progress = tqdm(
            all_batches[self.step :], desc=f"epoch {self.epoch + 1}/{self.args.epochs}",
            initial=self.step, total=len(all_batches), leave=False, disable=self.args.quiet or self.rank > 0,
        )
        started = time.perf_counter()
        for images, labels in progress:
            loss, grad_norm = self.train_step(images, labels)
            self.step += 1
            if loss is not None:
                self.partial["loss_sum"] += loss * len(labels)
                self.partial["grad_norm_sum"] += grad_norm
                self.partial["steps"] += 1
            self.partial["seen"] += len(labels)
            progress.set_postfix(loss=f"{loss if loss is not None else float('nan'):.4f}")
            # Every rank must stop after the same batch, or the others wait in all-reduce forever.
            if self.sum_over_ranks(torch.tensor(float(stop.requested))) > 0:
                self.partial["seconds"] += time.perf_counter() - started
                return False
        self.partial["seconds"] += time.perf_counter() - started
        return True

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float | None, float]:
        """One Adam step on a batch; (loss, grad norm), or (None, nan) for a skipped batch."""
        # Every rank shifts the whole global batch with the same generator, then takes its share.
        shifted = random_shift(images, self.args.max_shift, self.shift_generator)  # (B, 28, 28)
        mine = self.local_indices(len(labels))
        x = to_float(shifted[mine], self.device)  # (b, 1, 28, 28) in [0, 1]
        y = labels[mine].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting by the local share makes that the
        # gradient of the global batch mean even when the last batch splits unevenly.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = self.loss(x, y) * (len(y) * self.world_size / len(labels))
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()  # same on every rank
        loss_value = self.sum_over_ranks(loss.detach()) / self.world_size
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            where = f"epoch {self.epoch + 1} step {self.step + 1}"
            if self.args.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradient at {where} (loss {loss_value}, grad norm {grad_norm}); "
                    f"stopped, the last good checkpoint is {self.checkpoint_dir / 'last.pt'}"
                )
            self.skipped += 1
            return None, float("nan")
        if self.args.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.args.max_grad_norm, torch.tensor(grad_norm))
        self.optimizer.step()
        if self.args.schedule == "onecycle":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss_value, grad_norm

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean loss: margin + reconstruction for CapsNet, cross-entropy for the CNN."""
        if self.args.model == "cnn":
            (logits,) = self.step_model(x)  # (b, K)
            return F.cross_entropy(logits, y)
        lengths, reconstructions, _ = self.step_model(x, y)  # decoder masked by the true label
        return capsule_loss(lengths, reconstructions, x, y)  # reconstructs the shifted input

    # --- end of an epoch ---------------------------------------------------------------
    def finish_epoch(self) -> dict:
        seconds, seen = self.partial["seconds"], self.partial["seen"]
        record = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": self.partial["loss_sum"] / max(seen, 1),
            "grad_norm": self.partial["grad_norm_sum"] / max(self.partial["steps"], 1),
            "seconds": seconds,
            "img_per_s": seen / seconds if seconds else 0.0,
            "skipped": self.skipped,
        }
        limit = 2 * 500 if self.args.dry_run else None
        candidates = {"raw": self.model} | ({"ema": self.ema.module} if self.ema else {})
        if self.val_split is not None:
            for name, model in candidates.items():
                record[f"{name}_val_acc"] = self.accuracy(self.val_split, limit, model)
        # Validation chooses raw or averaged weights; the test set only scores the choice.
        record["chosen"] = max(candidates, key=lambda name: record.get(f"{name}_val_acc", 0.0))
        last_epoch = self.epoch + 1 == self.args.epochs
        if (self.epoch + 1) % self.args.test_every == 0 or last_epoch:
            for name, model in candidates.items():
                if name == record["chosen"] or last_epoch:
                    record[f"{name}_test_acc"] = self.accuracy(self.test_split, limit, model)
        for key in ("val_acc", "test_acc"):
            if f"{record['chosen']}_{key}" in record:
                record[key] = record[f"{record['chosen']}_{key}"]
        if self.args.schedule == "exponential":
            self.scheduler.step()
        record["wall_seconds"] = self.wall_seconds()
        self.epoch, self.step = self.epoch + 1, 0
        self.partial = {key: 0 for key in self.partial}
        self.metrics.append(record)
        return record

    def wall_seconds(self) -> float:
        """Seconds since the run started, training and evaluation, continued across resumes."""
        return self.clock_offset + time.perf_counter() - self.clock_start

    def accuracy(self, split, limit: int | None, model: torch.nn.Module) -> float:
        """Accuracy (%) on the first `limit` examples; each rank scores every world_size-th one."""
        count = len(split) if limit is None else min(limit, len(split))
        mine = split.subset(torch.arange(self.rank, count, self.world_size))
        correct = torch.zeros((), dtype=torch.int64)
        if len(mine):
            correct += (predict_lengths(model, mine, self.device).argmax(dim=1) == mine.labels).sum()
        return 100 * self.sum_over_ranks(correct) / count

    def save_epoch(self, record: dict) -> None:
        improved = record.get("val_acc", -1.0) > self.best_val
        if improved:
            self.best_val = record["val_acc"]  # saved in last.pt, so a resume compares against it
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        if not self.args.dry_run and self.rank == 0:
            with open(self.checkpoint_dir / "metrics.jsonl", "a") as metrics_log:
                metrics_log.write(json.dumps(record) + "\n")
            plot_curve(self.metrics, self.checkpoint_dir / "curve.png")


def plot_curve(records: list[dict], path: Path) -> None:
    """Training loss and validation/test accuracy per epoch, from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [record["epoch"] for record in records]
    loss_axis.semilogy(epochs, [record["train_loss"] for record in records], color="black")
    loss_axis.set(xlabel="epoch", ylabel="training loss (log scale)", title="loss")
    for key, label in (("val_acc", "validation"), ("test_acc", "test")):
        points = [(record["epoch"], record[key]) for record in records if key in record]
        if points:
            accuracy_axis.plot(*zip(*points), marker=".", label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    accuracy_axis.grid(alpha=0.3)
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if accuracy_axis.get_lines():  # no accuracy yet when --test-every skips the first epochs
        accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_line(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}"]
    parts += [f"{name} {record[key]:.2f}%" for name, key in (("val", "val_acc"), ("test", "test_acc")) if key in record]
    parts += [f"{record['seconds']:.0f} s", f"{record['img_per_s']:.0f} img/s"]
    if record["skipped"]:
        parts.append(f"skipped {record['skipped']}")
    return "  ".join(parts)


def resolve_resume(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """Check the checkpoint dir; on --resume, restore the saved flags except RESUMABLE_FLAGS."""
    last = Path(args.checkpoint_dir) / "last.pt"
    if args.resume is None:
        if last.exists() and not args.dry_run:
            raise UserError(
                f"{last} already exists: pass --resume to continue that run, "
                "or --checkpoint-dir to start a new one elsewhere"
            )
        return args, None
    path = last if args.resume == "last" else Path(args.resume)
    checkpoint = load_checkpoint(path)
    if "args" not in checkpoint or "epoch" not in checkpoint:
        raise UserError(f"{path} has no training flags or epoch, so there is no run to continue")
    if "optimizer" not in checkpoint:
        log(f"{path} holds weights only: continuing at the scheduled lr with fresh Adam moments")
    # Flags newer than the checkpoint keep their defaults.
    saved = {**vars(args), **checkpoint["args"], **{key: getattr(args, key) for key in RESUMABLE_FLAGS}}
    if saved["schedule"] == "onecycle" and saved["epochs"] != checkpoint["args"]["epochs"]:
        raise UserError(f"--epochs cannot change when resuming a onecycle run: its schedule spans "
                        f"the {checkpoint['args']['epochs']} epochs it was started with")
    return argparse.Namespace(**saved), checkpoint


def main(argv=None) -> None:
    args = parse_args(argv)
    args, checkpoint = resolve_resume(args)
    device = init_distributed(args)
    keep_freed_memory()
    try:
        run(args, checkpoint, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace, checkpoint: dict | None, device: torch.device) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    full_train = load_split(args.dataset, args.data_dir, train=True)
    train_split, val_split = train_val_split(full_train, args.val_size, args.train_subset, args.seed)
    test_split = load_split(args.dataset, args.data_dir, train=False)
    if args.test_subset is not None:
        test_split = test_split.subset(torch.arange(min(args.test_subset, len(test_split))))
    trainer = Trainer(args, device, train_split, val_split, test_split)
    if 0 < len(train_split) % args.batch_size < trainer.world_size:
        raise UserError(f"the last batch of {len(train_split) % args.batch_size} images cannot feed "
                        f"{trainer.world_size} processes: change --train-subset or --batch-size")
    if checkpoint is not None:
        trainer.load_state(checkpoint)
        log(f"resumed at epoch {trainer.epoch + 1}, batch {trainer.step}")
    num_params = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"model {args.model}  device {device}  processes {trainer.world_size}  threads {torch.get_num_threads()}  "
        f"parameters {num_params:,}  train {len(train_split)}  val {len(val_split) if val_split else 0}  test {len(test_split)}"
    )
    stop = StopRequest()
    while trainer.epoch < args.epochs:
        if not trainer.train_epoch(stop):
            path = trainer.save("last.pt")
            log(f"interrupted: saved {path}; continue with python train.py --resume")
            return
        record = trainer.finish_epoch()
        trainer.save_epoch(record)
        log(summary_line(record, args.epochs), flush=True)
        if args.dry_run:
            log("dry run: nothing saved")
            return
    if not args.val_size:
        log("no validation split (--val-size 0): best.pt is not written; last.pt is the final model")
    log(f"done: python evaluate.py --checkpoint {args.checkpoint_dir}/{'best' if args.val_size else 'last'}.pt")


if __name__ == "__main__":
    exit_on_user_error(main)
