"""Score a checkpoint on the full test set: accuracy, per-class accuracy, confusion matrix.

    python evaluate.py                                   # the shipped checkpoints/capsnet_mnist.pt
    python evaluate.py --checkpoint checkpoints/best.pt --json
    python evaluate.py --figures results/                # confusion matrix, reconstructions, mistakes
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from common import SHIPPED_CHECKPOINT, UserError, exit_on_user_error, load_model, pick_device
from data import CLASS_NAMES, Split, batches, load_split, to_float

EVAL_BATCH_SIZE = 500  # train.py and this script score with the same batches, so they agree


def predict_lengths(model, split: Split, device: torch.device, limit: int | None = None, progress: bool = False) -> torch.Tensor:
    """Digit-capsule lengths (N, J) on the CPU for the first `limit` examples of `split`."""
    split = split if limit is None else split.subset(torch.arange(min(limit, len(split))))
    model.eval()
    outputs = []
    with torch.inference_mode():
        for images, _ in tqdm(batches(split, EVAL_BATCH_SIZE), total=-(-len(split) // EVAL_BATCH_SIZE),
                              desc="test", leave=False, disable=not progress):
            lengths, _, _ = model(to_float(images, device))  # (b, J)
            outputs.append(lengths.float().cpu())
    return torch.cat(outputs)  # (N, J)


def accuracy(model, split: Split, device: torch.device, limit: int | None = None) -> float:
    """Fraction of the first `limit` examples whose longest capsule is the true class."""
    predictions = predict_lengths(model, split, device, limit).argmax(dim=1)
    return (predictions == split.labels[: len(predictions)]).float().mean().item()


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,), (N,) -> (K, K) counts, rows the true class, columns the prediction."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def report(labels: torch.Tensor, predictions: torch.Tensor, class_names: list[str]) -> dict:
    matrix = confusion_matrix(labels, predictions, len(class_names))
    correct, total = int(matrix.trace()), len(labels)
    per_class = (matrix.diag().float() / matrix.sum(dim=1).clamp(min=1) * 100).tolist()
    return {
        "correct": correct,
        "total": total,
        "accuracy": 100 * correct / total,
        "error": 100 * (total - correct) / total,
        "per_class_accuracy": dict(zip(class_names, per_class)),
        "confusion_matrix": matrix.tolist(),
    }


def print_report(result: dict, class_names: list[str]) -> None:
    print(f"Test: accuracy {result['correct']}/{result['total']} ({result['accuracy']:.2f}%)  error {result['error']:.2f}%")
    print("per-class accuracy:")
    for name, value in result["per_class_accuracy"].items():
        print(f"  {name:>12}  {value:6.2f}%")
    width = max(5, len(str(result["total"])))
    print("confusion matrix (rows: true class, columns: predicted class)")
    print(" " * 4 + "".join(f"{k:>{width}}" for k in range(len(class_names))))
    for k, row in enumerate(result["confusion_matrix"]):
        print(f"{k:>4}" + "".join(f"{count:>{width}}" for count in row))


def save_figures(model, split: Split, predictions: torch.Tensor, result: dict, class_names, device, folder: Path) -> list[Path]:
    """Confusion matrix, 16 test digits beside their reconstructions, and up to 32 mistakes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    figure, axis = plt.subplots(figsize=(6, 5))
    matrix = torch.tensor(result["confusion_matrix"])
    image = axis.imshow(torch.log1p(matrix.float()), cmap="Blues")
    for (row, col), count in zip(torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(), matrix.flatten().tolist()):
        if count:
            axis.text(col, row, str(count), ha="center", va="center", fontsize=7, color="black" if row != col else "white")
    axis.set(xlabel="predicted", ylabel="true", xticks=range(len(class_names)), yticks=range(len(class_names)),
             title=f"test accuracy {result['accuracy']:.2f}%")
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    paths.append(save(figure, folder / "confusion_matrix.png"))

    sample = torch.arange(16)
    x = to_float(split.images[sample], device)
    with torch.inference_mode():
        _, reconstructions, _ = model(x)  # masked by the prediction
    figure, axes = plt.subplots(2, 16, figsize=(16, 2.4))
    for column in range(16):
        axes[0, column].imshow(x[column, 0].cpu(), cmap="gray")
        axes[1, column].imshow(reconstructions[column, 0].float().cpu(), cmap="gray")
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("test digits (top) and their reconstructions from the predicted capsule (bottom)")
    paths.append(save(figure, folder / "reconstructions.png"))

    wrong = (predictions != split.labels).nonzero().flatten()[:32]
    if len(wrong):
        columns = 8
        rows = -(-len(wrong) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for axis, index in zip(axes.flat, wrong.tolist()):
            axis.imshow(split.images[index], cmap="gray")
            axis.set_title(f"{class_names[split.labels[index]]}→{class_names[predictions[index]]}", fontsize=8)
        figure.suptitle("misclassified test images (true → predicted)")
        paths.append(save(figure, folder / "misclassified.png"))
    return paths


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="checkpoint to score (default: checkpoints/capsnet_mnist.pt)")
    add("--data-dir", default="data", help="dataset root, downloaded into if absent (default: data)")
    add("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add("--test-subset", type=int, default=None, help="score only the first N test images (default: all)")
    add("--json", action="store_true", help="print one JSON object instead of the text report (default: off)")
    add("--figures", default=None, metavar="DIR", help="also save confusion, reconstruction and mistake PNGs in DIR (default: none)")
    args = parser.parse_args(argv)
    if args.test_subset is not None and args.test_subset < 1:
        raise UserError(f"--test-subset must be at least 1, got {args.test_subset}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    dataset = checkpoint.get("dataset", "mnist")
    class_names = CLASS_NAMES[dataset]
    split = load_split(dataset, args.data_dir, train=False)
    if args.test_subset is not None:
        split = split.subset(torch.arange(min(args.test_subset, len(split))))
    predictions = predict_lengths(model, split, device, progress=not args.json).argmax(dim=1)
    result = {"checkpoint": str(args.checkpoint), "dataset": dataset, "epoch": checkpoint.get("epoch"),
              **report(split.labels, predictions, class_names)}
    if args.figures:
        result["figures"] = [str(p) for p in save_figures(model, split, predictions, result, class_names, device, Path(args.figures))]
    if args.json:
        print(json.dumps(result))
        return
    print(f"checkpoint {args.checkpoint}  dataset {dataset}  epoch {result['epoch']}  device {device}")
    print_report(result, class_names)
    for path in result.get("figures", []):
        print(f"saved {path}")


if __name__ == "__main__":
    exit_on_user_error(main)
