"""Score a checkpoint on the full test set: accuracy, per-class accuracy, confusion matrix.

    python evaluate.py                                   # the shipped checkpoints/capsnet_mnist.pt
    python evaluate.py --checkpoint checkpoints/best.pt --json
    python evaluate.py --figures results/                # confusion, reconstructions, mistakes
    python evaluate.py --affine                          # accuracy under affNIST-like transforms
    python evaluate.py --routing-stats                   # couplings, dead capsules, r = 1, 2, 3, 5

Works on CapsNet and baseline CNN (train.py --model cnn or paper-cnn) checkpoints, on the
checkpoint's own dataset. --affine places each test image on a 40x40 zero canvas, applies a
seeded random affine map there (rotation up to +-20 degrees, x-shear up to +-0.2, scale
0.8-1.2, translation up to +-6 px), and feeds the model the centre 28x28 crop: a crop, not a
resize, so the digits keep the pixel scale the model was trained at. Each family is scored
alone and all together.
"""

import argparse
import json
from pathlib import Path

from capslab.checkpoint import SHIPPED_CHECKPOINT, has_trained_decoder, load_model
from capslab.data import CLASS_NAMES, add_data_flags, load_split
from capslab.errors import UserError, exit_on_user_error, make_output_folder
from capslab.figures import save_figures
from capslab.hardware import add_device_flags, pick_device
from capslab.scoring import affine_accuracy, class_scores, report, routing_stats
from CapsNet import CapsNet


def print_routing_stats(stats: dict) -> None:
    print(
        f"routing (r = {stats['iterations']}): coupling entropy over j "
        f"{stats['coupling_entropy']:.4f} nats "
        f"(uniform c_ij: {stats['coupling_entropy_uniform']:.4f}, one-hot: 0)"
    )
    print(
        f"  std of c_ij across inputs, mean over (i, j) {stats['coupling_std']:.4f} "
        f"(input-independent coupling: 0, largest possible: {stats['coupling_std_max']:.4f})"
    )
    print(
        f"  primary capsules never longer than {stats['active_threshold']}: "
        f"{100 * stats['never_active_fraction']:.2f}%  "
        f"(per image: {100 * stats['inactive_fraction_per_image']:.2f}%)"
    )
    print(
        "  accuracy by routing iterations: "
        + "  ".join(f"r={r} {value:.2f}%" for r, value in stats["accuracy_by_iterations"].items())
    )


def print_report(result: dict, class_names: list[str]) -> None:
    print(
        f"Test: accuracy {result['correct']}/{result['total']} ({result['accuracy']:.2f}%)  "
        f"error {result['error']:.2f}%"
    )
    print("per-class accuracy:")
    for name, value in result["per_class_accuracy"].items():
        print(f"  {name:>12}  {value:6.2f}%")
    width = max(5, len(str(result["total"])))
    print("confusion matrix (rows: true class, columns: predicted class)")
    if class_names != [str(k) for k in range(len(class_names))]:
        print("  " + ", ".join(f"{k} {name}" for k, name in enumerate(class_names)))
    print(" " * 4 + "".join(f"{k:>{width}}" for k in range(len(class_names))))
    for k, row in enumerate(result["confusion_matrix"]):
        print(f"{k:>4}" + "".join(f"{count:>{width}}" for count in row))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--checkpoint",
        default=str(SHIPPED_CHECKPOINT),
        help="checkpoint to score (default: checkpoints/capsnet_mnist.pt)",
    )
    add_data_flags(parser)
    add_device_flags(parser, threads=False)
    add(
        "--json",
        action="store_true",
        help="print one JSON object instead of the text report (default: off)",
    )
    add(
        "--figures",
        default=None,
        type=Path,
        metavar="DIR",
        help="also save confusion, reconstruction and mistake PNGs in DIR (default: none)",
    )
    add(
        "--routing-stats",
        action="store_true",
        help="CapsNet only: coupling entropy and spread, never-active primary capsules, "
        "accuracy at r = 1, 2, 3, 5 (default: off)",
    )
    add(
        "--affine",
        action="store_true",
        help="also score under seeded affNIST-like transforms on a 40x40 canvas, "
        "centre-cropped to 28x28: "
        "rotation, shear, scale, translation and all combined (default: off)",
    )
    add("--seed", type=int, default=0, help="seed of the --affine transforms (default: 0)")
    args = parser.parse_args(argv)
    if args.test_subset is not None and args.test_subset < 1:
        raise UserError(f"--test-subset must be at least 1, got {args.test_subset}")
    return args


def score(args: argparse.Namespace, model, checkpoint: dict, device) -> dict:
    """Every score the flags ask for, as one JSON-ready dict; --figures also writes its files."""
    dataset = checkpoint["dataset"]
    class_names = CLASS_NAMES[dataset]
    split = load_split(dataset, args.data_dir, train=False).first(args.test_subset)
    kind = checkpoint["model_kind"]
    if args.routing_stats and not isinstance(model, CapsNet):
        raise UserError(
            f"--routing-stats needs a CapsNet checkpoint; {args.checkpoint} holds a {kind}, "
            "which has no routing"
        )
    if args.routing_stats:  # its pass also gives the predictions at the model's own r
        stats, predictions = routing_stats(model, split, device, progress=not args.json)
    else:
        predictions = class_scores(model, split, device, progress=not args.json).argmax(dim=1)
    result = {
        "checkpoint": str(args.checkpoint),
        "model_kind": kind,
        "dataset": dataset,
        "epoch": checkpoint.get("epoch"),
        **report(split.labels, predictions, class_names),
    }
    if args.routing_stats:
        result["routing"] = stats
    if args.affine:
        result["affine"] = {
            "seed": args.seed,
            "accuracy": affine_accuracy(model, split, device, args.seed, not args.json),
        }
    if args.figures:
        saved = save_figures(
            model,
            split,
            predictions,
            result,
            class_names,
            device,
            args.figures,
            reconstructions=has_trained_decoder(checkpoint),
        )
        result["figures"] = [str(path) for path in saved]
    return result


def print_text(result: dict, device) -> None:
    print(
        f"checkpoint {result['checkpoint']}  model {result['model_kind']}  "
        f"dataset {result['dataset']}  epoch {result['epoch']}  device {device}"
    )
    print_report(result, CLASS_NAMES[result["dataset"]])
    if "routing" in result:
        print_routing_stats(result["routing"])
    if "affine" in result:
        affine = result["affine"]
        scores = "  ".join(f"{family} {value:.2f}%" for family, value in affine["accuracy"].items())
        print(f"affine (seed {affine['seed']}): {scores}")
    for path in result.get("figures", []):
        print(f"saved {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    if args.figures:
        make_output_folder(args.figures, "--figures")  # before the scoring pass, not after it
    result = score(args, model, checkpoint, device)
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result, device)


if __name__ == "__main__":
    exit_on_user_error(main)
