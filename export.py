"""Export a training checkpoint's chosen weights, config and metrics (no optimizer state), as
the shipped checkpoints hold them:

    python export.py runs/long/best.pt checkpoints/capsnet_mnist.pt --overwrite

Only weights that something chose are exported: those validation scored at the end of an
epoch, or the final weights of a run trained without validation (--val-size 0), which train.py
names its final model. A file saved before its first epoch ended, partway through an epoch (a
run stopped by Ctrl-C), or a run without validation stopped before its last epoch, is refused
unless --unvalidated says that is what you want.
"""

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # first: torch takes seconds to load

# isort: split
import argparse
from pathlib import Path

from capslab.checkpoint import (
    epoch_text,
    epochs_before,
    export_weights,
    load_checkpoint,
    model_from_checkpoint,
    unvalidated_weights,
)
from capslab.errors import UserError, exit_on_user_error
from capslab.jsonl import chosen_by_validation


def export(source: Path, destination: Path, overwrite: bool, allow_unvalidated: bool) -> dict:
    """Check that SOURCE's chosen weights rebuild its model, then export them to DESTINATION."""
    if destination.is_dir():
        raise UserError(f"{destination} is a folder: name the file to write")
    if destination.exists() and not overwrite:
        raise UserError(f"{destination} already exists: pass --overwrite to replace it")
    if destination.exists() and source.exists() and destination.samefile(source):
        raise UserError(f"{source} is both source and destination: export to another file")
    checkpoint = load_checkpoint(source)
    held = unvalidated_weights(checkpoint)
    if held and not allow_unvalidated:
        raise UserError(
            f"{source} holds {held}; nothing was exported: pass --unvalidated to export them "
            "anyway, or export a file saved at the end of a validated epoch (best.pt)"
        )
    model_from_checkpoint(checkpoint, source)
    export_weights(checkpoint, destination)
    return checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint's chosen weights, config and metrics "
        "(no optimizer state), as the shipped checkpoints/capsnet_mnist.pt holds them."
    )
    parser.add_argument("source", type=Path, help="a training checkpoint (best.pt, last.pt)")
    parser.add_argument("destination", type=Path, help="the file to write")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DESTINATION if it exists (default: refuse)",
    )
    parser.add_argument(
        "--unvalidated",
        action="store_true",
        help="export weights that no validation chose: a run stopped before its first epoch "
        "ended or partway through one (default: refuse)",
    )
    args = parser.parse_args(argv)
    checkpoint = export(args.source, args.destination, args.overwrite, args.unvalidated)
    size = args.destination.stat().st_size / 2**20
    print(f"wrote {args.destination} ({size:.1f} MiB): {what_was_exported(checkpoint)}")


def what_was_exported(checkpoint: dict) -> str:
    """'epoch 26, validation 99.62%, averaged weights', as far as the checkpoint says."""
    chosen = chosen_by_validation(checkpoint.get("metrics") or [])
    epoch = chosen["epoch"] if chosen else checkpoint.get("epoch")
    parts = [epoch_text(epoch, epochs_before(checkpoint))]
    if chosen:
        parts.append(f"validation {chosen['val_acc']:.2f}%")
    parts.append("averaged weights" if checkpoint.get("chosen") == "ema" else "raw weights")
    return ", ".join(parts)


if __name__ == "__main__":
    exit_on_user_error(main)
