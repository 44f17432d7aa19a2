"""Figures: the training curve, the confusion matrix, reconstructions, misclassified digits,
and a grid's test errors beside the paper's.

matplotlib is imported inside each function with the Agg backend, so training and scoring
never need a display.
"""

from pathlib import Path

import torch

from capslab.atomic import write_atomically
from capslab.data import Split, to_model_input
from capslab.multimnist import PairScores
from CapsNet import CapsNet


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> Path:
    """A PNG written whole or not at all: an interrupted save leaves the previous file."""
    figure.tight_layout()
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    finally:
        pyplot().close(figure)
    return path


def picture(image: torch.Tensor) -> dict:
    """imshow's arguments for one image: (H, W) grayscale, or (C, H, W) colour as RGB."""
    image = image.float().cpu()
    if image.dim() == 3 and image.shape[0] == 3:
        image = image.permute(1, 2, 0)  # (H, W, 3)
        return {"X": (image / 255 if image.max() > 1 else image.clamp(0, 1)).numpy()}
    return {"X": image.squeeze(0).numpy(), "cmap": "gray"}


def plot_curve(records: list[dict], path: Path) -> Path:
    """Training loss and validation/test accuracy per epoch, from metrics.jsonl records."""
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axis, accuracy_axis) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    epochs = [record["epoch"] for record in records]
    loss_axis.semilogy(epochs, [record["train_loss"] for record in records], color="black")
    loss_axis.set(xlabel="epoch", ylabel="training loss (log scale)", title="loss")
    for key, label in (("val_acc", "validation"), ("test_acc", "test")):
        points = [(record["epoch"], record[key]) for record in records if key in record]
        if points:
            accuracy_axis.plot(*zip(*points), marker=".", label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    accuracy_axis.grid(alpha=0.3)
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if accuracy_axis.get_lines():  # no accuracy yet when --test-every skips the first epochs
        accuracy_axis.legend()
    return save(figure, path)


def save_figures(
    model,
    split: Split,
    predictions: torch.Tensor,
    result: dict,
    class_names,
    device,
    folder: Path,
    reconstructions: bool,
) -> list[Path]:
    """Confusion matrix, 16 test digits beside their reconstructions (when the model has a
    trained decoder), and up to 32 mistakes."""
    paths = [
        plot_confusion(
            torch.tensor(result["confusion_matrix"]),
            result["accuracy"],
            class_names,
            folder / "confusion_matrix.png",
        )
    ]
    if reconstructions:
        paths.append(save_reconstructions(model, split, device, folder / "reconstructions.png"))
    wrong = (predictions != split.labels).nonzero().flatten()[:32]
    if len(wrong):
        paths.append(
            plot_mistakes(split, predictions, wrong, class_names, folder / "misclassified.png")
        )
    return paths


def plot_test_errors(
    errors: dict[str, tuple[list[float], tuple[float, float | None] | None]], path: Path
) -> Path:
    """One line per recipe: each seed's test error (dots), their mean ± std, and the paper's
    mean ± std (a diamond) where given. Lower is better."""
    figure, axis = pyplot().subplots(figsize=(7, 0.5 * len(errors) + 1.2))
    for row, (ours, paper) in enumerate(errors.values()):
        axis.plot(ours, [row + 0.1] * len(ours), "o", color="tab:blue", alpha=0.5)
        spread = torch.tensor(ours).std().item() if len(ours) > 1 else 0.0
        axis.errorbar(sum(ours) / len(ours), row + 0.1, xerr=spread, fmt="|", color="tab:blue",
                      markersize=14, capsize=4)  # fmt: skip
        if paper is not None:
            axis.errorbar(paper[0], row - 0.15, xerr=paper[1] or 0, fmt="D", color="tab:red",
                          capsize=4)  # fmt: skip
    axis.set_yticks(range(len(errors)), list(errors))
    axis.invert_yaxis()
    axis.set(xlabel="test error (%)", title="ours (blue: seeds, mean ± std), paper (red)")
    axis.grid(axis="x", alpha=0.3)
    return save(figure, path)


def plot_confusion(matrix: torch.Tensor, accuracy: float, class_names, path: Path) -> Path:
    """(K, K) counts on a log colour scale, each non-zero cell labelled with its count."""
    figure, axis = pyplot().subplots(figsize=(6, 5))
    image = axis.imshow(torch.log1p(matrix.float()).numpy(), cmap="Blues")
    size = len(class_names)
    for row in range(size):
        for col in range(size):
            if matrix[row, col]:
                axis.text(
                    col,
                    row,
                    str(int(matrix[row, col])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if row == col else "black",
                )
    axis.set(
        xlabel="predicted",
        ylabel="true",
        xticks=range(size),
        yticks=range(size),
        title=f"test accuracy {accuracy:.2f}%",
    )
    if list(class_names) != [str(k) for k in range(size)]:  # named classes: label the axes
        axis.set_xticklabels(class_names, rotation=45, ha="right", fontsize=7)
        axis.set_yticklabels(class_names, fontsize=7)
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return save(figure, path)


def plot_mistakes(
    split: Split, predictions: torch.Tensor, wrong: torch.Tensor, class_names, path: Path
) -> Path:
    columns = 8
    rows = -(-len(wrong) // columns)
    figure, axes = pyplot().subplots(
        rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong.tolist()):
        axis.imshow(**picture(split.images[index]))
        axis.set_title(
            f"{class_names[split.labels[index]]}→{class_names[predictions[index]]}", fontsize=8
        )
    figure.suptitle("misclassified test images (true → predicted)")
    return save(figure, path)


def save_reconstructions(model: CapsNet, split: Split, device, path: Path) -> Path:
    """Up to 16 test images beside their reconstructions from the predicted capsule, in
    colour for a colour model."""
    x = to_model_input(split.images[:16], device)  # (n, C, H, W), n <= 16
    with torch.inference_mode():
        _, reconstructions, _ = model(x)  # masked by the prediction
    figure, axes = pyplot().subplots(2, len(x), figsize=(16, 2.4), squeeze=False)
    for column in range(len(x)):
        axes[0, column].imshow(**picture(x[column]))
        axes[1, column].imshow(**picture(reconstructions[column]))
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(
        "test images (top) and their reconstructions from the predicted capsule (bottom)"
    )
    return save(figure, path)


PAIRS_A_SIDE = 8  # Figure 5's right pairs, then as many wrong ones


def save_pair_reconstructions(
    model: CapsNet, split: Split, scores: torch.Tensor, device, path: Path
) -> Path:
    """The paper's Figure 5: MultiMNIST inputs (top) and, below each, the reconstructions from
    its two longest capsules overlaid in two colours (red: the longer, green: the other),
    correctly recognised pairs on the left and failures on the right."""
    both_correct = PairScores.of(scores, split.labels).both_correct  # (N,)
    chosen = torch.cat(
        [
            torch.nonzero(both_correct)[:PAIRS_A_SIDE, 0],
            torch.nonzero(~both_correct)[:PAIRS_A_SIDE, 0],
        ]
    )
    top2 = scores[chosen].topk(2, dim=1).indices  # (n, 2) predicted digits, longer first
    x = to_model_input(split.images[chosen], device)  # (n, 1, 36, 36)
    with torch.inference_mode():
        _, drawn, _ = model(x, top2.to(device))  # (n, 2, 1, 36, 36)
    drawn = drawn[:, :, 0].float().cpu()  # (n, 2, 36, 36)
    colour = torch.stack([drawn[:, 0], drawn[:, 1], torch.zeros_like(drawn[:, 0])], -1)
    figure, axes = pyplot().subplots(
        2, max(len(chosen), 1), figsize=(1.2 * max(len(chosen), 1), 3.0), squeeze=False
    )
    for column, index in enumerate(chosen.tolist()):
        truth, guess = split.labels[index].tolist(), top2[column].tolist()
        axes[0, column].imshow(split.images[index].numpy(), cmap="gray")
        axes[0, column].set_title(f"{truth[0]}+{truth[1]}", fontsize=10)
        axes[1, column].imshow(colour[column].clamp(0, 1).numpy())
        ok = sorted(truth) == sorted(guess)
        axes[1, column].set_title(
            f"R:{guess[0]} G:{guess[1]}", fontsize=10, color="black" if ok else "crimson"
        )
    for axis in axes.flat:
        axis.axis("off")
    correct_count = int(both_correct[chosen].sum())
    figure.suptitle(
        f"MultiMNIST: input pairs (top, true digits) and the reconstructions from the two "
        f"longest capsules (bottom); {correct_count} recognised left, "
        f"{len(chosen) - correct_count} failures right",
        fontsize=10,
    )
    return save(figure, path)
