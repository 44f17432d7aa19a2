"""Checkpoints: the one place that knows their layout. Save, load, rebuild, export, resume.

A training checkpoint (`last.pt`, `best.pt`) is one dict of tensors and plain types, so
`torch.load(..., weights_only=True)` reads it:

    model, ema        raw weights, and their moving average (None with --ema-decay 0)
    chosen            "raw" or "ema": the weights validation chose at the last epoch
    model_kind        "capsnet", "cnn" or "paper-cnn"; config, the model's config as a dict
    train_config      the training settings (training.TrainConfig as a dict)
    dataset           "mnist", "fashion-mnist", "multimnist" or "folder"
    class_names       the classes in label order (a folder's sub-folders); older files lack
                      it and mean their dataset's own (data.CLASS_NAMES)
    optimizer, scheduler, ema_updates
    epoch, batches_done, totals, shift_rng, metrics, best_val, skipped, wall_seconds
                      where the run stands (training.Progress)
    epochs_before     the epochs the --init-from weights had trained, in all (0: from scratch;
                      None: unknown, a run from a file that did not say; older files lack it)

A shipped checkpoint keeps only the chosen weights, the config, the class names and the
metrics. Files from
before this layout ("args" instead of "train_config", "step" instead of "batches_done") load.
To make one, as checkpoints/capsnet_mnist.pt was made:

    python export.py runs/long/best.pt checkpoints/capsnet_mnist.pt --overwrite
"""

import errno
import pickle
import zipfile
import zlib
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from capslab.atomic import remove_temporaries, write_atomically
from capslab.data import CLASS_NAMES, DATASETS
from capslab.errors import UserError, first_line, make_output_folder
from capslab.imagefolder import FolderOptions
from capslab.models import MODEL_KINDS, refuse_unbuildable, trains_decoder
from capslab.settings import is_whole, settings_from_dict, settings_to_dict
from CapsNet import RECONSTRUCTION_WEIGHT, CapsNet

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "capsnet_mnist.pt"
SHIPPED_MULTIMNIST = SHIPPED_CHECKPOINT.with_name("capsnet_multimnist.pt")
SHIPPED_KEYS = (
    "model_kind",
    "config",
    "dataset",
    "class_names",
    "epoch",
    "epochs_before",
    "metrics",
    "train_config",
)
RENAMED_KEYS = {"step": "batches_done", "partial": "totals", "args": "train_config"}  # old -> new
# Keys added later, with what a file from before each one meant.
KEYS_ADDED_LATER = {"model_kind": "capsnet", "dataset": "mnist"}


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous file intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))
    except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as RuntimeError
        kept = (
            f"the previous {path.name} is unchanged"
            if path.exists()
            else f"{path.name} was not written"
        )
        if is_disk_full(error):
            raise UserError(f"the disk is full: could not write {path}; {kept}") from error
        raise UserError(f"could not write {path} ({first_line(error)}); {kept}") from error


def is_disk_full(error: Exception) -> bool:
    # torch's zip writer says "unexpected pos" when a write came up short.
    return getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)


def claim_run_folder(folder: Path) -> FileLock:
    """Check that `folder` takes checkpoints, and hold it for this process until it exits.

    The lock is an OS file lock, so it is released on any exit, a crash or kill -9 included.
    Temporary files that a killed run left behind are removed.
    """
    make_output_folder(folder, "--checkpoint-dir")
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout as error:
        raise UserError(
            f"another train.py is writing to {folder}: wait for it to finish, "
            "or pass another --checkpoint-dir"
        ) from error
    remove_temporaries(folder)
    return lock


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); any problem becomes one UserError line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        path.open("rb").close()
    except OSError as error:  # say so, rather than call it damaged below
        raise UserError(f"checkpoint {path} cannot be read ({error.strerror})") from error
    if damaged := damaged_member(path):
        raise UserError(f"{path} is corrupt: its {damaged} fails its checksum")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} is not a readable checkpoint: it is corrupt, or holds objects beyond tensors "
            "and plain types, which the safe loader (weights_only=True) refuses"
        ) from error
    except Exception as error:  # a truncated or foreign file fails anywhere inside the unpickler
        raise UserError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: it is empty, "
            "truncated or not a torch file)"
        ) from error
    return checked_layout(checkpoint, path)


def checked_layout(checkpoint, path: Path) -> dict:
    """A loaded file as this code's checkpoint: old keys renamed, missing ones filled in with
    what they meant, and the dataset, class names, log and epochs checked."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this code (it lacks 'model' and 'config')")
    for old, new in RENAMED_KEYS.items():
        if old in checkpoint and new not in checkpoint:
            checkpoint[new] = checkpoint.pop(old)
    for key, meant in KEYS_ADDED_LATER.items():
        checkpoint.setdefault(key, meant)
    if checkpoint["dataset"] not in DATASETS:
        raise UserError(
            f"{path} was trained on an unknown dataset {checkpoint['dataset']!r}: "
            f"this code knows {', '.join(DATASETS)}"
        )
    names = checkpoint.get("class_names")
    if names is None and checkpoint["dataset"] == "folder":
        raise UserError(f"{path} was trained on a folder of images but does not name its classes")
    if names is not None and not (
        isinstance(names, list) and names and all(isinstance(name, str) for name in names)
    ):
        raise UserError(f"{path} holds invalid class names (not a list of strings)")
    metrics = checkpoint.get("metrics", [])
    if not (isinstance(metrics, list) and all(isinstance(record, dict) for record in metrics)):
        raise UserError(f"{path} holds an invalid log (its 'metrics' are not a list of records)")
    counts = {"epoch": checkpoint.get("epoch", 0)}  # resume and export count on it
    if checkpoint.get("epochs_before") is not None:  # None: unknown, as epochs_before() says
        counts["epochs_before"] = checkpoint["epochs_before"]
    for key, value in counts.items():
        if not is_whole(value, 0):
            raise UserError(f"{path} holds an invalid {key} {value!r} (not a count)")
    return checkpoint


def damaged_member(path: Path) -> str | None:
    """The first file in the checkpoint's zip whose bytes fail their CRC-32 (torch.load checks
    none: a flipped byte in a tensor loads as a wrong weight); None if all pass or if it is
    not a zip, which torch.load then refuses."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
        return None


def epochs_before(checkpoint: dict) -> int | None:
    """The epochs its run's --init-from weights had trained, in all: 0 for a run from scratch,
    None for an --init-from run saved before checkpoints kept the count."""
    if checkpoint.get("epochs_before") is not None:
        return checkpoint["epochs_before"]
    return None if (checkpoint.get("train_config") or {}).get("init_from") else 0


def epochs_in_all(checkpoint: dict) -> int | None:
    """The epochs its weights have trained, counting those before --init-from; None: unknown."""
    before, epoch = epochs_before(checkpoint), checkpoint.get("epoch")
    return None if before is None or epoch is None else epoch + before


def epoch_text(epoch: int | None, before: int | None) -> str:
    """'epoch 9', or after --init-from 'epoch 9 (39 in all, 30 before --init-from)'."""
    if epoch is None:
        return "epoch ?"
    if before is None:
        return f"epoch {epoch} (after --init-from)"
    if not before:
        return f"epoch {epoch}"
    return f"epoch {epoch} ({epoch + before} in all, {before} before --init-from)"


def class_names(checkpoint: dict) -> list[str]:
    """The checkpoint's classes in label order: its own list (a folder's sub-folders), else,
    for a file from before class names were saved, its dataset's."""
    return checkpoint.get("class_names") or CLASS_NAMES[checkpoint["dataset"]]


def chosen_weights(checkpoint: dict) -> dict:
    """The weights validation chose: the raw ones, or their moving average (--ema-decay);
    the raw ones where there was no validation (--val-size 0)."""
    return checkpoint["ema"] if checkpoint.get("chosen") == "ema" else checkpoint["model"]


def folder_options(checkpoint: dict, model: torch.nn.Module) -> FolderOptions:
    """How to read a folder for a model trained on one: its side, channels and classes."""
    saved = checkpoint.get("train_config") or {}
    return FolderOptions(
        model.config.image_size,
        model.config.in_channels,
        tuple(class_names(checkpoint)),
        saved.get("folder_loading", FolderOptions.loading),
        saved.get("workers", FolderOptions.workers),
    )


def config_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint"):
    """The model config saved in the checkpoint, validated: (model class, config)."""
    kind = checkpoint["model_kind"]
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise UserError(
            f"{path} holds an unknown model kind {kind!r}: choose {', '.join(MODEL_KINDS)}"
        )
    kind = MODEL_KINDS[kind]
    try:
        config = settings_from_dict(kind.config_class, checkpoint["config"])
    except (AttributeError, TypeError, KeyError, ValueError) as error:  # e.g. not a dict
        raise UserError(f"{path} has an invalid model config ({first_line(error)})") from error
    names = class_names(checkpoint)
    if len(names) != config.num_classes:
        raise UserError(
            f"{path} names {len(names)} classes for a model of {config.num_classes} outputs"
        )
    refuse_unbuildable(kind.model_class, config, 2, "loading it", f"{path}'s model")
    return kind.model_class, config


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> torch.nn.Module:
    """Rebuild the model from the checkpoint's own kind and config; load its weights strictly."""
    model_class, config = config_from_checkpoint(checkpoint, path)
    model = model_class(config)
    load_weights(model, chosen_weights(checkpoint), path)
    return model


def load_weights(model: torch.nn.Module, weights, path: str | Path) -> None:
    """Load a state dict strictly, after checking that it fits the model and is finite."""
    problem = weights_problem(model, weights)
    if problem:
        raise UserError(f"{path} does not match the model: {problem}")
    model.load_state_dict(weights)


def weights_problem(model: torch.nn.Module, weights) -> str | None:
    """What is wrong with `weights` for `model`, in one line; None if nothing is."""
    if not isinstance(weights, dict):
        return f"its weights are a {type(weights).__name__}, not a state dict"
    expected = model.state_dict()
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        return f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{name} has shape {shape}, the model needs {tuple(expected[name].shape)}"
        if value.is_floating_point() != expected[name].is_floating_point():
            return f"{name} is {value.dtype}, the model needs {expected[name].dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{name} holds NaN or infinite values"
    return None


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Checkpoint file -> model in eval mode on `device`, plus the checkpoint dict."""
    checkpoint = load_checkpoint(path, device)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    return model, checkpoint


def load_capsnet(path: str | Path, device: torch.device) -> tuple[CapsNet, dict]:
    """load_model, refusing other kinds of model: only a CapsNet has capsules and a decoder."""
    model, checkpoint = load_model(path, device)
    if not isinstance(model, CapsNet):
        kind = checkpoint["model_kind"]
        raise UserError(f"{path} holds a {kind!r} model; this needs a CapsNet checkpoint")
    return model, checkpoint


def unvalidated_weights(checkpoint: dict) -> str | None:
    """What the file holds, in words, when no validation chose its weights; None when one did."""
    metrics = checkpoint.get("metrics") or []
    epoch = checkpoint.get("epoch", 0)
    batches = checkpoint.get("batches_done", 0)
    if not metrics or not epoch:
        into = f", {batches} batches into the first" if batches else ""
        return (
            f"weights saved before any epoch ended (epoch 0, no metrics{into}): "
            "nothing has scored them"
        )
    last = metrics[-1] if isinstance(metrics[-1], dict) else {}
    if batches:
        return (
            f"weights saved {batches} batches into epoch {epoch + 1}, after the last scored "
            f"epoch ({epoch}): the run stopped partway through an epoch"
        )
    if "val_acc" in last:
        return None
    settings = checkpoint.get("train_config")
    budget = settings.get("epochs") if isinstance(settings, dict) else None
    if budget is not None and epoch < budget:
        return (
            f"the raw weights of epoch {epoch} of {budget} of a run without validation "
            "(--val-size 0) that stopped before its last epoch"
        )
    return None  # the final weights of a run without validation: train.py's final model


def has_trained_decoder(checkpoint: dict) -> bool:
    """A CapsNet trained with the reconstruction loss: its decoder's drawings mean something."""
    weight = checkpoint.get("train_config", {}).get("reconstruction_weight", RECONSTRUCTION_WEIGHT)
    return trains_decoder(checkpoint["model_kind"], weight)


def export_weights(checkpoint: dict, path: str | Path) -> None:
    """Write the shippable part of a training checkpoint: chosen weights, config, metrics."""
    shipped = {key: checkpoint[key] for key in SHIPPED_KEYS if key in checkpoint}
    save_checkpoint({**shipped, "model": chosen_weights(checkpoint)}, path)


def training_checkpoint(
    model,
    ema,
    optimizer,
    scheduler,
    model_kind: str,
    dataset: str,
    train_config: dict,
    progress: dict,
    class_names: list[str],
) -> dict:
    """Everything a run needs to continue exactly: see the module docstring for the layout."""
    return {
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_updates": int(ema.n_averaged) if ema is not None else 0,
        "chosen": progress["metrics"][-1].get("chosen", "raw") if progress["metrics"] else "raw",
        "model_kind": model_kind,
        "config": settings_to_dict(model.config),
        "train_config": train_config,
        "dataset": dataset,
        "class_names": list(class_names),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **progress,
    }


def saved_progress(checkpoint: dict, fields: tuple[str, ...]) -> dict:
    """The `fields` of training.Progress that the checkpoint holds (older files lack some)."""
    return {name: checkpoint[name] for name in fields if name in checkpoint}
