"""Export a training checkpoint's chosen weights, config and metrics (no optimizer state), as
the shipped checkpoints hold them:

    python export.py runs/long/best.pt checkpoints/capsnet_mnist.pt --overwrite
"""

import argparse
from pathlib import Path

from capslab.checkpoint import export_weights, load_checkpoint, model_from_checkpoint
from capslab.errors import UserError, exit_on_user_error


def export(source: Path, destination: Path, overwrite: bool) -> None:
    """Check that SOURCE's chosen weights rebuild its model, then export them to DESTINATION."""
    if destination.exists() and not overwrite:
        raise UserError(f"{destination} already exists: pass --overwrite to replace it")
    checkpoint = load_checkpoint(source)
    model_from_checkpoint(checkpoint, source)
    export_weights(checkpoint, destination)


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
    args = parser.parse_args(argv)
    export(args.source, args.destination, args.overwrite)
    print(f"wrote {args.destination} ({args.destination.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    exit_on_user_error(main)
