"""Score a checkpoint on the full test set: accuracy, per-class accuracy, confusion matrix.

    python evaluate.py                                   # the shipped checkpoints/capsnet_mnist.pt
    python evaluate.py --checkpoint checkpoints/best.pt --json
    python evaluate.py --figures results/                # confusion matrix, reconstructions, mistakes
    python evaluate.py --affine                          # accuracy under affNIST-like transforms
    python evaluate.py --routing-stats                   # coupling entropy, dead capsules, r = 1..5

Works on CapsNet and baseline CNN (train.py --model cnn) checkpoints, on the checkpoint's own
dataset. --affine places each test image on a 40x40 zero canvas, applies a seeded random affine
map there (rotation up to +-20 degrees, x-shear up to +-0.2, scale 0.8-1.2, translation up to
+-6 px), and feeds the model the centre 28x28 crop: a crop, not a resize, so the digits keep
the pixel scale the model was trained at. Each family is scored alone and all together.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from CapsNet import CapsNet, capsule_length
from common import SHIPPED_CHECKPOINT, UserError, exit_on_user_error, load_model, pick_device
from data import AFFINE_FAMILIES, CLASS_NAMES, AffineParams, Split, batches, load_split, random_affine, to_float

EVAL_BATCH_SIZE = 500  # train.py and this script score with the same batches, so they agree
ROUTING_ITERATIONS = (1, 2, 3, 5)  # scored by --routing-stats, plus the model's own r
ACTIVE_THRESHOLD = 0.01  # a primary capsule shorter than this counts as inactive


def eval_batches(split: Split, progress: bool, desc: str):
    return tqdm(batches(split, EVAL_BATCH_SIZE), total=-(-len(split) // EVAL_BATCH_SIZE),
                desc=desc, leave=False, disable=not progress)


def predict_lengths(model, split: Split, device: torch.device, limit: int | None = None, progress: bool = False) -> torch.Tensor:
    """Class scores (N, J) on the CPU for the first `limit` examples of `split`: capsule
    lengths for a CapsNet, logits for the baseline CNN; both models return them first."""
    split = split if limit is None else split.subset(torch.arange(min(limit, len(split))))
    model.eval()
    outputs = []
    with torch.inference_mode():
        for images, _ in eval_batches(split, progress, "test"):
            scores = model(to_float(images, device))[0]  # (b, J)
            outputs.append(scores.float().cpu())
    return torch.cat(outputs)  # (N, J)


def routing_stats(model: CapsNet, split: Split, device: torch.device, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """One pass over `split`: coupling statistics at the model's own r, the share of primary
    capsules that never fire, and the accuracy at each r of ROUTING_ITERATIONS from the same
    weights. Returns the statistics and the predictions (N,) at the model's own r."""
    trained_r = model.digit_caps.iterations
    all_r = sorted({*ROUTING_ITERATIONS, trained_r})
    num_out, num_in = model.config.num_classes, model.config.num_primary_caps
    c_sum = torch.zeros(num_out, num_in, dtype=torch.float64)  # sum over examples of c_ij
    c_sq_sum = torch.zeros(num_out, num_in, dtype=torch.float64)  # ... of c_ij^2
    entropy_sum, inactive_sum = 0.0, 0.0
    ever_active = torch.zeros(num_in, dtype=torch.bool)
    correct = dict.fromkeys(all_r, 0)
    predictions = []
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in eval_batches(split, progress, "routing"):
                u = model.primary_caps(model.conv1(to_float(images, device)))  # (b, I, 8)
                active = torch.linalg.vector_norm(u.float(), dim=-1).cpu() >= ACTIVE_THRESHOLD  # (b, I)
                ever_active |= active.any(dim=0)
                inactive_sum += (~active).float().mean(dim=1).sum().item()
                for r in all_r:
                    model.digit_caps.iterations = r
                    v, c = model.digit_caps(u)  # (b, J, 16), (b, J, I)
                    predicted = capsule_length(v).argmax(dim=1).cpu()  # (b,)
                    correct[r] += (predicted == labels).sum().item()
                    if r != trained_r:
                        continue
                    predictions.append(predicted)
                    c = c.cpu().double()  # MPS has no float64
                    entropy_sum += -torch.special.xlogy(c, c).sum(dim=1).mean(dim=1).sum().item()  # H over j
                    c_sum += c.sum(dim=0)
                    c_sq_sum += (c * c).sum(dim=0)
    finally:
        model.digit_caps.iterations = trained_r
    count = len(split)
    c_std = (c_sq_sum / count - (c_sum / count) ** 2).clamp(min=0).sqrt()  # (J, I), std over examples
    stats = {
        "iterations": trained_r,
        "coupling_entropy": entropy_sum / count,
        "coupling_entropy_uniform": math.log(num_out),  # the maximum: c_ij = 1/J (r = 1)
        "coupling_std": c_std.mean().item(),
        # The largest possible mean std, for c_i one-hot on a uniformly random j: sqrt(J - 1) / J.
        "coupling_std_max": math.sqrt(num_out - 1) / num_out,
        "active_threshold": ACTIVE_THRESHOLD,
        "never_active_fraction": 1 - ever_active.float().mean().item(),
        "inactive_fraction_per_image": inactive_sum / count,
        "accuracy_by_iterations": {str(r): 100 * correct[r] / count for r in all_r},
    }
    return stats, torch.cat(predictions)


def print_routing_stats(stats: dict) -> None:
    print(f"routing (r = {stats['iterations']}): coupling entropy over j {stats['coupling_entropy']:.4f} nats "
          f"(uniform c_ij: {stats['coupling_entropy_uniform']:.4f}, one-hot: 0)")
    print(f"  std of c_ij across inputs, mean over (i, j) {stats['coupling_std']:.4f} "
          f"(input-independent coupling: 0, largest possible: {stats['coupling_std_max']:.4f})")
    print(f"  primary capsules never longer than {stats['active_threshold']}: {100 * stats['never_active_fraction']:.2f}%  "
          f"(per image: {100 * stats['inactive_fraction_per_image']:.2f}%)")
    print("  accuracy by routing iterations: "
          + "  ".join(f"r={r} {value:.2f}%" for r, value in stats["accuracy_by_iterations"].items()))


def affine_accuracy(model, split: Split, device: torch.device, seed: int, progress: bool = False) -> dict:
    """Accuracy (%) under seeded affNIST-like transforms, per family and combined. Every family
    uses the same draws (rotation-only rotates by the combined run's angles), in one pass."""
    params = AffineParams.draw(len(split), torch.Generator().manual_seed(seed), split.images.shape[-1])
    correct = dict.fromkeys(AFFINE_FAMILIES, 0)
    start = 0
    model.eval()
    with torch.inference_mode():
        for images, labels in eval_batches(split, progress, "affine"):
            batch_params = params.subset(slice(start, start + len(labels)))
            x = to_float(images, device)  # (b, 1, 28, 28)
            for family in AFFINE_FAMILIES:
                moved = random_affine(x, batch_params.only(family))  # (b, 1, 28, 28)
                correct[family] += (model(moved)[0].argmax(dim=1).cpu() == labels).sum().item()
            start += len(labels)
    return {family: 100 * count / len(split) for family, count in correct.items()}


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
    if class_names != [str(k) for k in range(len(class_names))]:
        print("  " + ", ".join(f"{k} {name}" for k, name in enumerate(class_names)))
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

    if isinstance(model, CapsNet):  # the baseline CNN has no decoder
        paths.append(save_reconstructions(model, split, device, folder / "reconstructions.png"))

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


def save_reconstructions(model: CapsNet, split: Split, device, path: Path) -> Path:
    """16 test digits beside their reconstructions from the predicted capsule."""
    import matplotlib.pyplot as plt

    x = to_float(split.images[:16], device)  # (16, 1, 28, 28)
    with torch.inference_mode():
        _, reconstructions, _ = model(x)  # masked by the prediction
    figure, axes = plt.subplots(2, 16, figsize=(16, 2.4))
    for column in range(16):
        axes[0, column].imshow(x[column, 0].cpu(), cmap="gray")
        axes[1, column].imshow(reconstructions[column, 0].float().cpu(), cmap="gray")
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("test digits (top) and their reconstructions from the predicted capsule (bottom)")
    return save(figure, path)


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
    add("--routing-stats", action="store_true",
        help="CapsNet only: coupling entropy and spread, never-active primary capsules, accuracy at r = 1, 2, 3, 5 (default: off)")
    add("--affine", action="store_true",
        help="also score under seeded affNIST-like transforms on a 40x40 canvas, centre-cropped to 28x28: "
             "rotation, shear, scale, translation and all combined (default: off)")
    add("--seed", type=int, default=0, help="seed of the --affine transforms (default: 0)")
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
    kind = checkpoint.get("model_kind", "capsnet")
    if args.routing_stats and not isinstance(model, CapsNet):
        raise UserError(f"--routing-stats needs a CapsNet checkpoint; {args.checkpoint} holds a {kind}, which has no routing")
    if args.routing_stats:  # its pass also gives the predictions at the model's own r
        stats, predictions = routing_stats(model, split, device, progress=not args.json)
    else:
        predictions = predict_lengths(model, split, device, progress=not args.json).argmax(dim=1)
    result = {"checkpoint": str(args.checkpoint), "model_kind": kind, "dataset": dataset,
              "epoch": checkpoint.get("epoch"), **report(split.labels, predictions, class_names)}
    if args.routing_stats:
        result["routing"] = stats
    if args.affine:
        result["affine"] = {"seed": args.seed, "accuracy": affine_accuracy(model, split, device, args.seed, not args.json)}
    if args.figures:
        result["figures"] = [str(p) for p in save_figures(model, split, predictions, result, class_names, device, Path(args.figures))]
    if args.json:
        print(json.dumps(result))
        return
    print(f"checkpoint {args.checkpoint}  model {kind}  dataset {dataset}  epoch {result['epoch']}  device {device}")
    print_report(result, class_names)
    if args.routing_stats:
        print_routing_stats(result["routing"])
    if args.affine:
        print(f"affine (seed {args.seed}): " + "  ".join(f"{family} {value:.2f}%" for family, value in result["affine"]["accuracy"].items()))
    for path in result.get("figures", []):
        print(f"saved {path}")


if __name__ == "__main__":
    exit_on_user_error(main)
