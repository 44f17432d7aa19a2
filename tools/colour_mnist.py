"""Make a small colour dataset as a folder of PNGs: MNIST digits painted in one random colour on
a background of another, the layout `train.py --dataset folder` reads.

    python tools/colour_mnist.py /tmp/colour_mnist --train 3000 --test 1000
    python tools/colour_mnist.py /tmp/ink_mnist --background black   # coloured ink on black
    python train.py --dataset folder --data-dir /tmp/colour_mnist --checkpoint-dir runs/colour

Each image draws its ink and background colours uniformly from RGB, redrawing until they
differ by at least MIN_DISTANCE (so the digit stays visible), then mixes them by the digit's
grey level: pixel = background + (ink - background) * digit / 255. The class is the digit,
so the colours are nuisance the model must ignore and the decoder must reproduce.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # before torch, which takes seconds to load

# isort: split
import torch
from PIL import Image

from capslab.data import DATA_DIR, load_split
from capslab.errors import (
    UserError,
    check_new_output_folder,
    exit_on_user_error,
    make_output_folder,
)
from capslab.imagefolder import absent_classes
from capslab.settings import SEED_RANGE, is_seed

MIN_DISTANCE = 0.5  # Euclidean distance in RGB [0, 1]^3 between ink and background


def colour_pairs(
    count: int, generator: torch.Generator, background: str = "colour"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3) ink and background colours in [0, 1], at least MIN_DISTANCE apart; with
    background "black" only the ink is drawn."""

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        inks, backgrounds = torch.rand(2, n, 3, generator=generator)
        return inks, backgrounds * (background == "colour")

    ink, paper = draw(count)
    close = (ink - paper).norm(dim=1) < MIN_DISTANCE
    while close.any():
        ink[close], paper[close] = draw(int(close.sum()))
        close = (ink - paper).norm(dim=1) < MIN_DISTANCE
    return ink, paper


def paint(digits: torch.Tensor, ink: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) digits and (N, 3) colours -> uint8 (N, 3, H, W)."""
    alpha = digits.float()[:, None] / 255  # (N, 1, H, W)
    mixed = background[:, :, None, None] + (ink - background)[:, :, None, None] * alpha
    return (mixed * 255).round().to(torch.uint8)


def make(out: Path, data_dir: str, train: int, test: int, seed: int, background: str) -> None:
    check_new_output_folder(out)
    # Both splits are read before anything is written: a bad MNIST file leaves no half folder.
    splits = {
        name: load_split("mnist", data_dir, train=name == "train") for name in ("train", "test")
    }
    for name, count in (("train", train), ("test", test)):
        if not 1 <= count <= len(splits[name]):
            raise UserError(f"--{name} must be between 1 and {len(splits[name])}, got {count}")
    generator = torch.Generator().manual_seed(seed)
    drawn = {}  # split -> (chosen digits, colours), drawn in this order from the one generator
    for split_name, count in (("train", train), ("test", test)):
        chosen = torch.randperm(len(splits[split_name]), generator=generator)[:count]
        drawn[split_name] = chosen, colour_pairs(count, generator, background)
        missing = absent_classes(splits[split_name].labels[chosen], 10)
        if missing:
            raise UserError(
                f"--{split_name} {count} draws no {', '.join(map(str, missing))}, so train.py "
                f"would refuse the folder: raise --{split_name}"
            )
    make_output_folder(out, "OUT")
    for split_name, (chosen, colours) in drawn.items():
        mnist = splits[split_name]
        images = paint(mnist.images[chosen], *colours)
        for index, (image, label) in enumerate(zip(images, mnist.labels[chosen].tolist())):
            folder = out / split_name / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image.permute(1, 2, 0).numpy()  # (H, W, 3)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{index:05d}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="an empty or new folder")
    parser.add_argument(
        "--data-dir", default=DATA_DIR, help=f"where MNIST is (default: {DATA_DIR})"
    )
    parser.add_argument("--train", type=int, default=3000, help="training images (default: 3000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="picks digits and colours (default: 0)")
    parser.add_argument(
        "--background",
        choices=("colour", "black"),
        default="colour",
        help="a random colour per image, or black (default: colour)",
    )
    args = parser.parse_args(argv)
    if not is_seed(args.seed):  # before the output folder is made
        raise UserError(f"--seed must be in {SEED_RANGE}, got {args.seed}")
    make(args.out, args.data_dir, args.train, args.test, args.seed, args.background)
    print(f"wrote {args.train} train and {args.test} test colour digits to {args.out}")


if __name__ == "__main__":
    exit_on_user_error(main)
