"""Measure the two ways a folder of images is read: into memory once, or streamed from disk by
DataLoader workers. Prints one JSON line per path: seconds and img/s to read the training
images once (batches of --batch-size in a seeded random order, as an epoch reads them), and
the process's peak memory (ru_maxrss, which counts the parent alone, not the workers).

    python tools/folder_loading.py /tmp/fashion_folder memory
    python tools/folder_loading.py /tmp/fashion_folder stream --workers 2

Run each path in its own process: peak memory is per process.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
import torch

from capslab.data import batches
from capslab.errors import UserError, exit_on_user_error, flag_name
from capslab.imagefolder import (
    MAX_IMAGE_SIZE,
    RECEPTIVE_FIELD,
    FolderOptions,
    inspect_folder,
    load_folder,
)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_flags(args: argparse.Namespace) -> None:
    lowest = {"batch_size": 1, "workers": 0, "image_size": RECEPTIVE_FIELD}
    for name, low in lowest.items():
        if getattr(args, name) < low:
            raise UserError(f"{flag_name(name)} must be at least {low}, got {getattr(args, name)}")
    if args.image_size > MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {args.image_size}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("loading", choices=("memory", "stream"))
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    check_flags(args)
    torch.set_num_threads(1)
    before = peak_mib()
    started = time.perf_counter()
    info = inspect_folder(args.root, None)
    options = FolderOptions(
        args.image_size, info.channels, info.class_names, args.loading, args.workers
    )
    train, _ = load_folder(args.root, options, parts=("train", "test"), log=lambda line: None)
    loaded = time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    pixels = sum(
        images.float().mean().item() for images, _ in batches(train, args.batch_size, order)
    )
    finished = time.perf_counter()
    print(
        json.dumps(
            {
                "loading": args.loading,
                "workers": args.workers,
                "images": len(train),
                "setup_s": round(loaded - started, 1),  # scan headers (+ read all, in memory)
                "epoch_read_s": round(finished - loaded, 1),
                "img_per_s_epoch": round(len(train) / (finished - loaded)),
                "img_per_s_including_setup": round(len(train) / (finished - started)),
                "peak_rss_mib": round(peak_mib()),
                "rss_before_mib": round(before),
                "checksum": round(pixels, 3),
            }
        )
    )


if __name__ == "__main__":
    exit_on_user_error(main)
