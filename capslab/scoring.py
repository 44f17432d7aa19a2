"""Scoring a trained model: accuracy, per-class report, routing statistics, affine robustness.

train.py and evaluate.py both score through `class_scores`, with the same batches, so
evaluate.py prints the accuracy that training logged for the same checkpoint.
"""

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from capslab.data import (
    AFFINE_FAMILIES,
    DATASETS,
    AffineParams,
    Split,
    add_data_flags,
    batches,
    random_affine,
    to_model_input,
)
from capslab.errors import UserError
from capslab.hardware import add_device_flags
from capslab.multimnist import PairScores
from capslab.settings import SEED_RANGE, is_seed
from CapsNet import CapsNet, capsule_length

EVAL_BATCH_SIZE = 500
ROUTING_ITERATIONS = (1, 2, 3, 5)  # scored by routing_stats, plus the model's own r
ACTIVE_THRESHOLD = 0.01  # a primary capsule shorter than this counts as inactive


def build_evaluate_parser(description: str | None = None) -> argparse.ArgumentParser:
    """evaluate.py's flags; sweep.py checks a grid's "evaluate" flags with them."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--checkpoint",
        default=None,
        help="checkpoint to score (default: checkpoints/capsnet_mnist.pt, or "
        "checkpoints/capsnet_multimnist.pt with --dataset multimnist)",
    )
    add(
        "--dataset",
        default=None,
        choices=DATASETS,
        help="the test set to score; multimnist: the 10,000 fixed test pairs "
        "(default: the checkpoint's own)",
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
        f"accuracy at r = {', '.join(map(str, ROUTING_ITERATIONS))} (default: off)",
    )
    add(
        "--affine",
        action="store_true",
        help="also score under seeded affNIST-like transforms on a 40x40 canvas, "
        "centre-cropped to 28x28: "
        "rotation, shear, scale, translation and all combined (default: off)",
    )
    add("--seed", type=int, default=0, help="seed of the --affine transforms (default: 0)")
    return parser


def check_evaluate_args(args: argparse.Namespace) -> None:
    """The values argparse lets through that evaluate.py cannot use, as one UserError."""
    if args.test_subset is not None and args.test_subset < 1:
        raise UserError(f"--test-subset must be at least 1, got {args.test_subset}")
    if not is_seed(args.seed):
        raise UserError(f"--seed must be in {SEED_RANGE}, got {args.seed}")


def eval_batches(split: Split, progress: bool, desc: str):
    return tqdm(
        batches(split, EVAL_BATCH_SIZE),
        total=-(-len(split) // EVAL_BATCH_SIZE),
        desc=desc,
        leave=False,
        disable=not progress,
    )


def class_scores(model, split: Split, device: torch.device, progress: bool = False) -> torch.Tensor:
    """Class scores (N, J) on the CPU: capsule lengths for a CapsNet, logits for the baseline
    CNN; both models return them first."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for images, _ in eval_batches(split, progress, "test"):
            scores = model(to_model_input(images, device))[0]  # (b, J)
            outputs.append(scores.float().cpu())
    return torch.cat(outputs)  # (N, J)


def correct_mask(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool from scores (N, J): the top class is the label, or for MultiMNIST's labels
    (N, 2) the paper's measure, the two longest capsules are the pair's two digits."""
    if labels.dim() == 2:
        return PairScores.of(scores, labels).both_correct
    return scores.argmax(dim=1) == labels


def count_correct(model, split: Split, device: torch.device) -> int:
    return int(correct_mask(class_scores(model, split, device), split.labels).sum())


class CouplingTally:
    """Sums over examples of the coupling coefficients c_ij, for their entropy and spread."""

    def __init__(self, num_out: int, num_in: int):
        self.c_sum = torch.zeros(num_out, num_in, dtype=torch.float64)  # sum of c_ij
        self.c_sq_sum = torch.zeros(num_out, num_in, dtype=torch.float64)  # sum of c_ij^2
        self.entropy_sum = 0.0

    def add(self, c: torch.Tensor) -> None:
        """c (b, J, I): each input capsule's coupling to the J outputs."""
        c = c.cpu().double()  # MPS has no float64
        entropy = -torch.special.xlogy(c, c).sum(dim=1)  # (b, I): H over j of each c_i
        self.entropy_sum += entropy.mean(dim=1).sum().item()
        self.c_sum += c.sum(dim=0)
        self.c_sq_sum += (c * c).sum(dim=0)

    def stats(self, count: int) -> dict:
        num_out = self.c_sum.shape[0]
        mean = self.c_sum / count
        c_std = (self.c_sq_sum / count - mean**2).clamp(min=0).sqrt()  # (J, I), std over examples
        return {
            "coupling_entropy": self.entropy_sum / count,
            "coupling_entropy_uniform": math.log(num_out),  # the maximum: c_ij = 1/J (r = 1)
            "coupling_std": c_std.mean().item(),
            # The largest mean std possible, c_i one-hot on a uniformly random j: sqrt(J - 1) / J.
            "coupling_std_max": math.sqrt(num_out - 1) / num_out,
        }


def routing_stats(
    model: CapsNet, split: Split, device: torch.device, progress: bool = False
) -> tuple[dict, torch.Tensor]:
    """One pass over `split`: coupling statistics at the model's own r, the share of primary
    capsules that never fire, and the accuracy at each r of ROUTING_ITERATIONS from the same
    weights. Returns the statistics and the predictions (N,) at the model's own r."""
    trained_r = model.config.routing_iterations
    all_r = sorted({*ROUTING_ITERATIONS, trained_r})
    coupling = CouplingTally(model.config.num_classes, model.config.num_primary_caps)
    ever_active = torch.zeros(model.config.num_primary_caps, dtype=torch.bool)
    inactive_sum, correct, predictions = 0.0, dict.fromkeys(all_r, 0), []
    model.eval()
    with torch.inference_mode():
        for images, labels in eval_batches(split, progress, "routing"):
            u, v_trained, c_trained = model.capsules(to_model_input(images, device))  # u (b, I, 8)
            active = torch.linalg.vector_norm(u.float(), dim=-1).cpu() >= ACTIVE_THRESHOLD  # (b, I)
            ever_active |= active.any(dim=0)
            inactive_sum += (~active).float().mean(dim=1).sum().item()
            for r in all_r:  # the same votes routed again with another r
                v, c = (
                    (v_trained, c_trained) if r == trained_r else model.digit_caps(u, iterations=r)
                )  # (b, J, 16), (b, J, I)
                predicted = capsule_length(v).argmax(dim=1).cpu()  # (b,)
                correct[r] += (predicted == labels).sum().item()
                if r == trained_r:
                    predictions.append(predicted)
                    coupling.add(c)
    count = len(split)
    stats = {
        "iterations": trained_r,
        **coupling.stats(count),
        "active_threshold": ACTIVE_THRESHOLD,
        "never_active_fraction": 1 - ever_active.float().mean().item(),
        "inactive_fraction_per_image": inactive_sum / count,
        "accuracy_by_iterations": {str(r): 100 * correct[r] / count for r in all_r},
    }
    return stats, torch.cat(predictions)


def affine_accuracy(
    model, split: Split, device: torch.device, seed: int, progress: bool = False
) -> dict:
    """Accuracy (%) under seeded affNIST-like transforms, per family and combined. Every family
    uses the same draws (rotation-only rotates by the combined run's angles), in one pass."""
    params = AffineParams.draw(
        len(split), torch.Generator().manual_seed(seed), split.images.shape[-1]
    )
    correct = dict.fromkeys(AFFINE_FAMILIES, 0)
    start = 0
    model.eval()
    with torch.inference_mode():
        for images, labels in eval_batches(split, progress, "affine"):
            batch_params = params.subset(slice(start, start + len(labels)))
            x = to_model_input(images, device)  # (b, 1, 28, 28)
            for family in AFFINE_FAMILIES:
                moved = random_affine(x, batch_params.only(family))  # (b, 1, 28, 28)
                correct[family] += (model(moved)[0].argmax(dim=1).cpu() == labels).sum().item()
            start += len(labels)
    return {family: 100 * count / len(split) for family, count in correct.items()}


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(N,), (N,) -> (K, K) counts, rows the true class, columns the prediction."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def report(labels: torch.Tensor, predictions: torch.Tensor, class_names: list[str]) -> dict:
    matrix = confusion_matrix(labels, predictions, len(class_names))
    correct, total = int(matrix.trace()), len(labels)
    per_class = [
        100 * hits / count if count else None  # None: the class has no test example
        for hits, count in zip(matrix.diag().tolist(), matrix.sum(dim=1).tolist())
    ]
    return {
        "correct": correct,
        "total": total,
        "accuracy": 100 * correct / total,
        "error": 100 * (total - correct) / total,
        "per_class_accuracy": dict(zip(class_names, per_class)),
        "confusion_matrix": matrix.tolist(),
    }


def pair_report(labels: torch.Tensor, scores: torch.Tensor, class_names: list[str]) -> dict:
    """MultiMNIST: the paper's measure (both digits are the two longest capsules) and, beside
    it, the share of single digits found among the two longest; per class, that share."""
    pairs = PairScores.of(scores, labels)
    correct, total = int(pairs.both_correct.sum()), len(labels)
    top2 = scores.topk(2, dim=1).indices  # (N, 2)
    found = (labels.unsqueeze(2) == top2.unsqueeze(1)).any(dim=2)  # (N, 2) per true digit
    per_class = [
        100 * found[labels == k].float().mean().item() if (labels == k).any() else None
        for k in range(len(class_names))
    ]
    return {
        "correct": correct,
        "total": total,
        "accuracy": 100 * correct / total,
        "error": 100 * (total - correct) / total,
        "digit_accuracy": 100 * pairs.digits_found.sum().item() / (2 * total),
        "per_class_accuracy": dict(zip(class_names, per_class)),
    }
