"""Write a built-in dataset (Fashion-MNIST, MNIST) out as a folder of PNGs in the layout
`train.py --dataset folder` reads, to check that the folder path trains as the built-in one:

    python tools/export_imagefolder.py fashion-mnist /tmp/fashion_folder
    python train.py --dataset folder --data-dir /tmp/fashion_folder ...
    python train.py --dataset fashion-mnist ...      # the same flags otherwise

Files are OUT/{train,test}/<k>-<class name>/<index>.png: the class folders start with the
label k so that their sorted order (the folder dataset's labels) is the dataset's own, and
<index> is the image's place in the IDX file, zero-padded so sorted names keep that order.
PNG is lossless, so the folder loader gives back the very uint8 pixels. --limit N writes the
first N images of each split only (for tests).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
from PIL import Image

from capslab.data import CLASS_NAMES, DATA_DIR, load_split
from capslab.errors import (
    UserError,
    check_new_output_folder,
    exit_on_user_error,
    make_output_folder,
)
from capslab.imagefolder import absent_classes


def folder_name(label: int, name: str) -> str:
    """`3-Dress`; a "/" (T-shirt/top) cannot be in a folder name and becomes "-"."""
    return f"{label}-{name.replace('/', '-')}"


def export(dataset: str, data_dir: str, out: Path, limit: int | None = None) -> dict:
    """Write both splits; returns how many images each got."""
    check_new_output_folder(out)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    # Both splits are read before anything is written: a bad file leaves no half folder.
    splits = {
        name: load_split(dataset, data_dir, train=name == "train") for name in ("train", "test")
    }
    names = [folder_name(k, name) for k, name in enumerate(CLASS_NAMES[dataset])]
    counts = {
        name: len(split) if limit is None else min(limit, len(split))
        for name, split in splits.items()
    }
    for split_name, split in splits.items():
        missing = absent_classes(split.labels[: counts[split_name]], len(names))
        if missing:
            raise UserError(
                f"--limit {limit} leaves {split_name}/ without "
                f"{', '.join(names[k] for k in missing)}, which train.py refuses: raise --limit"
            )
    make_output_folder(out, "OUT")
    for split_name, split in splits.items():
        count = counts[split_name]
        for name in names:
            (out / split_name / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            folder = out / split_name / names[int(split.labels[index])]
            Image.fromarray(split.images[index].numpy(), mode="L").save(folder / f"{index:05d}.png")
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=("fashion-mnist", "mnist"), help="which to write")
    parser.add_argument("out", type=Path, help="an empty or new folder")
    parser.add_argument(
        "--data-dir", default=DATA_DIR, help=f"where the dataset is (default: {DATA_DIR})"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="first N of each split (default: all)"
    )
    args = parser.parse_args(argv)
    counts = export(args.dataset, args.data_dir, args.out, args.limit)
    print(f"wrote {counts['train']} train and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    exit_on_user_error(main)
