"""The training loop, shared by train.py (the CLI) and bench.py: settings, optimizer and
schedule, the weight average, one step, one epoch, scoring and checkpoints.

Under torchrun (WORLD_SIZE > 1) every process trains a DistributedDataParallel replica (gloo
on CPU, nccl on CUDA). The batch size stays the global batch: all ranks draw the same epoch
order and shifts and each takes its own batch_size / world_size slice of every batch, so the
run matches a single-process run up to float rounding. Only rank 0 prints and writes.
"""

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from capslab.checkpoint import (
    epochs_before,
    load_weights,
    save_checkpoint,
    saved_progress,
    training_checkpoint,
)
from capslab.data import CLASS_NAMES, DATASETS, IMAGE_SIZE, Split, batches, to_model_input
from capslab.errors import UserError, log, warn
from capslab.figures import plot_curve
from capslab.hardware import device_name, has_native_bf16, pick_device
from capslab.imagefolder import (
    IN_MEMORY_LIMIT,
    LOADINGS,
    MAX_IMAGE_SIZE,
    RECEPTIVE_FIELD,
    FolderOptions,
)
from capslab.jsonl import chosen_by_validation, write_jsonl
from capslab.models import MODEL_KINDS, trains_decoder
from capslab.scoring import EVAL_BATCH_SIZE, count_correct
from capslab.settings import SEED_RANGE, is_seed, is_whole, settings_from_dict, settings_to_dict
from CapsNet import RECONSTRUCTION_WEIGHT

SCHEDULES = ("exponential", "onecycle")
ON_NONFINITE = ("stop", "skip")  # what a NaN/inf loss or gradient does to the run
DRY_RUN_BATCHES = 2  # a dry run trains this many batches and scores this many eval batches
DIVERGED_FACTOR = 1e3  # a loss this many times the first step's has diverged
AT_CHANCE = 2  # validation accuracy under twice chance after an epoch is warned about
ONECYCLE_WARMUP = 0.3  # the share of the budget one-cycle spends warming up


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Each field is one of train.py's flags, which
    capslab/flags.py generates from the field's default and the help text in its metadata."""

    dataset: str = field(
        default="mnist", metadata={"help": "dataset to train on", "choices": DATASETS}
    )
    model: str = field(
        default="capsnet",
        metadata={
            "help": "capsnet; paper-cnn for the paper's 35.4M-parameter baseline, or cnn for a "
            "small one (baseline.py, cross-entropy loss)",
            "choices": tuple(MODEL_KINDS),
        },
    )
    # The defaults are the winner of results/README.md#time-to-accuracy: 5 epochs fit half an
    # hour on 2 CPU cores. The paper's schedule is "exponentially decaying", rate and batch not
    # given; the old default (30 epochs, batch 128, 1e-3 x 0.9 per epoch) is a flag set away.
    epochs: int = field(default=5, metadata={"help": "number of epochs"})  # onecycle spans all
    # 64: as fast per image as 128 on a CPU, so twice the steps
    batch_size: int = field(
        default=64,
        metadata={"help": "training batch size, summed over all torchrun processes"},
    )
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate; onecycle's peak"})
    lr_decay: float = field(  # 0.9: XifengGuo's choice
        default=0.9,
        metadata={"help": "learning rate factor per epoch, --schedule exponential"},
    )
    schedule: str = field(
        default="onecycle",
        metadata={
            "help": "exponential: --lr decayed by --lr-decay every epoch; onecycle: warm up to "
            f"--lr over {100 * ONECYCLE_WARMUP:.0f}% of the --epochs budget, then cosine-anneal "
            "to about zero",
            "choices": SCHEDULES,
        },
    )
    adam_betas: tuple[float, float] = field(  # PyTorch's and TensorFlow's defaults
        default=(0.9, 0.999), metadata={"help": "Adam's betas", "metavar": ("B1", "B2")}
    )
    ema_decay: float | None = field(  # None: off
        default=0.999,
        metadata={
            "help": "also keep an exponential moving average of the weights with this decay per "
            "step; validation chooses raw or averaged weights; 0 turns it off",
            "off": 0,
        },
    )
    reconstruction_weight: float = field(
        default=RECONSTRUCTION_WEIGHT,
        metadata={
            "help": "weight of the reconstruction SSE in the loss, the paper's by default; 0 "
            "trains on the margin loss alone and skips the decoder, which then stays untrained"
        },
    )
    max_shift: int = field(  # paper: shifts of up to 2 px, the only augmentation
        default=2,
        metadata={
            "help": "random shift in pixels, 0 for none; --dataset folder scales it with the "
            "image side N as on 28-px digits: round(--max-shift * N / 28)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for init, split, order and shifts"})
    train_subset: int | None = field(
        default=None,
        metadata={"help": "train on the first N training images", "default_text": "all"},
    )
    val_size: int = field(
        default=5000,
        metadata={"help": "held-out validation images that choose best.pt, 0 for none"},
    )
    test_subset: int | None = field(
        default=None,
        metadata={"help": "score only the first N test images", "default_text": "all"},
    )
    test_every: int = field(
        default=1, metadata={"help": "score the test set every N epochs and at the end"}
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "clip the gradient norm to this", "default_text": "no clipping"},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "a NaN/inf loss or gradient stops the run or skips the batch",
            "choices": ON_NONFINITE,
        },
    )
    bf16: bool | None = field(  # None: on where native
        default=None,
        metadata={
            "help": "bfloat16 autocast for the training step's convolutions and decoder; "
            "routing and the loss stay float32, evaluation is float32",
            "default_text": "on where it is native, GPUs and CPUs with AVX512-BF16 or AMX; "
            "else off",
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # --dataset folder: your own images (capslab/imagefolder.py); resolved before the run starts,
    # so the checkpoint records what ran.
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "--dataset folder: resize every image to N x N",
            "metavar": "N",
            "default_text": "28; MNIST's 28 and MultiMNIST's 36 are fixed",
        },
    )
    channels: int | None = field(
        default=None,
        metadata={
            "help": "--dataset folder: 1 converts every image to grayscale, 3 to RGB",
            "choices": (1, 3),
            "default_text": "1 if every image is grayscale, else 3",
        },
    )
    folder_loading: str = field(
        default=FolderOptions.loading,
        metadata={
            "help": "--dataset folder: hold the images in memory as uint8, or stream them from "
            "disk with DataLoader workers; auto streams a folder over capslab/imagefolder.py's "
            f"IN_MEMORY_LIMIT ({IN_MEMORY_LIMIT / 2**30:g} GiB of pixels); both give the same run",
            "choices": LOADINGS,
        },
    )
    workers: int = field(
        default=FolderOptions.workers,
        metadata={"help": "--dataset folder: DataLoader worker processes that read it"},
    )
    class_names: tuple[str, ...] | None = None  # a folder's, from its sub-folders (not a flag)
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "start a new run from the weights in PATH (the ones its validation chose): "
            "the model comes from PATH, every training setting from the flags, and the epochs, "
            "schedule, Adam and clock start afresh",
            "metavar": "PATH",
            "default_text": "off",
        },
    )

    def __post_init__(self):
        """Refuse settings a run cannot use, naming the setting (train.py shows it as a flag)."""
        for name in ("epochs", "batch_size", "test_every"):
            require(is_whole(getattr(self, name), 1), name, "a whole number >= 1")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            require(value is None or is_whole(value, 1), name, "a whole number >= 1")
        require(is_seed(self.seed), "seed", f"in {SEED_RANGE}")
        require(self.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}")
        require(self.model in MODEL_KINDS, "model", f"one of {', '.join(MODEL_KINDS)}")
        pair_models = [name for name, kind in MODEL_KINDS.items() if kind.reads_pairs]
        require(
            self.dataset != "multimnist" or self.model in pair_models,
            "model",
            f"{' or '.join(pair_models)} with --dataset multimnist, whose images hold two digits",
        )
        require(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        require(self.on_nonfinite in ON_NONFINITE, "on_nonfinite", " or ".join(ON_NONFINITE))
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number")
        require(0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]")
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            "two numbers in [0, 1)",
        )
        require(
            self.reconstruction_weight >= 0 and math.isfinite(self.reconstruction_weight),
            "reconstruction_weight",
            "a number >= 0",
        )
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "in (0, 1)")
        require(
            is_whole(self.max_shift, 0) and self.max_shift <= 8,
            "max_shift",
            "between 0 and 8",
        )
        if self.dataset == "folder":
            require(
                self.image_size is None
                or (
                    is_whole(self.image_size, RECEPTIVE_FIELD) and self.image_size <= MAX_IMAGE_SIZE
                ),
                "image_size",
                f"between {RECEPTIVE_FIELD} and {MAX_IMAGE_SIZE}",
            )
        else:
            require(
                self.image_size in (None, IMAGE_SIZE[self.dataset]),
                "image_size",
                f"{IMAGE_SIZE[self.dataset]} for {self.dataset}: it is for --dataset folder",
            )
        require(
            self.channels in (None, 1, 3)
            and (self.channels in (None, 1) or self.dataset == "folder"),
            "channels",
            "1 or 3, and 1 for MNIST's datasets: 3 is for --dataset folder",
        )
        require(self.folder_loading in LOADINGS, "folder_loading", f"one of {', '.join(LOADINGS)}")
        require(is_whole(self.workers, 0), "workers", "a whole number >= 0")
        require(is_whole(self.val_size, 0), "val_size", "a whole number >= 0")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "positive")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Settings saved by any version: names this version does not know are dropped, and a
        setting added since takes the value every run had before it existed."""
        known = {f.name for f in fields(cls)}
        return settings_from_dict(
            cls, BEFORE_THEY_EXISTED | {k: v for k, v in values.items() if k in known}
        )

    def to_dict(self) -> dict:
        return settings_to_dict(self)

    @property
    def shift(self) -> int:
        """The random shift in pixels: max_shift, which a folder's images scale with their side
        (the paper's 2 px on 28-px digits is 5 px at 64 px, 9 at 128)."""
        if self.dataset != "folder" or self.image_size is None:
            return self.max_shift
        return round(self.max_shift * self.image_size / 28)

    def folder_options(self) -> FolderOptions | None:
        """How --dataset folder reads its images (None for the built-in datasets); the size,
        channels and classes are resolved by run_plan before the run starts."""
        if self.dataset != "folder":
            return None
        return FolderOptions(
            self.image_size, self.channels, self.class_names, self.folder_loading, self.workers
        )

    def all_class_names(self) -> list[str]:
        """The classes in label order: a folder's sub-folders, else the dataset's own."""
        return list(self.class_names or CLASS_NAMES[self.dataset])


# Settings that older checkpoints do not name, with the value their runs had: not today's
# default, so an old run resumes as it started.
BEFORE_THEY_EXISTED = {
    "schedule": "exponential",
    "adam_betas": [0.9, 0.999],
    "ema_decay": None,
    "reconstruction_weight": RECONSTRUCTION_WEIGHT,
    "bf16": False,
}


def require(condition: bool, name: str, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}")


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint under these names."""

    epoch: int = 0  # completed epochs
    batches_done: int = 0  # batches of the epoch in progress
    totals: dict = field(default_factory=dict)  # sums over the epoch in progress, for its record
    shift_rng: torch.Tensor | None = None  # the shift generator's state mid-epoch
    metrics: list = field(default_factory=list)  # one record per completed epoch
    best_val: float = -1.0  # the best validation accuracy so far, which best.pt holds
    skipped: int = 0  # batches skipped for a non-finite loss (--on-nonfinite skip)
    initial_loss: float | None = None  # the run's first loss, which divergence is judged by
    wall_seconds: float = 0.0  # the run's wall clock when saved, evaluation included
    epochs_before: int | None = 0  # the --init-from weights' epochs in all (None: unknown)


PROGRESS_FIELDS = tuple(f.name for f in fields(Progress))  # each saved under its own name


def empty_totals() -> dict:
    return {"loss_sum": 0.0, "seen": 0, "grad_norm_sum": 0.0, "steps": 0, "seconds": 0.0}


class NonFiniteError(UserError):
    pass


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current batch; a second one aborts.
    DataLoader workers inherit the handler and get the terminal's Ctrl-C too: they ignore it,
    as the process that installed it stops them."""

    def __init__(self):
        self.requested = False
        self.owner = os.getpid()
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if os.getpid() != self.owner:  # a forked worker: one message, from the owner alone
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log(
            f"\n{signal.Signals(signum).name}: stopping after this batch "
            "(again to abort without saving)"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order and shifts: a resumed epoch replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def init_distributed(requested_device: str, batch_size: int) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1; return this process's device."""
    device = pick_device(requested_device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device
    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} must be divisible by the {world_size} torchrun processes"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"data-parallel training runs on cuda or cpu, not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def build_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """exponential: stepped per epoch. onecycle: stepped per batch, warming up to config.lr over
    the first ONECYCLE_WARMUP of the budget, then cosine-annealing to lr / 25e4 (not in the
    paper)."""
    if config.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    # Momentum cycling off: Adam's betas are their own setting.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=ONECYCLE_WARMUP,
        cycle_momentum=False,
    )


def ema_update(decay: float):
    """AveragedModel's update with warm-up: the decay grows as (1 + n) / (10 + n) up to `decay`,
    so the average soon forgets the random initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1 - min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        torch._foreach_lerp_(averaged, current, weight)

    return update


class Trainer:
    """The model, its optimizer, schedule and weight average, and the run's Progress.

    Each method does one thing: `train_epoch` runs the batches left in an epoch, `train_step`
    one batch, `score_epoch` makes the epoch's record, `close_epoch` moves on to the next,
    `save_epoch` writes the checkpoints and the log.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        device: torch.device,
        steps_per_epoch: int,
        checkpoint_dir: Path,
        dry_run: bool = False,
        quiet: bool = False,
        started: float | None = None,
    ):
        if config.bf16 is None:  # resolved once, so the checkpoint records what ran
            config = replace(config, bf16=has_native_bf16(device))
        self.config, self.device, self.checkpoint_dir = config, device, Path(checkpoint_dir)
        self.dry_run, self.quiet = dry_run, quiet
        self.rank, self.world_size = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        self.model = model.to(device)
        self.reconstruct = trains_decoder(config.model, config.reconstruction_weight)
        if MODEL_KINDS[config.model].has_decoder and not self.reconstruct:
            self.model.decoder.requires_grad_(False)  # untrained; DDP and Adam leave it alone
        replica = self.model
        if self.world_size > 1:  # all-reduces (averages) the gradients inside backward()
            replica = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.step_model = torch.compile(replica) if config.compile else replica
        # One fused kernel for all the parameters, 8.2M in the paper's model (results/README.md
        # has the timing).
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=config.adam_betas, fused=True
        )
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=ema_update(config.ema_decay)
            )
        self.progress = Progress(totals=empty_totals())
        self.started = time.perf_counter() if started is None else started  # this process's clock
        self.clock_offset = 0.0  # what the run's clock read when this process resumed it

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> dict:
        self.progress.wall_seconds = self.wall_seconds()
        progress = {name: getattr(self.progress, name) for name in PROGRESS_FIELDS}
        return training_checkpoint(
            self.model,
            self.ema,
            self.optimizer,
            self.scheduler,
            self.config.model,
            self.config.dataset,
            self.config.to_dict(),
            progress,
            self.config.all_class_names(),
        )

    def restore(self, checkpoint: dict, path: Path) -> None:
        """Continue a training checkpoint exactly, or a weights-only one at the scheduled lr."""
        load_weights(self.model, checkpoint["model"], path)
        saved = saved_progress(checkpoint, PROGRESS_FIELDS)
        before = epochs_before(checkpoint)  # older files lack it
        self.progress = Progress(**{"totals": empty_totals(), **saved, "epochs_before": before})
        self.clock_offset = self.progress.wall_seconds
        if self.ema is not None and checkpoint.get("ema") is not None:
            load_weights(self.ema.module, checkpoint["ema"], path)
            self.ema.n_averaged.fill_(checkpoint["ema_updates"])
        if "optimizer" not in checkpoint:
            self.warm_restart()
            return
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise UserError(
                f"{path} holds an optimizer or schedule state this run cannot use ({error})"
            ) from error

    def warm_restart(self) -> None:
        """Weights only: the scheduled lr of the next epoch; Adam's moments start from zero."""
        if self.config.schedule != "exponential":
            raise UserError(
                "a weights-only checkpoint can only be continued with --schedule exponential"
            )
        epoch = self.progress.epoch
        self.scheduler.last_epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self.config.lr_decay**epoch
        chosen = chosen_by_validation(self.progress.metrics)
        self.progress.best_val = chosen["val_acc"] if chosen else -1.0
        self.progress.batches_done, self.progress.totals = 0, empty_totals()

    def save(self, name: str) -> Path:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteError(
                f"the weights are not finite at epoch {self.progress.epoch + 1}; "
                f"{name} was not written"
            )
        path = self.checkpoint_dir / name
        if not self.dry_run and self.rank == 0:
            save_checkpoint(self.checkpoint(), path)
        return path

    def wall_seconds(self) -> float:
        """Seconds since the run was launched, evaluation included, continued across resumes."""
        return self.clock_offset + time.perf_counter() - self.started

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
    def train_epoch(self, train_split: Split, stop: StopRequest) -> bool:
        """Train the batches left in the current epoch; False if a stop was requested."""
        self.model.train()
        progress, epoch = self.progress, self.progress.epoch
        generator = epoch_generator(self.config.seed, epoch)
        order = torch.randperm(len(train_split), generator=generator)
        if progress.batches_done:  # resumed mid-epoch: the shifts continue where they stopped
            generator.set_state(progress.shift_rng)
        size = self.config.batch_size
        total = min(-(-len(order) // size), DRY_RUN_BATCHES if self.dry_run else len(order))
        # The batches left, made as they are trained: a folder streamed from disk reads each
        # one then (its workers read ahead), and memory holds a batch, not the epoch.
        remaining = order[progress.batches_done * size : total * size]
        bar = tqdm(
            batches(train_split, size, remaining),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            initial=progress.batches_done,
            total=total,
            leave=False,
            disable=self.quiet or self.rank > 0,
        )
        started = time.perf_counter()
        for images, labels in bar:
            loss, grad_norm = self.train_step(images, labels, generator, train_split)
            self.count_batch(loss, grad_norm, len(labels))
            bar.set_postfix(loss=f"{loss if loss is not None else float('nan'):.4f}")
            # Every rank must stop after the same batch, or the others wait in all-reduce forever.
            if self.sum_over_ranks(torch.tensor(float(stop.requested))) > 0:
                progress.totals["seconds"] += time.perf_counter() - started
                progress.shift_rng = generator.get_state()
                return False
        progress.totals["seconds"] += time.perf_counter() - started
        return True

    def count_batch(self, loss: float | None, grad_norm: float, size: int) -> None:
        totals = self.progress.totals
        self.progress.batches_done += 1
        totals["seen"] += size
        if loss is not None:
            totals["loss_sum"] += loss * size
            totals["grad_norm_sum"] += grad_norm
            totals["steps"] += 1

    def train_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        split: Split | None = None,
    ) -> tuple[float | None, float]:
        """One Adam step on a batch (uint8 (B, [C,] H, W), (B,)), made with `generator` by the
        training split's `training_batch` (MNIST: random shifts; a MultiMNIST PairPool: pairs).
        Returns (loss, grad norm), or (None, nan) for a skipped batch."""
        # Every rank makes the whole global batch with the same generator, then takes its share.
        maker = split if split is not None else Split(images, labels)
        batch = maker.training_batch(images, labels, self.config.shift, generator)
        mine = self.local_indices(len(labels))
        x = to_model_input(batch.images[mine], self.device)  # (b, C, H, W) in [0, 1]
        y = batch.labels[mine].to(self.device)  # (b,), or (b, 2) for pairs
        originals = None  # what the decoder draws: x itself, or each digit of a pair alone
        if batch.sources is not None:
            sources = batch.sources[mine]  # (b, 2, H, W)
            originals = to_model_input(sources.flatten(0, 1), self.device).unflatten(0, y.shape)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting by the local share makes that the
        # gradient of the global batch mean even when the last batch splits unevenly.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            loss = self.loss(x, y, originals) * (len(y) * self.world_size / len(labels))
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in params]
        ).item()  # same on every rank
        loss_value = self.sum_over_ranks(loss.detach()) / self.world_size
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return self.nonfinite(loss_value, grad_norm)
        self.check_divergence(loss_value)
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(
                params, self.config.max_grad_norm, torch.tensor(grad_norm)
            )
        self.optimizer.step()
        if self.config.schedule == "onecycle":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss_value, grad_norm

    def nonfinite(self, loss_value: float, grad_norm: float) -> tuple[None, float]:
        """--on-nonfinite stop: raise, keeping the last good checkpoint; skip: count the batch."""
        where = f"epoch {self.progress.epoch + 1} step {self.progress.batches_done + 1}"
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient at {where} "
                f"(loss {loss_value}, grad norm {grad_norm}); "
                f"stopped, {self.last_good_checkpoint()}"
            )
        self.progress.skipped += 1
        return None, float("nan")

    def last_good_checkpoint(self) -> str:
        last = self.checkpoint_dir / "last.pt"
        return f"the last good checkpoint is {last}" if last.exists() else "nothing was saved yet"

    def check_divergence(self, loss_value: float) -> None:
        """A loss DIVERGED_FACTOR times the run's first (the untrained model's, which theory
        fixes) has diverged while staying finite: stop as for a non-finite one, before the step,
        so last.pt stays the last good checkpoint. --on-nonfinite skip does not apply: a
        diverged run does not come back by skipping a batch."""
        if self.progress.initial_loss is None:
            self.progress.initial_loss = loss_value
        elif loss_value > DIVERGED_FACTOR * self.progress.initial_loss:
            where = f"epoch {self.progress.epoch + 1} step {self.progress.batches_done + 1}"
            raise NonFiniteError(
                f"the loss diverged at {where}: {loss_value:.3g}, over {DIVERGED_FACTOR:g} times "
                f"the first step's {self.progress.initial_loss:.3g} (lower --lr); stopped, "
                f"{self.last_good_checkpoint()}"
            )

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, originals: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Batch-mean loss: the model kind's own (margin + reconstruction for CapsNet)."""
        loss = MODEL_KINDS[self.config.model].loss
        return loss(self.step_model, x, y, self.config.reconstruction_weight, originals)

    # --- end of an epoch ---------------------------------------------------------------
    def score_epoch(self, val_split: Split | None, test_split: Split) -> dict:
        """The finished epoch's record: training totals, then validation and test accuracy.

        With a weight average, validation scores both and chooses one ("chosen"); the test
        set scores the choice, and both at the last epoch. val_acc and test_acc are the choice's.
        """
        epoch, totals = self.progress.epoch + 1, self.progress.totals
        record = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": totals["loss_sum"] / max(totals["seen"], 1),
            "grad_norm": totals["grad_norm_sum"] / max(totals["steps"], 1),
            "seconds": totals["seconds"],
            "img_per_s": totals["seen"] / totals["seconds"] if totals["seconds"] else 0.0,
            "machine": device_name(self.device),  # what the speed above was measured on
            "bf16": self.config.bf16,
            "skipped": self.progress.skipped,
        }
        candidates = {"raw": self.model} | ({"ema": self.ema.module} if self.ema else {})
        record["chosen"] = "raw"  # without validation there is nothing to choose by
        if val_split is not None:
            for name, model in candidates.items():
                record[f"{name}_val_acc"] = self.accuracy(model, val_split)
            record["chosen"] = max(candidates, key=lambda name: record[f"{name}_val_acc"])
        last_epoch = epoch == self.config.epochs
        if epoch % self.config.test_every == 0 or last_epoch:
            for name, model in candidates.items():
                if name == record["chosen"] or last_epoch:
                    record[f"{name}_test_acc"] = self.accuracy(model, test_split)
        for key in ("val_acc", "test_acc"):
            if f"{record['chosen']}_{key}" in record:
                record[key] = record[f"{record['chosen']}_{key}"]
        record["wall_seconds"] = self.wall_seconds()
        self.warn_at_chance(record, val_split)
        return record

    def warn_at_chance(self, record: dict, val_split: Split | None) -> None:
        """A run that trains to chance (too high an --lr, say) ends with exit 0: say so, when
        validation is at chance and the epoch's loss is no lower than the first step's (a short
        run that is learning can still be near chance after one epoch)."""
        initial = self.progress.initial_loss
        if "val_acc" not in record or initial is None or record["train_loss"] < initial:
            return
        classes = len(self.config.all_class_names())
        # One digit: 1 in K; a MultiMNIST pair: 1 in K choose 2 for the two longest capsules.
        chance = 100 / (math.comb(classes, 2) if val_split.labels.dim() == 2 else classes)
        if record["val_acc"] < AT_CHANCE * chance:
            warn(
                f"validation accuracy {record['val_acc']:.2f}% after epoch "
                f"{record['epoch']} is at chance ({chance:.1f}%) and the loss is no lower than "
                "at the start: the model is not learning; try a lower --lr"
            )

    def accuracy(self, model: torch.nn.Module, split: Split) -> float:
        """Accuracy (%) on `split` (its first DRY_RUN_BATCHES evaluation batches in a dry run);
        each rank scores every world_size-th example."""
        count = min(len(split), DRY_RUN_BATCHES * EVAL_BATCH_SIZE) if self.dry_run else len(split)
        mine = split.subset(torch.arange(self.rank, count, self.world_size))
        correct = torch.tensor(count_correct(model, mine, self.device) if len(mine) else 0)
        return 100 * self.sum_over_ranks(correct) / count

    def close_epoch(self, record: dict) -> None:
        """Log the record and move on: the per-epoch schedule steps, the totals start afresh."""
        if self.config.schedule == "exponential":
            self.scheduler.step()
        self.progress.metrics.append(record)
        self.progress.epoch += 1
        self.progress.batches_done, self.progress.totals, self.progress.shift_rng = (
            0,
            empty_totals(),
            None,
        )

    def save_epoch(self, record: dict) -> None:
        """best.pt first, then last.pt, then the log rewritten from last.pt's metrics: a crash
        at any point leaves last.pt no newer than best.pt and the log no newer than last.pt."""
        improved = record.get("val_acc", -1.0) > self.progress.best_val
        if improved:
            self.progress.best_val = record[
                "val_acc"
            ]  # saved in last.pt, so a resume compares against it
            self.save("best.pt")
        self.save("last.pt")
        if not self.dry_run and self.rank == 0:
            write_log(self.progress.metrics, self.checkpoint_dir)


def write_log(metrics: list[dict], folder: Path) -> None:
    """metrics.jsonl (one record per epoch) and curve.png, rewritten whole and atomically."""
    write_jsonl(metrics, folder / "metrics.jsonl")
    plot_curve(metrics, folder / "curve.png")
