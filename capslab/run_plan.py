"""What a training run starts from, decided from train.py's flags before anything is set up:
its settings, its model, and the checkpoint it continues (--resume) or starts from (--init-from).

A fresh run takes every setting from the flags. A resumed run keeps its checkpoint's settings, of
which only RESUMABLE may change; a flag given explicitly that contradicts any other is refused.
--init-from takes the model from the checkpoint, so its model flags must agree with it.
"""

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from capslab.checkpoint import (
    class_names,
    config_from_checkpoint,
    epochs_in_all,
    load_checkpoint,
    model_from_checkpoint,
)
from capslab.data import IMAGE_SIZE, add_data_flags
from capslab.errors import UserError, counted, flag_name, log, warn
from capslab.flags import add_config_flags, flag_fields, flag_values
from capslab.hardware import add_device_flags
from capslab.imagefolder import inspect_folder
from capslab.models import MODEL_KINDS, refuse_unbuildable
from capslab.training import DRY_RUN_BATCHES, TrainConfig
from CapsNet import CapsNetConfig

# Settings a resumed run may change: none of them changes what it computes.
RESUMABLE = {"epochs", "bf16", "compile", "folder_loading", "workers"}
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a fresh run would overwrite these
MODEL_FLAGS = tuple(field.name for field in flag_fields(CapsNetConfig))  # routing's flags


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's parser, which sweep.py checks grids with. The training and model settings'
    flags come from their config fields (capslab/flags.py); the flags below them belong to this
    run alone and are not saved as settings."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_config_flags(parser.add_argument_group("model (CapsNetConfig)"), CapsNetConfig)
    this_run = parser.add_argument_group("this run")
    add_data_flags(this_run, test_subset=False)  # --test-subset is a TrainConfig field
    add_device_flags(this_run)
    add = this_run.add_argument
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
        "--dry-run",
        action="store_true",
        help=f"run {DRY_RUN_BATCHES} training and {DRY_RUN_BATCHES} test batches, save nothing "
        "(default: off)",
    )
    add("--quiet", action="store_true", help="no progress bars (default: off)")
    return parser


@dataclass
class RunPlan:
    config: TrainConfig
    model_class: type
    model_config: object
    checkpoint: dict | None = None  # the run to continue (--resume)
    path: Path | None = None  # where it came from
    initial: dict | None = None  # the checkpoint whose weights a fresh run starts from

    def new_model(self) -> torch.nn.Module:
        """The model, built as model_class(model_config) is (so the seeded stream is the same),
        with the --init-from weights where there are any."""
        if self.initial is None:
            return self.model_class(self.model_config)
        return model_from_checkpoint(self.initial, self.config.init_from)

    def epochs_before(self) -> int | None:
        """The epochs the starting weights have trained: 0 from scratch, None if unknown."""
        return 0 if self.initial is None else epochs_in_all(self.initial)


def plan_run(args: argparse.Namespace, explicit: set[str]) -> RunPlan:
    """The run the flags ask for; `explicit` names the flags given on the command line."""
    if args.init_from is not None and args.resume is not None:
        raise UserError(
            "--init-from starts a new run from a checkpoint's weights and --resume continues "
            "one: pass only one of them"
        )
    path = resume_path(args)
    if path is None:
        plan = RunPlan(*configs_from_flags(args))
        if args.init_from is not None:  # the model is the checkpoint's
            plan.initial, plan.model_config = init_from_checkpoint(args, explicit, plan.config)
    else:
        checkpoint = load_checkpoint(path)
        if "train_config" not in checkpoint or "epoch" not in checkpoint:
            raise UserError(
                f"{path} has no training settings or epoch, so there is no run to continue"
            )
        plan = RunPlan(*configs_from_checkpoint(args, explicit, checkpoint, path), checkpoint, path)
    refuse_unbuildable(plan.model_class, plan.model_config, 4, "training", "the model")
    return plan


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


def configs_from_flags(args: argparse.Namespace):
    """A fresh run: (TrainConfig, model class, model config) from the command line."""
    try:
        config = TrainConfig(**flag_values(args, TrainConfig))
        if config.dataset == "folder":
            config = resolve_folder(config, args.data_dir)
        kind = MODEL_KINDS[config.model]
        flags = flag_values(args, CapsNetConfig)
        if not flags.keys() <= {field.name for field in fields(kind.config_class)}:
            flags = {}  # the CNNs have no routing
        model_config = kind.config_class(**flags, **input_shape(config))
        return config, kind.model_class, model_config
    except ValueError as error:
        raise as_user_error(error) from error


def resolve_folder(config: TrainConfig, data_dir) -> TrainConfig:
    """--dataset folder: the classes (its sub-folders), the channels (detected unless given)
    and the side (28 unless given) become settings, so the checkpoint records what ran."""
    info = inspect_folder(data_dir, config.channels)
    for note in info.notes:
        log(note)
    return replace(
        config,
        image_size=config.image_size or IMAGE_SIZE["folder"],
        channels=info.channels,
        class_names=info.class_names,
    )


def input_shape(config: TrainConfig) -> dict:
    """The model's input side, channels and classes, from the dataset: 36x36 MultiMNIST pairs
    give 3,200 primary capsules; a folder's come from resolve_folder."""
    return {
        "image_size": config.image_size or IMAGE_SIZE[config.dataset],
        "in_channels": config.channels or 1,
        "num_classes": len(config.all_class_names()),
    }


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
        **{field.name: getattr(saved, field.name) for field in fields(TrainConfig)},
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
            f"the {counted(saved.epochs, 'epoch')} it was started with"
        )
    try:
        resumed = replace(saved, **changes)
    except ValueError as error:
        raise as_user_error(error) from error
    done = checkpoint["epoch"]  # a count: load_checkpoint checked it
    if done >= resumed.epochs:
        more = "raise --epochs to train more" if saved.schedule != "onecycle" else "it is finished"
        raise UserError(
            f"{path} has trained {done} of --epochs {resumed.epochs}: nothing to resume; {more}"
        )
    return resumed, model_class, model_config


def init_from_checkpoint(args: argparse.Namespace, explicit: set[str], config: TrainConfig):
    """--init-from: the checkpoint and its model config, checked against the flags, with a
    warning when this run's validation split is not the checkpoint's."""
    path = Path(args.init_from)
    checkpoint = load_checkpoint(path)
    _, model_config = config_from_checkpoint(checkpoint, path)
    kind, dataset = checkpoint["model_kind"], checkpoint["dataset"]
    if (kind, dataset) != (config.model, config.dataset):
        raise UserError(
            f"{path} holds a {kind} trained on {dataset}: pass --model {kind} --dataset {dataset}"
        )
    if config.class_names and tuple(class_names(checkpoint)) != config.class_names:
        raise UserError(
            f"{path} was trained on the classes {', '.join(class_names(checkpoint))}, "
            f"not {args.data_dir}'s {', '.join(config.class_names)}"
        )
    saved_model = model_flag_values(model_config)
    if name := contradicted_flag(args, explicit & saved_model.keys(), saved_model):
        raise UserError(
            f"{flag_name(name)} cannot differ from the {saved_model[name]!r}"
            f" of {path}: with --init-from the model comes from the checkpoint"
        )
    saved = checkpoint.get("train_config") or {}
    split = ("seed", "val_size", "train_subset")
    differing = [name for name in split if saved.get(name) != getattr(config, name)]
    if config.val_size and differing:
        theirs = " ".join(f"{flag_name(name)} {saved.get(name)}" for name in differing)
        ours = " ".join(f"{flag_name(name)} {getattr(config, name)}" for name in differing)
        warn(
            f"{path} was trained on another split ({theirs}; this run: {ours}), so this run's "
            "validation images may be ones it trained on"
        )
    return checkpoint, model_config


def contradicted_flag(args: argparse.Namespace, names, saved: dict) -> str | None:
    """The first of the explicit flag names whose value differs from saved[name], or None."""
    values = {**flag_values(args, TrainConfig), **flag_values(args, CapsNetConfig)}
    return next((name for name in sorted(names) if values[name] != saved[name]), None)


def model_flag_values(model_config) -> dict:
    """The model config's values of the flags in MODEL_FLAGS (None where it has no such field)."""
    return {name: getattr(model_config, name, None) for name in MODEL_FLAGS}


def as_user_error(error: ValueError) -> UserError:
    """A config's "name must be ..." becomes "--name must be ...", the flag the user typed."""
    name, _, rest = str(error).partition(" ")
    return UserError(f"{flag_name(name)} {rest}")
