"""MNIST and Fashion-MNIST held in memory as uint8 tensors, batched and shifted on-tensor.

The whole training set is 47 MB as uint8, so it lives in one tensor: batches are slices and
the paper's only augmentation (random shifts of up to 2 px with zero padding) is one gather
for the whole batch. No DataLoader workers compete with the model for the CPU cores.
Images are scaled to [0, 1] and never normalized, so the decoder's sigmoid can reach its
reconstruction target, and train and test see the same pixels (apart from the shifts).

A folder of your own images (--dataset folder, capslab/imagefolder.py) comes as the same Split:
(N, H, W) for grayscale, (N, 3, H, W) for colour, so it trains and scores through the same
functions; one too large for memory streams from disk as an imagefolder.FileSplit.

`random_affine` makes an affNIST-like test set on the fly: each 28x28 image is placed on a
40x40 zero canvas, transformed there, and the model sees the centre 28x28 crop. The crop (not
a 40 -> 28 resize) keeps MNIST's pixel scale, so an identity transform gives back the
original image (up to float rounding); a digit translated to the canvas edge can lose up to
2 px to the crop.
"""

import argparse
import contextlib
import functools
import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capslab.errors import UserError, log
from capslab.imagefolder import FileSplit, FolderOptions, load_folder

DATA_DIR = "data"  # where --data-dir points unless given
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "multimnist": [str(digit) for digit in range(10)],  # pairs of MNIST digits: multimnist.py
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
# "folder": your own images, ROOT/train/<class>/* and ROOT/test/<class>/* (imagefolder.py);
# its class names are its sub-folders', saved in each checkpoint.
DATASETS = (*CLASS_NAMES, "folder")
# The model's input side; a folder's is --image-size, 28 unless given.
IMAGE_SIZE = {"mnist": 28, "fashion-mnist": 28, "multimnist": 36, "folder": 28}

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Split:
    """Images (N, H, W) uint8, or (N, C, H, W) for colour, and labels (N,) int64, on the CPU;
    MultiMNIST pairs have labels (N, 2) and keep each pair's two shifted digits alone in
    `sources` (N, 2, H, W)."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "Split":
        sources = None if self.sources is None else self.sources[indices]
        return Split(self.images[indices], self.labels[indices], sources)

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, max_shift: int, generator
    ) -> "Split":
        """A batch as training sees it: each image shifted at random by up to max_shift px."""
        return Split(random_shift(images, max_shift, generator), labels)


def add_data_flags(parser: argparse.ArgumentParser, test_subset: bool = True) -> None:
    """--data-dir and --test-subset, as train.py and evaluate.py take them (sweep.py: the first)."""
    parser.add_argument(
        "--data-dir",
        default=DATA_DIR,
        help=f"dataset root, downloaded into if absent; Fashion-MNIST is read from "
        f"{DEBIAN_FASHION_DIR} when the root lacks it and Debian's dataset-fashion-mnist is "
        f"installed (default: {DATA_DIR})",
    )
    if test_subset:
        parser.add_argument(
            "--test-subset",
            type=int,
            default=None,
            help="score only the first N test images (default: all)",
        )


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (optionally gzipped) into a uint8 tensor, checking that
    it holds as many bytes as its header promises."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            content = file.read()
    except PermissionError as error:
        raise UserError(f"{path} cannot be read ({error.strerror})") from error
    except (OSError, EOFError, zlib.error) as error:  # a cut-off or damaged gzip stream
        raise UserError(f"{path} is corrupt or truncated ({error})") from error
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is corrupt or not an IDX file of bytes (bad header)")
    num_dims = content[3]
    header = 4 + 4 * num_dims
    shape = [int.from_bytes(content[4 + 4 * k : 8 + 4 * k], "big") for k in range(num_dims)]
    if len(content) != header + math.prod(shape):
        raise UserError(
            f"{path} is corrupt or truncated: {len(content):,} bytes where its header "
            f"promises {header + math.prod(shape):,}"
        )
    if not shape or shape[0] == 0:
        raise UserError(f"{path} holds no images or labels (its header says {shape})")
    values = np.frombuffer(content, dtype=np.uint8, offset=header)
    return torch.from_numpy(values.copy()).view(*shape)


def load_run_splits(
    dataset: str,
    data_dir: str | Path,
    val_size: int,
    train_subset: int | None,
    test_subset: int | None,
    seed: int,
    folder: "FolderOptions | None" = None,
) -> tuple[Split, Split | None, Split]:
    """A run's (train, validation or None, test) splits. For MultiMNIST the training digits
    form a pool that pairs them afresh each batch, and validation and test are fixed pairs.
    A folder (`folder` says how to read it) is split as MNIST is."""
    test = None
    if dataset == "folder":  # train/ and test/ in one pass over the folder's headers
        if folder is None:
            raise ValueError("--dataset folder needs FolderOptions (TrainConfig.folder_options)")
        full_train, test = load_folder(data_dir, folder)
    else:
        full_train = load_split(dataset, data_dir, train=True)
    train, val = train_val_split(full_train, val_size, train_subset, seed)
    if dataset == "multimnist":
        from capslab import multimnist  # it builds on Split, so it imports this module

        try:
            train = multimnist.PairPool(train)
        except ValueError as error:
            raise UserError(f"--train-subset {train_subset}: training digits: {error}") from None
        try:
            val = None if val is None else multimnist.fixed_pairs(val, seed)
        except ValueError as error:
            raise UserError(f"--val-size {val_size}: validation digits: {error}") from None
    if test is None:
        test = load_test_split(dataset, data_dir)
    return train, val, first_images(test, test_subset)


def first_images(split, count: int | None):
    """The first `count` images of a Split or FileSplit (--test-subset); None: all of them."""
    if count is None:
        return split
    if not 1 <= count <= len(split):
        raise UserError(f"--test-subset must be between 1 and {len(split)}, got {count}")
    return split.subset(torch.arange(count))


def load_test_split(
    dataset: str, data_dir: str | Path, folder: "FolderOptions | None" = None
) -> Split:
    """The test set, in its fixed order; MultiMNIST's the same seeded pairs everywhere."""
    if dataset == "folder":
        return load_folder(data_dir, folder, parts=("test",))[0]
    test = load_split(dataset, data_dir, train=False)
    if dataset == "multimnist":
        from capslab import multimnist

        test = multimnist.fixed_pairs(test, multimnist.TEST_PAIRS_SEED)
    return test


def load_split(dataset: str, data_dir: str | Path, train: bool) -> Split:
    """One split of `dataset` (MultiMNIST: its MNIST digits), downloading it into data_dir when
    it is absent."""
    if dataset not in CLASS_NAMES:
        raise UserError(f"unknown dataset {dataset!r}: choose {', '.join(DATASETS)}")
    if dataset == "multimnist":
        dataset = "mnist"
    data_dir = Path(data_dir)
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset]
    local_raw = data_dir / folder / "raw"
    if dataset == "fashion-mnist" and not local_raw.is_dir() and DEBIAN_FASHION_DIR.is_dir():
        say_once(f"{local_raw} is absent: reading Debian's {DEBIAN_FASHION_DIR}")
        return read_raw(DEBIAN_FASHION_DIR, train)
    if all(idx_file(local_raw, name) for name in RAW_FILES):
        return read_raw(local_raw, train)
    return download(dataset, data_dir, train, local_raw)


@functools.cache
def say_once(line: str) -> None:
    """log a line the first time it comes (both splits read the same folder)."""
    log(line, flush=True)


def idx_file(folder: Path, name: str) -> Path | None:
    """folder/name as torchvision unpacks it, else as downloaded (name.gz); None: neither."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def download(dataset: str, data_dir: Path, train: bool, local_raw: Path) -> Split:
    """torchvision's download into data_dir; a failed one leaves no new empty folders behind."""
    import torchvision  # here, not at the top: it adds ~1.7 s to every start and only downloads

    dataset_class = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
    }
    new_folders = [f for f in (local_raw, *local_raw.parents) if not f.exists()]
    try:
        loaded = dataset_class[dataset](root=str(data_dir), train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError or OSError offline
        for folder in new_folders:  # innermost first; rmdir refuses a folder that holds files
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise UserError(
            f"{dataset} is not in {local_raw} and could not be downloaded "
            f"({type(error).__name__}). Put the files {', '.join(RAW_FILES)} (or their .gz) "
            f"in {local_raw}, or pass --data-dir"
        ) from error
    return Split(loaded.data.clone(), loaded.targets.clone())


def read_raw(folder: Path, train: bool) -> Split:
    """One split from the IDX files in `folder` (MNIST's raw layout), each unpacked or .gz."""
    prefix = "train" if train else "t10k"
    images = read_idx(idx_file(folder, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28)
    labels = read_idx(idx_file(folder, f"{prefix}-labels-idx1-ubyte"))  # (N,)
    if images.dim() != 3 or images.shape[1:] != (28, 28) or labels.dim() != 1:
        raise UserError(
            f"{folder}: {prefix} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "are not MNIST's (N, 28, 28) and (N,)"
        )
    if len(images) != len(labels):
        raise UserError(f"{folder} holds {len(images)} {prefix} images but {len(labels)} labels")
    if len(labels) and labels.max() > 9:  # uint8: never below 0
        where = int(labels.argmax())
        raise UserError(
            f"{folder}: {prefix} label {where} is {int(labels[where])}; the classes are 0 to 9"
        )
    return Split(images, labels.long())


def train_val_split(
    full: Split, val_size: int, subset: int | None, seed: int
) -> tuple[Split, Split | None]:
    """A seeded held-out validation split, then an optional training subset for quick runs."""
    if not 0 <= val_size < len(full):
        raise UserError(
            f"--val-size must be between 0 and {len(full) - 1}, got {val_size}: the training set "
            f"holds {len(full)} images; hold out about a tenth (--val-size {len(full) // 10})"
        )
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    val = full.subset(order[:val_size]) if val_size else None
    train_indices = order[val_size:]
    if subset is not None:
        if not 1 <= subset <= len(train_indices):
            raise UserError(
                f"--train-subset must be between 1 and {len(train_indices)}, got {subset}"
            )
        train_indices = train_indices[:subset]
    return full.subset(train_indices), val


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Images as the model takes them, the one conversion every caller uses.

    Grayscale (B, H, W) or a single (H, W), or colour (B, C, H, W) (a single colour image
    is (1, C, H, W): a 3-D tensor is a batch of grayscale images); uint8 in 0..255 or float
    in [0, 1] -> float32 (B, C, H, W) in [0, 1] on `device`, C = 1 for grayscale.
    """
    if images.dim() == 2:
        images = images.unsqueeze(0)  # (1, H, W)
    x = images.to(device, non_blocking=True)
    if images.dim() == 3:
        x = x.unsqueeze(1)  # (B, 1, H, W)
    return x.float().div_(255.0) if images.dtype == torch.uint8 else x.float()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own integer (dy, dx) in [-max_shift, max_shift], zero-filled.

    (B, H, W) -> (B, H, W), or colour (B, C, H, W) -> (B, C, H, W) with all channels of an
    image shifted alike; any dtype: pad once, then gather every crop with one index. The
    draws depend on B alone, so a colour batch gets the shifts a grayscale one would.
    """
    if max_shift == 0:
        return images
    batch, height, width = images.shape[0], *images.shape[-2:]
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # (B, [C,] H+2s, W+2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)  # (2, B)
    rows = offsets[0, :, None] + torch.arange(height)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width)  # (B, W)
    batch_index = torch.arange(batch)[:, None, None]  # (B, 1, 1)
    if images.dim() == 4:  # the channel index joins the gather: (B, C, H, W)
        channels = torch.arange(images.shape[1])[None, :, None, None]  # (1, C, 1, 1)
        return padded[
            batch_index[..., None], channels, rows[:, None, :, None], cols[:, None, None, :]
        ]
    return padded[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, H, W)


def batches(split: Split, batch_size: int, order: torch.Tensor | None = None):
    """Yield (images uint8 (b, [C,] H, W), labels (b,)) in `order` (default: as stored); a
    folder streamed from disk (imagefolder.FileSplit) reads each batch as it is asked for."""
    order = torch.arange(len(split)) if order is None else order
    if isinstance(split, FileSplit):
        yield from split.batches(batch_size, order)
        return
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield split.images[indices], split.labels[indices]


AFFINE_FAMILIES = ("rotation", "shear", "scale", "translation", "combined")
AFFINE_CANVAS = 40  # affNIST's canvas side in pixels


@dataclass
class AffineParams:
    """One draw per image, (N,) each, from affNIST-like ranges."""

    angle: torch.Tensor  # radians, uniform in +-20 degrees
    shear: torch.Tensor  # x-shear factor, uniform in +-0.2
    scale: torch.Tensor  # uniform in [0.8, 1.2], the same along both axes
    offset: torch.Tensor  # (N, 2) integer (dx, dy) pixels in +-6: anywhere on the 40x40 canvas

    @classmethod
    def draw(cls, count: int, generator: torch.Generator, image_size: int = 28) -> "AffineParams":
        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)

        max_offset = (AFFINE_CANVAS - image_size) // 2
        return cls(
            angle=uniform(-math.radians(20), math.radians(20)),
            shear=uniform(-0.2, 0.2),
            scale=uniform(0.8, 1.2),
            offset=torch.randint(-max_offset, max_offset + 1, (count, 2), generator=generator),
        )

    def subset(self, indices) -> "AffineParams":
        return AffineParams(
            self.angle[indices], self.shear[indices], self.scale[indices], self.offset[indices]
        )

    def only(self, family: str) -> "AffineParams":
        """Keep one family's draws (or all, for "combined"); the others become the identity."""

        def keep(name: str) -> bool:
            return family in (name, "combined")

        return AffineParams(
            self.angle if keep("rotation") else torch.zeros_like(self.angle),
            self.shear if keep("shear") else torch.zeros_like(self.shear),
            self.scale if keep("scale") else torch.ones_like(self.scale),
            self.offset if keep("translation") else torch.zeros_like(self.offset),
        )


def random_affine(x: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """(B, C, 28, 28) float -> (B, C, 28, 28): on a 40x40 canvas, rotate, shear and scale about
    the digit's centre, translate by `offset`, then crop the centre 28x28 (bilinear, zero fill)."""
    batch, channels, height, width = x.shape
    pad = (AFFINE_CANVAS - width) // 2
    canvas = torch.nn.functional.pad(
        x, (pad, AFFINE_CANVAS - width - pad, pad, AFFINE_CANVAS - height - pad)
    )
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    # Forward map p -> A p + t with A = scale * R(angle) @ [[1, shear], [0, 1]], in (x, y) pixels.
    linear = torch.stack(
        [
            torch.stack([cos, cos * params.shear - sin], -1),
            torch.stack([sin, sin * params.shear + cos], -1),
        ],
        -2,
    )  # (B, 2, 2)
    linear = params.scale[:, None, None] * linear
    inverse = torch.linalg.inv(linear)  # (B, 2, 2)
    # affine_grid maps output to input coordinates in [-1, 1]:
    # theta = [A^-1, -A^-1 t], with t in half-canvases.
    shift = params.offset.to(inverse.dtype) * (2 / AFFINE_CANVAS)  # (B, 2)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=-1)  # (B, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(canvas.shape), align_corners=False).to(
        x.device, x.dtype
    )
    moved = torch.nn.functional.grid_sample(
        canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return moved[:, :, pad : pad + height, pad : pad + width]  # (B, C, 28, 28)
