"""Train a CapsNet on MNIST (or Fashion-MNIST) on CUDA, MPS or CPU, checkpointing every epoch.

    python train.py                      # 5 epochs, about half an hour on 2 CPU cores
    python train.py --epochs 30 --schedule exponential --lr 1e-3 --batch-size 128 --ema-decay 0
                                         # the earlier default recipe, 30 epochs
    python train.py --resume             # continue checkpoints/last.pt exactly where it stopped
    python train.py --resume checkpoints/capsnet_mnist.pt --checkpoint-dir runs/more
                                         # continue a weights-only checkpoint (Adam restarts)
    python train.py --init-from checkpoints/capsnet_mnist.pt --epochs 5 --lr 3e-4 \\
        --checkpoint-dir runs/finetune   # a new run (any schedule) from the shipped weights
    python train.py --train-subset 2000 --epochs 5 --data-dir ../shared/data
    python train.py --model cnn --checkpoint-dir checkpoints/cnn   # the small CNN baseline
    python train.py --dataset folder --data-dir my_images --image-size 64
                                         # your own images: my_images/{train,test}/<class>/*
    torchrun --standalone --nproc_per_node 2 train.py ...          # data-parallel (DDP)

Ctrl-C or SIGTERM finishes the current batch, saves a resumable checkpoint and exits.
Under torchrun, --batch-size stays the global batch (see training.py); if you raise it to
give each process more work, scale --lr linearly with it.
"""

import shlex
import time
from pathlib import Path

LAUNCHED = time.perf_counter()  # the run's wall clock counts from here, imports included

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
import torch
import torch.distributed as dist

from capslab.checkpoint import claim_run_folder
from capslab.data import load_run_splits
from capslab.errors import UserError, exit_on_user_error, is_main_process, log, warn
from capslab.flags import parse_flags
from capslab.hardware import emulated_bf16_warning, keep_freed_memory, set_threads
from capslab.run_plan import RunPlan, build_parser, plan_run
from capslab.training import (
    DRY_RUN_BATCHES,
    StopRequest,
    TrainConfig,
    Trainer,
    init_distributed,
    seed_everything,
)


def main(argv=None) -> None:
    args, explicit = parse_flags(build_parser(__doc__), argv)
    plan = plan_run(args, explicit)
    set_threads(args.threads)
    device = init_distributed(args.device, plan.config.batch_size)
    # An unwritable folder or a second run on it is found now, not after the first epoch.
    lock = None
    if not args.dry_run and is_main_process():
        lock = claim_run_folder(Path(args.checkpoint_dir))
    keep_freed_memory()
    try:
        seed_everything(plan.config.seed)
        model = plan.new_model()
        run(args, plan, model, device)
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, plan: RunPlan, model: torch.nn.Module, device) -> None:
    config, checkpoint, path = plan.config, plan.checkpoint, plan.path
    train_split, val_split, test_split = load_run_splits(
        config.dataset,
        args.data_dir,
        config.val_size,
        config.train_subset,
        config.test_subset,
        config.seed,
        folder=config.folder_options(),  # how to read --dataset folder; None for the others
    )
    steps_per_epoch = DRY_RUN_BATCHES if args.dry_run else -(-len(train_split) // config.batch_size)
    trainer = Trainer(
        config,
        model,
        device,
        steps_per_epoch,
        Path(args.checkpoint_dir),
        dry_run=args.dry_run,
        quiet=args.quiet,
        started=LAUNCHED,
    )
    check_batches_fit(config.batch_size, len(train_split), trainer.world_size)
    if checkpoint is None:
        trainer.progress.epochs_before = plan.epochs_before()
    else:
        if "optimizer" not in checkpoint:
            log(
                f"{path} holds weights only: continuing at the scheduled lr with fresh Adam moments"
            )
        trainer.restore(checkpoint, path)
        log(f"resumed at epoch {trainer.progress.epoch + 1}, batch {trainer.progress.batches_done}")
    log_start(trainer, device, train_split, val_split, test_split)
    try:
        train_loop(trainer, train_split, val_split, test_split, args.data_dir)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(config, device, trainer) from error
    except RuntimeError as error:
        if "can't allocate memory" not in str(error) and "out of memory" not in str(error):
            raise
        raise out_of_memory(config, device, trainer) from error


def check_batches_fit(batch_size: int, train_images: int, world_size: int) -> None:
    if batch_size > train_images:
        raise UserError(
            f"--batch-size {batch_size} is larger than the {train_images} training images"
        )
    if 0 < train_images % batch_size < world_size:
        raise UserError(
            f"the last batch of {train_images % batch_size} images cannot feed "
            f"{world_size} processes: change --train-subset or --batch-size"
        )


def log_start(trainer: Trainer, device, train_split, val_split, test_split) -> None:
    """The run's opening line (model, device, precision, sizes), and a warning for slow bf16."""
    num_params = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"model {trainer.config.model}  device {device}  "
        f"{'bf16' if trainer.config.bf16 else 'float32'}  processes {trainer.world_size}  "
        f"threads {torch.get_num_threads()}  parameters {num_params:,}  train {len(train_split)}  "
        f"val {len(val_split) if val_split else 0}  test {len(test_split)}"
    )
    if trainer.config.bf16 and (warning := emulated_bf16_warning(device)):
        warn(f"{warning}: try --no-bf16")


def out_of_memory(config: TrainConfig, device, trainer: Trainer) -> UserError:
    last = trainer.checkpoint_dir / "last.pt"
    kept = f"{last} is unchanged" if last.exists() else "nothing was saved"
    return UserError(
        f"out of memory on {device} at --batch-size {config.batch_size}: lower --batch-size; {kept}"
    )


def train_loop(trainer: Trainer, train_split, val_split, test_split, data_dir: str) -> None:
    """Epochs until the budget is spent or a signal stops the run; then the command to run next
    (it names --data-dir: the default, data/, may not be where this run read its images)."""
    stop, config = StopRequest(), trainer.config
    while trainer.progress.epoch < config.epochs:
        if not trainer.train_epoch(train_split, stop):
            if trainer.dry_run:
                log("interrupted: dry run, nothing saved")
                return
            saved = trainer.save("last.pt")
            flags = ["--resume", "--checkpoint-dir", trainer.checkpoint_dir, "--data-dir", data_dir]
            log(f"interrupted: saved {saved}; continue with {command('train.py', *flags)}")
            return
        record = trainer.score_epoch(val_split, test_split)
        trainer.close_epoch(record)
        trainer.save_epoch(record)
        log(summary_line(record, config.epochs), flush=True)
        if trainer.dry_run:
            log(
                f"dry run: {DRY_RUN_BATCHES} training and {DRY_RUN_BATCHES} evaluation batches, "
                "scored on those alone; nothing saved"
            )
            return
    if not config.val_size:
        log(
            "no validation split (--val-size 0): best.pt is not written; last.pt, with its raw "
            "weights, is the final model"
        )
    best = "best" if config.val_size else "last"
    checkpoint = trainer.checkpoint_dir / f"{best}.pt"
    log(f"done: {command('evaluate.py', '--checkpoint', checkpoint, '--data-dir', data_dir)}")


def command(script: str, *args) -> str:
    """The command line to paste into a shell: each path quoted where it needs it."""
    return shlex.join(["python", script, *map(str, args)])


def summary_line(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}"]
    parts += [
        f"{name} {record[key]:.2f}%"
        for name, key in (("val", "val_acc"), ("test", "test_acc"))
        if key in record
    ]
    parts += [f"{record['seconds']:.0f} s", f"{record['img_per_s']:.0f} img/s"]
    if record.get("chosen") == "ema":
        parts.append("(averaged weights)")
    if record["skipped"]:
        parts.append(f"skipped {record['skipped']}")
    return "  ".join(parts)


if __name__ == "__main__":
    exit_on_user_error(main)
