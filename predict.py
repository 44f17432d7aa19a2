"""Classify photos or scans of handwritten digits with a trained CapsNet.

    python predict.py samples/*.png                      # digit and confidence per file
    python predict.py photo.jpg --json                   # machine-readable
    python predict.py photo.jpg --show out/              # also save input and reconstruction

Each image goes through preprocess.preprocess, which makes a photo look like an MNIST digit
(see that module for what it does and expects). Files are read, classified and reported one
at a time, in the order given. A file that is no image or holds no digit gets an error in
its place (`NAME: error: ...`, or a JSON entry with "file" and "error"), the others their
prediction, and the exit status is 2. A bad checkpoint or flag stops before any file.

A model trained on a folder of images (train.py --dataset folder) reads each file as training
did (imagefolder.read_image: grayscale or RGB, resized to its N x N) and names its classes.
"""

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # first: torch takes seconds to load

# isort: split
import argparse
import json
import textwrap
from functools import partial
from pathlib import Path

import torch

from capslab.atomic import write_atomically
from capslab.checkpoint import (
    SHIPPED_CHECKPOINT,
    class_names,
    has_trained_decoder,
    load_capsnet,
)
from capslab.data import to_model_input
from capslab.errors import UserError, counted, exit_on_user_error, make_output_folder
from capslab.hardware import add_device_flags, pick_device
from capslab.imagefolder import read_image
from capslab.inference import classify, to_png
from capslab.preprocess import preprocess


def show(folder: Path, stem: str, image28: torch.Tensor, result: dict) -> None:
    """Save what the model saw and what its decoder drew, STEM_input.png and _reconstruction.png."""
    for name, picture in (("input", image28), ("reconstruction", result["reconstruction"])):
        png = to_png(picture, scale=1)
        write_atomically(folder / f"{stem}_{name}.png", partial(Path.write_bytes, data=png))


def show_colour(model, folder: Path, stem: str, image: torch.Tensor) -> None:
    """show() for a colour image (1, 3, N, N): the input and the reconstruction, in RGB."""
    from PIL import Image

    with torch.no_grad():
        _, drawn, _ = model(to_model_input(image, next(model.parameters()).device))
    for name, picture in (("input", image[0]), ("reconstruction", drawn[0].float().cpu())):
        pixels = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        drawing = Image.fromarray(pixels, mode="RGB")
        write_atomically(folder / f"{stem}_{name}.png", partial(drawing.save, format="PNG"))


def read_input(model, name: str, from_folder: bool) -> torch.Tensor:
    """A file as the model takes it: a photo of a digit made MNIST-like (28, 28), or, for a
    model trained on a folder, the image as training read it: (N, N), or (1, 3, N, N)."""
    if not from_folder:
        return preprocess(name)
    config = model.config
    image = read_image(name, config.image_size, config.in_channels).float() / 255
    return image if config.in_channels == 1 else image.unsqueeze(0)


def output_stems(names: list[str]) -> list[str]:
    """Each file's name without folder and suffix, made unique in the order given: a name
    already taken (ignoring case, as some file systems do) gets -2, -3, ... added."""
    taken, stems = set(), []
    for name in names:
        stem = candidate = Path(name).stem
        count = 1
        while candidate.casefold() in taken:
            count += 1
            candidate = f"{stem}-{count}"
        taken.add(candidate.casefold())
        stems.append(candidate)
    return stems


def text_line(record: dict) -> str:
    if "error" in record:  # the line names the file first, so the message need not repeat it
        message = record["error"].removeprefix(f"{record['file']} ")
        return f"{record['file']}: error: {message}"
    confidence = f"confidence {record['confidence']:.3f} (length of the winning capsule)"
    return f"{record['file']}: {record['prediction']}  {confidence}"


def json_entry(record: dict, last: bool) -> str:
    """One entry of the list json.dumps(records, indent=2) would print, so that printed one at
    a time the entries still make that very text."""
    return textwrap.indent(json.dumps(record, indent=2), "  ") + ("" if last else ",")


def json_record(name: str, result: dict, class_names) -> dict:
    return {
        "file": name,
        "prediction": result["label"],
        "class_index": result["class_index"],
        "confidence": result["confidence"],
        "capsule_lengths": dict(zip(class_names, result["lengths"])),
    }


def predict_file(
    model, name: str, names, show_dir: Path | None, stem: str, from_folder: bool = False
) -> dict:
    """One file -> its JSON record: the prediction, or {"file", "error"} if it has no digit."""
    try:
        image28 = read_input(model, name, from_folder)
    except UserError as error:
        return {"file": name, "error": str(error)}
    result = classify(model, image28, names)
    if show_dir and image28.dim() == 4:
        show_colour(model, show_dir, stem, image28)
    elif show_dir:
        show(show_dir, stem, image28, result)
    return json_record(name, result, names)


def print_records(records, count: int, as_json: bool) -> int:
    """Print each record as soon as it is made, flushed: a text line, or the next entry of one
    JSON list. Returns how many records are errors."""
    failed = 0
    if as_json:
        print("[", flush=True)
    for index, record in enumerate(records):
        failed += "error" in record
        print(json_entry(record, index == count - 1) if as_json else text_line(record), flush=True)
    if as_json:
        print("]", flush=True)
    return failed


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Classify photos of handwritten digits with a CapsNet."
    )
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE", help="photos or scans, one digit each")
    add(
        "--checkpoint",
        default=str(SHIPPED_CHECKPOINT),
        help="model to use (default: checkpoints/capsnet_mnist.pt)",
    )
    add_device_flags(parser, threads=False)
    add(
        "--json",
        action="store_true",
        help="print one JSON list, an entry per file as it is done, instead of text lines "
        "(default: off)",
    )
    add(
        "--show",
        metavar="DIR",
        type=Path,
        help="save each 28x28 input and its reconstruction here as NAME_input.png and "
        "NAME_reconstruction.png; a NAME given twice gets -2, -3, ... (default: none)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, checkpoint = load_capsnet(args.checkpoint, device)  # once, before any file
    if checkpoint["dataset"] == "multimnist":
        raise UserError(
            f"{args.checkpoint} reads pairs of overlapping digits on 36x36; predict.py reads one "
            "digit an image: use an MNIST model, or the notebook's 'Two digits at once'"
        )
    if args.show and not has_trained_decoder(checkpoint):
        raise UserError(
            f"--show: {args.checkpoint} was trained without the reconstruction loss "
            "(--reconstruction-weight 0), so its decoder draws nothing meaningful"
        )
    names = class_names(checkpoint)
    from_folder = checkpoint["dataset"] == "folder"
    if args.show:
        make_output_folder(args.show, "--show")
    if not args.json:
        parameters = sum(parameter.numel() for parameter in model.parameters())
        header = f"checkpoint {args.checkpoint}  device {device}  parameters {parameters:,}"
        print(header, flush=True)
    records = (  # lazy: each file is read and classified when its turn to be printed comes
        predict_file(model, name, names, args.show, stem, from_folder)
        for name, stem in zip(args.images, output_stems(args.images))
    )
    failed = print_records(records, len(args.images), args.json)
    if failed:
        raise UserError(f"{failed} of {counted(len(args.images), 'image')} could not be classified")


if __name__ == "__main__":
    exit_on_user_error(main)
