"""A folder of images as a dataset, in torchvision's ImageFolder layout:

    ROOT/train/<class>/*.png   trained on (validation is split off it, as for MNIST)
    ROOT/test/<class>/*.png    scored

The classes are the sub-folders of train/, in sorted order (class k is the k-th name), and
test/ must hold the same ones. train/ is read class by class, in sorted file order (validation
and --train-subset draw from a seeded permutation, as for MNIST); test/ is held in one fixed
shuffled order (TEST_ORDER_SEED), so that --test-subset N scores a mix of classes, as MNIST's
first N test digits are, and not N images of the first class.

Every image is converted to grayscale ("L") or RGB and resized (stretched) to N x N with
PIL's antialiasing bilinear filter, then kept as uint8: (H, W) for one channel, exactly as
MNIST's Split holds its digits, or (3, H, W) for colour.

What counts as an image is its file suffix (IMAGE_SUFFIXES, torchvision's list). Other files
(README.txt, .DS_Store, labels.csv) are skipped and counted in a log line, as ImageFolder
skips them. A file with an image suffix that PIL cannot read is refused, naming it: dropping
it silently would shrink a class without anyone noticing.

A folder whose pixels fit IN_MEMORY_LIMIT loads once, with DataLoader workers, into one uint8
tensor (a Split: the MNIST path from there on). A larger one stays on disk as a FileSplit:
each batch is read by DataLoader workers while the model trains on the one before. Both paths
give the same batches in the same order, shifted in the main process with the same generator,
so a run does not depend on which one it took (tests/test_folder_dataset.py checks this).
"""

import contextlib
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from capslab.errors import UserError, counted, first_line
from capslab.errors import log as log_rank0  # load_folder takes a `log` of its own
from CapsNet import CapsNetConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
IN_MEMORY_LIMIT = 2 * 2**30  # bytes of uint8 pixels (train + test) held in memory; above: stream
LOADINGS = ("auto", "memory", "stream")
TEST_ORDER_SEED = 0  # test/'s fixed order, the same in train.py and evaluate.py
LOAD_CHUNK = 256  # images a DataLoader worker reads at a time when the folder loads into memory
# The smallest image worth training on: what one primary capsule sees, 17 px for 9x9 kernels
# (receptive_field in inference.py), which is also the smallest input the model takes.
RECEPTIVE_FIELD = 2 * CapsNetConfig().kernel_size - 1
# The largest --image-size: the votes grow with the square of the side (at 256 px, 460,800
# primary capsules and 295 MB of votes an image), so anything larger cannot train here.
MAX_IMAGE_SIZE = 256


@dataclass(frozen=True)
class FolderOptions:
    """How a run reads its folder: the model's input and classes, and where the pixels live."""

    image_size: int
    channels: int  # 1: grayscale, 3: RGB
    class_names: tuple[str, ...]
    loading: str = "auto"  # LOADINGS: by the estimated size, or forced
    workers: int = 2  # DataLoader worker processes (0: read in the main process)


@dataclass
class FolderScan:
    """One split's files, their labels, and what their headers say."""

    folder: Path
    class_names: list[str]
    files: list[Path]
    labels: list[int]
    skipped: int  # files without an image suffix
    gray: int  # images stored as grayscale; the others are colour


def scan_split(folder: Path, min_side: int = RECEPTIVE_FIELD) -> FolderScan:
    """List folder/<class>/** and read every image's header (mode and size, not its pixels),
    refusing what training could not use, with the file or folder named."""
    if not folder.is_dir():
        raise UserError(
            f"{folder} is not a folder: --dataset folder reads --data-dir/train and "
            "--data-dir/test, each with one sub-folder of images per class"
        )
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        found = ", ".join(p.name for p in class_dirs) or "none"
        raise UserError(
            f"{folder} holds {len(class_dirs)} class folder(s) ({found}): a classifier needs "
            "at least 2, one sub-folder of images per class"
        )
    scan = FolderScan(folder, [p.name for p in class_dirs], [], [], skipped=0, gray=0)
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        scan.skipped += len(files) - len(images)
        if not images:
            raise UserError(
                f"{class_dir} holds no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...): "
                "add some or remove the folder"
            )
        for path in images:
            mode, size = image_header(path)
            if min(size) < min_side:
                raise UserError(
                    f"{path} is {size[0]}x{size[1]} px, smaller than the model's receptive "
                    f"field ({min_side}x{min_side}, what one primary capsule sees): remove it "
                    "or use larger images"
                )
            scan.gray += mode in GRAY_MODES
        scan.files += images
        scan.labels += [label] * len(images)
    return scan


def absent_classes(labels: torch.Tensor, num_classes: int) -> list[int]:
    """The classes 0 .. num_classes - 1 that no label names: a folder written from these labels
    would have them empty, which scan_split refuses."""
    return sorted(set(range(num_classes)) - set(labels.tolist()))


def image_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header; one UserError if it is no image."""
    with image_errors(path), Image.open(path) as image:
        return image.mode, image.size


@contextlib.contextmanager
def image_errors(path: str | Path):
    """What Pillow raises on a file it cannot or will not decode, as one UserError naming it."""
    try:
        yield
    except Image.DecompressionBombError as error:
        raise UserError(f"{path} is too large to decode safely ({first_line(error)})") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"{path} is not an image PIL can read ({first_line(error)})") from error


@dataclass
class FolderInfo:
    """What train.py decides from the folder before it builds the model."""

    class_names: tuple[str, ...]
    channels: int
    notes: list[str]  # log lines: skipped files, converted images


def inspect_folder(root: str | Path, channels: int | None) -> FolderInfo:
    """Scan ROOT/train and ROOT/test: their classes must agree; the channels are `channels`,
    else 1 when every image is grayscale and 3 when any is colour."""
    train, test = scan_split(Path(root) / "train"), scan_split(Path(root) / "test")
    check_same_classes(train, test)
    total = len(train.files) + len(test.files)
    gray = train.gray + test.gray
    detected = 1 if gray == total else 3
    notes = []
    if skipped := train.skipped + test.skipped:
        notes.append(f"{root}: skipped {counted(skipped, 'file')} without an image suffix")
    chosen = channels or detected
    if chosen == 3 and gray:
        how = "forced by --channels 3" if channels else f"{total - gray} of {total} are colour"
        notes.append(f"{root}: {gray} grayscale images converted to RGB ({how})")
    elif chosen == 1 and gray < total:
        notes.append(f"{root}: {total - gray} colour images converted to grayscale (--channels 1)")
    return FolderInfo(tuple(train.class_names), chosen, notes)


def check_same_classes(train: FolderScan, test: FolderScan) -> None:
    if train.class_names != test.class_names:
        only_train = sorted(set(train.class_names) - set(test.class_names))
        only_test = sorted(set(test.class_names) - set(train.class_names))
        raise UserError(
            f"{train.folder} and {test.folder} hold different classes "
            f"(only in train/: {', '.join(only_train) or 'none'}; "
            f"only in test/: {', '.join(only_test) or 'none'}): they need the same sub-folders"
        )


def check_saved_classes(scan: FolderScan, class_names: tuple[str, ...]) -> None:
    """A folder read for a checkpoint (resume, evaluate) must hold the classes it knows."""
    if tuple(scan.class_names) != tuple(class_names):
        raise UserError(
            f"{scan.folder} holds the classes {', '.join(scan.class_names)}, but the model was "
            f"trained on {', '.join(class_names)}: pass the --data-dir it was trained on"
        )


def deep_gray(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image -> (H, W) float32 in [0, 1]. 16-bit PNGs open as
    I;16 (or I), 0..65535, unless every value fits in 8 bits; float ones hold 0..1 or 0..255.
    (Pillow's own convert("L") clips them at 255.)"""
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        return np.clip(values if values.max() <= 1 else values / 255.0, 0, 1)
    return np.clip(values / (65535.0 if values.max() > 255 else 255.0), 0, 1)


def is_deep(mode: str) -> bool:
    return mode.startswith("I") or mode == "F"


def read_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """One file -> uint8 (N, N) for channels 1, (3, N, N) for channels 3."""
    with image_errors(path), Image.open(path) as image:
        if is_deep(image.mode):
            image = Image.fromarray(np.round(deep_gray(image) * 255).astype(np.uint8))  # L
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        pixels = np.array(image, dtype=np.uint8)  # (N, N) or (N, N, 3)
    tensor = torch.from_numpy(pixels)
    return tensor if channels == 1 else tensor.permute(2, 0, 1).contiguous()  # (3, N, N)


class ChunkReader(torch.utils.data.Dataset):
    """Item k is the k-th list of files, read into one uint8 tensor (b, [C,] N, N) in a worker.
    A file that cannot be read comes back as its one-line message, which the main process
    raises: a worker's own exception would reach the user as a multi-line traceback."""

    def __init__(self, files: list, chunks: list[list[int]], image_size: int, channels: int):
        self.files, self.chunks = files, chunks
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        try:
            return torch.stack(
                [read_image(self.files[i], self.image_size, self.channels) for i in self.chunks[k]]
            )
        except UserError as error:
            return str(error)


def read_chunks(files: list, chunks: list[list[int]], options: FolderOptions):
    """Yield each chunk's images, read by options.workers processes ahead of the consumer."""
    loader = torch.utils.data.DataLoader(
        ChunkReader(files, chunks, options.image_size, options.channels),
        batch_size=None,  # an item is already a batch
        num_workers=options.workers,
        prefetch_factor=2 if options.workers else None,
        generator=torch.Generator(),  # worker seeds from here: the global RNG stays untouched
    )
    for images in loader:
        if isinstance(images, str):
            raise UserError(images)
        yield images


class LazyImages:
    """A FileSplit's images, indexed like a tensor (int, slice, index tensor) and read from
    disk when indexed: what the figures ask of a few images."""

    def __init__(self, split: "FileSplit"):
        self.split = split

    @property
    def shape(self) -> tuple[int, ...]:
        options = self.split.options
        side = (options.image_size, options.image_size)
        return (len(self.split), *((options.channels,) if options.channels == 3 else ()), *side)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        options = self.split.options
        indices = torch.arange(len(self.split))[key]
        if indices.dim() == 0:
            return read_image(self.split.files[indices], options.image_size, options.channels)
        return next(read_chunks(self.split.files, [indices.tolist()], replace(options, workers=0)))


class FileSplit:
    """A split kept on disk: file paths and labels, its batches read by DataLoader workers.
    It answers what training and scoring ask of an in-memory Split (len, labels, subset,
    training_batch, batches, images)."""

    sources = None  # single images, never MultiMNIST pairs

    def __init__(self, files: list, labels: torch.Tensor, options: FolderOptions):
        self.files, self.labels, self.options = files, labels, options

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    def subset(self, indices: torch.Tensor) -> "FileSplit":
        indices = torch.as_tensor(indices)
        return FileSplit(
            [self.files[i] for i in indices.tolist()], self.labels[indices], self.options
        )

    def training_batch(self, images, labels, max_shift: int, generator):
        from capslab.data import Split  # data.py imports this module

        return Split(images, labels).training_batch(images, labels, max_shift, generator)

    def batches(self, batch_size: int, order: torch.Tensor):
        """Yield (images uint8 (b, [C,] N, N), labels (b,)) in `order`, read ahead by workers."""
        chunks = [chunk.tolist() for chunk in order.split(batch_size)]
        for chunk, images in zip(chunks, read_chunks(self.files, chunks, self.options)):
            yield images, self.labels[chunk]


def pixel_bytes(count: int, options: FolderOptions) -> int:
    return count * options.channels * options.image_size**2


def load_folder(root: str | Path, options: FolderOptions, parts=("train", "test"), log=None):
    """The splits `parts` of ROOT (train, test, or both): Splits in memory, or FileSplits
    streamed from disk when the estimated uint8 pixels exceed IN_MEMORY_LIMIT (or as
    options.loading forces). Each must hold options.class_names."""
    from capslab.data import Split  # data.py imports this module

    scans = [scan_split(Path(root) / part) for part in parts]
    for part, scan in zip(parts, scans):
        if part == "test":
            shuffle(scan, TEST_ORDER_SEED)
    if len(scans) == 2:
        check_same_classes(*scans)
    for scan in scans:
        check_saved_classes(scan, options.class_names)
    estimate = pixel_bytes(sum(len(scan.files) for scan in scans), options)
    stream = options.loading == "stream" or (
        options.loading == "auto" and estimate > IN_MEMORY_LIMIT
    )
    shape = f"{options.channels}x{options.image_size}x{options.image_size}"
    where = (
        f"streamed from disk by {options.workers} DataLoader workers"
        if stream
        else "held in memory as uint8"
    )
    counts = ", ".join(f"{part} {len(scan.files)}" for part, scan in zip(parts, scans))
    (log or partial(log_rank0, flush=True))(
        f"folder {root}: {len(options.class_names)} classes, {counts} images of {shape}, "
        f"{estimate / 2**20:,.1f} MiB of pixels (limit {IN_MEMORY_LIMIT / 2**30:.0f} GiB): {where}"
    )
    splits = []
    for scan in scans:
        labels = torch.tensor(scan.labels, dtype=torch.int64)
        if stream:
            splits.append(FileSplit(scan.files, labels, options))
            continue
        chunks = [list(range(s, min(s + LOAD_CHUNK, len(scan.files))))
                  for s in range(0, len(scan.files), LOAD_CHUNK)]  # fmt: skip
        workers = min(options.workers, math.ceil(len(chunks) / 4))  # a few chunks: no workers
        images = torch.cat(list(read_chunks(scan.files, chunks, replace(options, workers=workers))))
        splits.append(Split(images, labels))
    return tuple(splits)


def shuffle(scan: FolderScan, seed: int) -> None:
    """Put the scan's files (and labels) in a seeded random order."""
    order = torch.randperm(len(scan.files), generator=torch.Generator().manual_seed(seed))
    scan.files = [scan.files[i] for i in order.tolist()]
    scan.labels = [scan.labels[i] for i in order.tolist()]
