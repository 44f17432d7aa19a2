"""Classify photos or scans of handwritten digits with a trained CapsNet.

    python predict.py samples/*.png                      # digit and confidence per file
    python predict.py photo.jpg --json                   # machine-readable
    python predict.py photo.jpg --show out/              # also save input and reconstruction

Each image goes through preprocess.preprocess, which makes a photo look like an MNIST digit
(see that module for what it does and expects).
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from checkpoint import SHIPPED_CHECKPOINT, load_capsnet
from data import CLASS_NAMES
from errors import UserError, exit_on_user_error
from hardware import pick_device
from inference import classify
from preprocess import preprocess


def save_png(image28: torch.Tensor, path: Path) -> None:
    pixels = (image28.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def show(folder: Path, name: str, image28: torch.Tensor, result: dict) -> None:
    """Save what the model saw and what its decoder drew, NAME_input.png and _reconstruction.png."""
    save_png(image28, folder / f"{Path(name).stem}_input.png")
    save_png(result["reconstruction"], folder / f"{Path(name).stem}_reconstruction.png")


def result_line(name: str, result: dict) -> str:
    confidence = f"confidence {result['confidence']:.3f} (length of the winning capsule)"
    return f"{name}: {result['label']}  {confidence}"


def json_record(name: str, result: dict, class_names) -> dict:
    return {
        "file": name,
        "prediction": result["label"],
        "class_index": result["class_index"],
        "confidence": result["confidence"],
        "capsule_lengths": dict(zip(class_names, result["lengths"])),
    }


def main(argv=None) -> None:
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
    add(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: auto)",
    )
    add(
        "--json",
        action="store_true",
        help="print one JSON list instead of text lines (default: off)",
    )
    add(
        "--show",
        metavar="DIR",
        type=Path,
        help="save each 28x28 input and its reconstruction as PNGs here (default: none)",
    )
    args = parser.parse_args(argv)

    if args.show and args.show.exists() and not args.show.is_dir():
        raise UserError(f"--show {args.show} is a file, not a folder")
    images = [preprocess(path) for path in args.images]  # every file is checked before any guess
    device = pick_device(args.device)
    model, checkpoint = load_capsnet(args.checkpoint, device)
    class_names = CLASS_NAMES[checkpoint.get("dataset", "mnist")]
    if not args.json:
        parameters = sum(parameter.numel() for parameter in model.parameters())
        print(f"checkpoint {args.checkpoint}  device {device}  parameters {parameters:,}")
    records = []
    for name, image28 in zip(args.images, images):
        result = classify(model, image28, class_names)
        records.append(json_record(name, result, class_names))
        if not args.json:
            print(result_line(name, result))
        if args.show:
            args.show.mkdir(parents=True, exist_ok=True)
            show(args.show, name, image28, result)
    if args.json:
        print(json.dumps(records, indent=2))


if __name__ == "__main__":
    exit_on_user_error(main)
