"""Score a checkpoint on the full test set: accuracy, per-class accuracy, confusion matrix.

    python evaluate.py                                   # the shipped checkpoints/capsnet_mnist.pt
    python evaluate.py --checkpoint checkpoints/best.pt --json
    python evaluate.py --figures results/                # confusion, reconstructions, mistakes
    python evaluate.py --affine                          # accuracy under affNIST-like transforms
    python evaluate.py --routing-stats                   # couplings, dead capsules, r = 1, 2, 3, 5

Works on CapsNet and baseline CNN (train.py --model cnn or paper-cnn) checkpoints, on the
checkpoint's own dataset. A model trained on a folder of images (train.py --dataset folder)
scores --data-dir/test, which must hold the classes it was trained on; the report names them.

--affine places each test image on a 40x40 zero canvas, applies a
seeded random affine map there (rotation up to +-20 degrees, x-shear up to +-0.2, scale
0.8-1.2, translation up to +-6 px), and feeds the model the centre 28x28 crop: a crop, not a
resize, so the digits keep the pixel scale the model was trained at. Each family is scored
alone and all together.
"""

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # first: torch takes seconds to load

# isort: split
import argparse
import contextlib
import json
import sys

from capslab.checkpoint import (
    SHIPPED_CHECKPOINT,
    SHIPPED_MULTIMNIST,
    class_names,
    epoch_text,
    epochs_before,
    folder_options,
    has_trained_decoder,
    load_model,
    unvalidated_weights,
)
from capslab.data import CLASS_NAMES, IMAGE_SIZE, first_images, load_test_split
from capslab.errors import UserError, exit_on_user_error, make_output_folder
from capslab.figures import save_figures, save_pair_reconstructions
from capslab.hardware import pick_device
from capslab.scoring import (
    affine_accuracy,
    build_evaluate_parser,
    check_evaluate_args,
    class_scores,
    pair_report,
    report,
    routing_stats,
)
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


def print_per_class(per_class: dict) -> None:
    for name, value in per_class.items():
        print(f"  {name:>12}  " + ("     -  no test image" if value is None else f"{value:6.2f}%"))


def print_report(result: dict, class_names: list[str]) -> None:
    print(
        f"Test: accuracy {result['correct']}/{result['total']} ({result['accuracy']:.2f}%)  "
        f"error {result['error']:.2f}%"
    )
    print("per-class accuracy:")
    print_per_class(result["per_class_accuracy"])
    width = max(5, len(str(result["total"])))
    print("confusion matrix (rows: true class, columns: predicted class)")
    if class_names != [str(k) for k in range(len(class_names))]:
        print("  " + ", ".join(f"{k} {name}" for k, name in enumerate(class_names)))
    print(" " * 4 + "".join(f"{k:>{width}}" for k in range(len(class_names))))
    for k, row in enumerate(result["confusion_matrix"]):
        print(f"{k:>4}" + "".join(f"{count:>{width}}" for count in row))


def print_pair_report(result: dict) -> None:
    print(
        f"Test: both digits right {result['correct']}/{result['total']} pairs "
        f"({result['accuracy']:.2f}%)  error {result['error']:.2f}%  "
        f"digits right {result['digit_accuracy']:.2f}%"
    )
    print("per-class accuracy (digits of the class found among the two longest capsules):")
    print_per_class(result["per_class_accuracy"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_evaluate_parser(__doc__)
    args = parser.parse_args(argv)
    check_evaluate_args(args)
    if args.checkpoint is None:
        shipped = SHIPPED_MULTIMNIST if args.dataset == "multimnist" else SHIPPED_CHECKPOINT
        args.checkpoint = str(shipped)
    return args


def score(args: argparse.Namespace, model, checkpoint: dict, device) -> dict:
    """Every score the flags ask for, as one JSON-ready dict; --figures also writes its files."""
    dataset, split = test_split(args, model, checkpoint)
    if split.labels.dim() == 2:  # MultiMNIST pairs
        return score_pairs(args, model, checkpoint, split, device)
    return score_digits(args, model, checkpoint, dataset, split, device)


def test_split(args: argparse.Namespace, model, checkpoint: dict) -> tuple[str, object]:
    """The dataset to score (--dataset, else the checkpoint's) and its test split (the first
    --test-subset images), after checking that the model can read it."""
    dataset = args.dataset or checkpoint["dataset"]
    if "folder" in (dataset, checkpoint["dataset"]) and dataset != checkpoint["dataset"]:
        raise UserError(
            f"{args.checkpoint} was trained on {checkpoint['dataset']}: --dataset folder scores "
            "a model trained on a folder of images, on that folder's test/"
        )
    folder = None
    if dataset == "folder":
        folder = folder_options(checkpoint, model)
        if args.affine and folder.image_size != IMAGE_SIZE["mnist"]:
            raise UserError("--affine transforms 28x28 images on a 40x40 canvas")
    else:
        check_input_size(model, dataset, args.checkpoint)
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # a folder's note
        split = first_images(load_test_split(dataset, args.data_dir, folder), args.test_subset)
    return dataset, split


def score_digits(args: argparse.Namespace, model, checkpoint: dict, dataset: str, split, device):
    """One digit an image: accuracy, per class and confusion; --routing-stats, --affine and
    --figures as asked. Returns the JSON-ready dict."""
    names = class_names(checkpoint) if dataset == checkpoint["dataset"] else CLASS_NAMES[dataset]
    if args.routing_stats and not isinstance(model, CapsNet):
        raise UserError(
            f"--routing-stats needs a CapsNet checkpoint; {args.checkpoint} holds a "
            f"{checkpoint['model_kind']}, which has no routing"
        )
    if args.routing_stats:  # its pass also gives the predictions at the model's own r
        stats, predictions = routing_stats(model, split, device, progress=not args.json)
    else:
        predictions = class_scores(model, split, device, progress=not args.json).argmax(dim=1)
    result = {**about(args, checkpoint, dataset), **report(split.labels, predictions, names)}
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
            names,
            device,
            args.figures,
            reconstructions=has_trained_decoder(checkpoint),
        )
        result["figures"] = [str(path) for path in saved]
    return result


def about(args: argparse.Namespace, checkpoint: dict, dataset: str) -> dict:
    """What a result is of: which checkpoint, how long it trained, the data scored."""
    return {
        "checkpoint": str(args.checkpoint),
        "model_kind": checkpoint["model_kind"],
        "dataset": dataset,
        "trained_on": checkpoint["dataset"],  # another dataset only when --dataset asks for it
        "epoch": checkpoint.get("epoch"),
        "epochs_before": epochs_before(checkpoint),  # --init-from's, in all; null: unknown
    }


def check_input_size(model, dataset: str, path) -> None:
    size = getattr(model.config, "image_size", IMAGE_SIZE[dataset])
    if size != IMAGE_SIZE[dataset]:
        raise UserError(
            f"{path} takes {size}x{size} images and {dataset} has "
            f"{IMAGE_SIZE[dataset]}x{IMAGE_SIZE[dataset]}: pass a checkpoint trained on {dataset}"
        )


def score_pairs(args: argparse.Namespace, model, checkpoint: dict, split, device) -> dict:
    """MultiMNIST: the paper's error (the two longest capsules are both digits), per-digit
    accuracy beside it, and with --figures the paper's Figure 5."""
    if args.routing_stats or args.affine:
        raise UserError("--routing-stats and --affine score single digits, not multimnist pairs")
    scores = class_scores(model, split, device, progress=not args.json)  # (N, 10)
    result = {
        **about(args, checkpoint, "multimnist"),
        **pair_report(split.labels, scores, CLASS_NAMES["multimnist"]),
    }
    if args.figures and has_trained_decoder(checkpoint):
        figure = save_pair_reconstructions(
            model, split, scores, device, args.figures / "multimnist_reconstructions.png"
        )
        result["figures"] = [str(figure)]
    return result


def print_text(result: dict, device) -> None:
    print(
        f"checkpoint {result['checkpoint']}  model {result['model_kind']}  "
        f"dataset {result['dataset']}  {epoch_text(result['epoch'], result['epochs_before'])}  "
        f"device {device}"
    )
    if result.get("trained_on", result["dataset"]) != result["dataset"]:
        print(f"note: the model was trained on {result['trained_on']}, not {result['dataset']}")
    if "digit_accuracy" in result:
        print_pair_report(result)
    else:
        print_report(result, list(result["per_class_accuracy"]))
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
    if held := unvalidated_weights(checkpoint):
        print(f"note: {args.checkpoint} holds {held}", file=sys.stderr)
    if args.figures:
        make_output_folder(args.figures, "--figures")  # before the scoring pass, not after it
    result = score(args, model, checkpoint, device)
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result, device)


if __name__ == "__main__":
    exit_on_user_error(main)
