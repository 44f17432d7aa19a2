"""Train a CapsNet on MNIST (or Fashion-MNIST) on CUDA, MPS or CPU, checkpointing every epoch.

    python train.py                      # 5 epochs, about half an hour on 2 CPU cores
    python train.py --epochs 30 --schedule exponential --lr 1e-3 --batch-size 128 --ema-decay 0
                                         # the earlier default recipe, 30 epochs
    python train.py --resume             # continue checkpoints/last.pt exactly where it stopped
    python train.py --resume checkpoints/capsnet_mnist.pt --checkpoint-dir runs/more
                                         # continue a weights-only checkpoint (Adam restarts)
    python train.py --init-from checkpoints/capsnet_mnist.pt --epochs 5 --lr 3e-4 \
        --checkpoint-dir runs/finetune   # a new run (any schedule) from the shipped weights
    python train.py --train-subset 2000 --epochs 5 --data-dir ../shared/data
    python train.py --model cnn --checkpoint-dir checkpoints/cnn   # the small CNN baseline
    torchrun --standalone --nproc_per_node 2 train.py ...          # data-parallel (DDP)

Ctrl-C or SIGTERM finishes the current batch, saves a resumable checkpoint and exits.
Under torchrun, --batch-size stays the global batch (see training.py); if you raise it to
give each process more work, scale --lr linearly with it.
"""

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path

LAUNCHED = time.perf_counter()  # the run's wall clock counts from here, imports included

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from capslab.checkpoint import (  # noqa: E402
    claim_run_folder,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from capslab.data import DATASETS, add_data_flags, load_split, train_val_split  # noqa: E402
from capslab.errors import UserError, exit_on_user_error, flag_name  # noqa: E402
from capslab.hardware import add_device_flags, has_native_bf16, keep_freed_memory, set_threads  # noqa: E402
from capslab.models import MODEL_KINDS  # noqa: E402
from capslab.training import (  # noqa: E402
    DRY_RUN_BATCHES,
    ON_NONFINITE,
    ONECYCLE_WARMUP,
    SCHEDULES,
    StopRequest,
    TrainConfig,
    Trainer,
    init_distributed,
    is_main_process,
    log,
    seed_everything,
)
from CapsNet import CapsNetConfig  # noqa: E402

RESUMABLE = {"epochs", "bf16", "compile"}  # settings a resumed run may change
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a fresh run would overwrite these
MODEL_FLAGS = ("routing_iterations", "detach_early_routing")  # CapsNetConfig fields set by flags
DEFAULTS, PAPER = TrainConfig(), CapsNetConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--dataset",
        default=DEFAULTS.dataset,
        choices=DATASETS,
        help="dataset to train on (default: %(default)s)",
    )
    add(
        "--model",
        default=DEFAULTS.model,
        choices=tuple(MODEL_KINDS),
        help="capsnet; paper-cnn for the paper's 35.4M-parameter baseline, or cnn for a small "
        "one (baseline.py, cross-entropy loss) (default: %(default)s)",
    )
    add(
        "--epochs",
        type=int,
        default=DEFAULTS.epochs,
        help="number of epochs (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="training batch size, summed over all torchrun processes (default: %(default)s)",
    )
    add(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help="Adam learning rate; onecycle's peak (default: %(default)s)",
    )
    add(
        "--lr-decay",
        type=float,
        default=DEFAULTS.lr_decay,
        help="learning rate factor per epoch, --schedule exponential (default: %(default)s)",
    )
    add(
        "--schedule",
        default=DEFAULTS.schedule,
        choices=SCHEDULES,
        help="exponential: --lr decayed by --lr-decay every epoch; onecycle: warm up to --lr "
        f"over {100 * ONECYCLE_WARMUP:.0f}%% of the --epochs budget, then cosine-anneal to about "
        "zero (default: %(default)s)",
    )
    add(
        "--adam-betas",
        type=float,
        nargs=2,
        default=DEFAULTS.adam_betas,
        metavar=("B1", "B2"),
        help=f"Adam's betas (default: {' '.join(map(str, DEFAULTS.adam_betas))})",
    )
    add(
        "--ema-decay",
        type=float,
        default=DEFAULTS.ema_decay,
        help="also keep an exponential moving average of the weights with this decay per step; "
        "validation chooses raw or averaged weights; 0 turns it off (default: %(default)s)",
    )
    add(
        "--routing-iterations",
        type=int,
        default=PAPER.routing_iterations,
        help="routing iterations r (default: %(default)s)",
    )
    add(
        "--detach-early-routing",
        action="store_true",
        default=PAPER.detach_early_routing,
        help="stop gradients through u_hat in all but the last routing iteration, as some "
        "public ports do; "
        "not in the paper (default: off)",
    )
    add(
        "--max-shift",
        type=int,
        default=DEFAULTS.max_shift,
        help="random shift in pixels, 0 for none (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed for init, split, order and shifts (default: %(default)s)",
    )
    add(
        "--train-subset",
        type=int,
        default=DEFAULTS.train_subset,
        help="train on the first N training images (default: all)",
    )
    add(
        "--val-size",
        type=int,
        default=DEFAULTS.val_size,
        help="held-out validation images that choose best.pt, 0 for none (default: %(default)s)",
    )
    add(
        "--test-every",
        type=int,
        default=DEFAULTS.test_every,
        help="score the test set every N epochs and at the end (default: %(default)s)",
    )
    add(
        "--reconstruction-weight",
        type=float,
        default=DEFAULTS.reconstruction_weight,
        help="weight of the reconstruction SSE in the loss; 0 trains on the margin loss alone "
        "and skips the decoder, which then stays untrained (default: %(default)s, the paper's)",
    )
    add(
        "--max-grad-norm",
        type=float,
        default=DEFAULTS.max_grad_norm,
        help="clip the gradient norm to this (default: no clipping)",
    )
    add(
        "--on-nonfinite",
        default=DEFAULTS.on_nonfinite,
        choices=ON_NONFINITE,
        help="a NaN/inf loss or gradient stops the run or skips the batch (default: %(default)s)",
    )
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.bf16,
        help="bfloat16 autocast for the training step's convolutions and decoder; routing and "
        "the loss stay float32, evaluation is float32 (default: on where it is native, GPUs "
        "and CPUs with AVX512-BF16 or AMX; else off)",
    )
    add_data_flags(parser)
    add_device_flags(parser)
    add(
        "--checkpoint-dir",
        default="checkpoints",
        help="where last.pt, best.pt and the log go (default: checkpoints)",
    )
    add(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="PATH",
        help="continue PATH (or CHECKPOINT_DIR/last.pt) with its saved settings; only "
        f"{', '.join(map(flag_name, sorted(RESUMABLE)))} may change (--epochs not under the "
        "onecycle schedule), besides --device, --threads, --data-dir, --checkpoint-dir, --quiet "
        "and --dry-run (default: off)",
    )
    add(
        "--init-from",
        default=DEFAULTS.init_from,
        metavar="PATH",
        help="start a new run from the weights in PATH (the ones its validation chose): the "
        "model comes from PATH, every training setting from the flags, and the epochs, "
        "schedule, Adam and clock start afresh (default: off)",
    )
    add(
        "--dry-run",
        action="store_true",
        help=f"run {DRY_RUN_BATCHES} training and {DRY_RUN_BATCHES} test batches, save nothing "
        "(default: off)",
    )
    add("--quiet", action="store_true", help="no progress bars (default: off)")
    return parser


def explicit_flags(args: argparse.Namespace, argv) -> set[str]:
    """The settings given on the command line, as opposed to left at their defaults.

    argparse fills in a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker keeps the marker exactly where no flag was given.
    """
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    build_parser().parse_args(argv, namespace=namespace)
    return {name for name, value in vars(namespace).items() if value is not unset}


def as_user_error(error: ValueError) -> UserError:
    """A config's "name must be ..." becomes "--name must be ...", the flag the user typed."""
    name, _, rest = str(error).partition(" ")
    return UserError(f"{flag_name(name)} {rest}")


def flag_value(args: argparse.Namespace, name: str):
    """A flag's value as TrainConfig holds it: betas as a tuple, --ema-decay 0 as None (off)."""
    value = getattr(args, name)
    if name == "adam_betas":
        return tuple(value)
    if name == "ema_decay":
        return value or None
    return value


def contradicted_flag(args: argparse.Namespace, names, saved: dict) -> str | None:
    """The first of the explicit flag names whose value differs from saved[name], or None."""
    return next((name for name in sorted(names) if flag_value(args, name) != saved[name]), None)


def model_flag_values(model_config) -> dict:
    """The model config's values of the flags in MODEL_FLAGS (None where it has no such field)."""
    return {name: getattr(model_config, name, None) for name in MODEL_FLAGS}


def configs_from_flags(args: argparse.Namespace):
    """A fresh run: (TrainConfig, model class, model config) from the command line."""
    try:
        config = TrainConfig(
            **{name: flag_value(args, name) for name in TrainConfig.__dataclass_fields__}
        )
        kind = MODEL_KINDS[config.model]
        flags = {name: getattr(args, name) for name in MODEL_FLAGS}
        model_fields = {field.name for field in fields(kind.config_class)}
        if not flags.keys() <= model_fields:  # the CNNs have no routing
            flags = {}
        return config, kind.model_class, kind.config_class(**flags)
    except ValueError as error:
        raise as_user_error(error) from error


def configs_from_checkpoint(
    args: argparse.Namespace, explicit: set[str], checkpoint: dict, path: Path
):
    """A resumed run: the saved settings, with what the command line may change."""
    try:
        saved = TrainConfig.from_dict(checkpoint["train_config"])
    except (AttributeError, TypeError, ValueError) as error:  # e.g. not a dict
        raise UserError(f"{path} holds invalid training settings ({error})") from error
    model_class, model_config = config_from_checkpoint(checkpoint, path)
    saved_values = {
        **{name: getattr(saved, name) for name in TrainConfig.__dataclass_fields__},
        **model_flag_values(model_config),
    }
    if name := contradicted_flag(args, explicit & saved_values.keys() - RESUMABLE, saved_values):
        raise UserError(
            f"{flag_name(name)} cannot change when resuming: {path} was trained "
            f"with {saved_values[name]!r}; start a new run with --checkpoint-dir instead"
        )
    changes = {name: getattr(args, name) for name in explicit & RESUMABLE}
    if saved.schedule == "onecycle" and changes.get("epochs", saved.epochs) != saved.epochs:
        raise UserError(
            f"--epochs cannot change when resuming a onecycle run: its schedule spans "
            f"the {saved.epochs} epochs it was started with"
        )
    try:
        return replace(saved, **changes), model_class, model_config
    except ValueError as error:
        raise as_user_error(error) from error


def init_from_checkpoint(args: argparse.Namespace, explicit: set[str], config: TrainConfig):
    """--init-from: the checkpoint, checked against the flags, with a warning when this run's
    validation split is not the checkpoint's."""
    path = Path(args.init_from)
    checkpoint = load_checkpoint(path)
    _, model_config = config_from_checkpoint(checkpoint, path)
    kind, dataset = checkpoint["model_kind"], checkpoint["dataset"]
    if (kind, dataset) != (config.model, config.dataset):
        raise UserError(
            f"{path} holds a {kind} trained on {dataset}: pass --model {kind} --dataset {dataset}"
        )
    saved_model = model_flag_values(model_config)
    if name := contradicted_flag(args, explicit & saved_model.keys(), saved_model):
        raise UserError(
            f"{flag_name(name)} cannot differ from the {saved_model[name]!r}"
            f" of {path}: with --init-from the model comes from the checkpoint"
        )
    saved = checkpoint.get("train_config") or {}
    split = ("seed", "val_size", "train_subset")
    if config.val_size and any(saved.get(name) != getattr(config, name) for name in split):
        log(
            f"warning: {path} was trained on another split (--seed {saved.get('seed')} "
            f"--val-size {saved.get('val_size')}), so this run's validation images may be "
            "ones it trained on"
        )
    return checkpoint


def resume_path(args: argparse.Namespace) -> Path | None:
    """Check the checkpoint folder; the checkpoint to continue, or None for a fresh run."""
    folder = Path(args.checkpoint_dir)
    last = folder / "last.pt"
    if args.resume is None:
        kept = [folder / name for name in RUN_FILES if (folder / name).exists()]
        if kept and not args.dry_run:
            raise UserError(
                f"{kept[0]} already exists: pass --resume to continue that run, "
                "or --checkpoint-dir to start a new one elsewhere"
            )
        return None
    path = last if args.resume == "last" else Path(args.resume)
    if last.exists() and path.resolve() != last.resolve() and not args.dry_run:
        raise UserError(
            f"{args.checkpoint_dir} holds another run ({last}): continue {path} "
            "into an empty --checkpoint-dir"
        )
    return path


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.init_from is not None and args.resume is not None:
        raise UserError(
            "--init-from starts a new run from a checkpoint's weights and --resume continues "
            "one: pass only one of them"
        )
    path = resume_path(args)
    checkpoint = None
    initial = None  # the --init-from checkpoint
    if path is None:
        config, model_class, model_config = configs_from_flags(args)
        if args.init_from is not None:
            initial = init_from_checkpoint(args, explicit_flags(args, argv), config)
    else:
        checkpoint = load_checkpoint(path)
        if "train_config" not in checkpoint or "epoch" not in checkpoint:
            raise UserError(
                f"{path} has no training settings or epoch, so there is no run to continue"
            )
        config, model_class, model_config = configs_from_checkpoint(
            args, explicit_flags(args, argv), checkpoint, path
        )
    set_threads(args.threads)
    device = init_distributed(args.device, config.batch_size)
    # An unwritable folder or a second run on it is found now, not after the first epoch.
    lock = None
    if not args.dry_run and is_main_process():
        lock = claim_run_folder(Path(args.checkpoint_dir))
    keep_freed_memory()
    try:
        seed_everything(config.seed)
        if initial is None:
            model = model_class(model_config)
        else:  # built as model_class(model_config) is, so the seeded stream is the same
            model = model_from_checkpoint(initial, config.init_from)
        run(args, config, model, device, checkpoint, path)
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(
    args,
    config: TrainConfig,
    model: torch.nn.Module,
    device,
    checkpoint: dict | None,
    path: Path | None,
) -> None:
    full_train = load_split(config.dataset, args.data_dir, train=True)
    train_split, val_split = train_val_split(
        full_train, config.val_size, config.train_subset, config.seed
    )
    test_split = load_split(config.dataset, args.data_dir, train=False).first(config.test_subset)
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
    if checkpoint is not None:
        if "optimizer" not in checkpoint:
            log(
                f"{path} holds weights only: continuing at the scheduled lr with fresh Adam moments"
            )
        trainer.restore(checkpoint, path)
        log(f"resumed at epoch {trainer.progress.epoch + 1}, batch {trainer.progress.batches_done}")
    log_start(trainer, device, train_split, val_split, test_split)
    try:
        train_loop(trainer, train_split, val_split, test_split)
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
    if trainer.config.bf16 and not has_native_bf16(device):
        log(
            f"warning: bf16 is emulated on this {device.type} (no AVX512-BF16 or AMX) and can be "
            "many times slower than float32 (15x on an AVX2-only AMD EPYC): try --no-bf16"
        )


def out_of_memory(config: TrainConfig, device, trainer: Trainer) -> UserError:
    last = trainer.checkpoint_dir / "last.pt"
    kept = f"{last} is unchanged" if last.exists() else "nothing was saved"
    return UserError(
        f"out of memory on {device} at --batch-size {config.batch_size}: lower --batch-size; {kept}"
    )


def train_loop(trainer: Trainer, train_split, val_split, test_split) -> None:
    stop, config = StopRequest(), trainer.config
    while trainer.progress.epoch < config.epochs:
        if not trainer.train_epoch(train_split, stop):
            saved = trainer.save("last.pt")
            log(
                f"interrupted: saved {saved}; continue with "
                "python train.py --resume --checkpoint-dir "
                f"{trainer.checkpoint_dir}"
            )
            return
        record = trainer.score_epoch(val_split, test_split)
        trainer.close_epoch(record)
        trainer.save_epoch(record)
        log(summary_line(record, config.epochs), flush=True)
        if trainer.dry_run:
            log("dry run: nothing saved")
            return
    if not config.val_size:
        log(
            "no validation split (--val-size 0): best.pt is not written; last.pt, with its raw "
            "weights, is the final model"
        )
    best = "best" if config.val_size else "last"
    log(f"done: python evaluate.py --checkpoint {trainer.checkpoint_dir / best}.pt")


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
