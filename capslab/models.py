"""The one registry of model kinds: each name maps to its class, its config and its loss.

Nothing else branches on a kind's name; code asks the kind (`MODEL_KINDS[name].loss`,
`.has_decoder`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capslab.baseline import BaselineCNN, BaselineConfig, PaperCNN, PaperCNNConfig
from capslab.errors import UserError, first_line
from capslab.hardware import memory_bytes
from CapsNet import CapsNet, CapsNetConfig, capsule_loss


def capsnet_loss(model, x, y, reconstruction_weight: float, originals=None) -> torch.Tensor:
    """Margin + reconstruction loss; the decoder is masked by the true label and reconstructs
    the (shifted) input, or for MultiMNIST (y (B, 2)) each digit alone, `originals`
    (B, 2, C, H, W). Weight 0 skips the decoder."""
    lengths, reconstructions, _ = model(x, y, reconstruct=reconstruction_weight > 0)
    target_images = x if originals is None else originals
    return capsule_loss(lengths, reconstructions, target_images, y, reconstruction_weight)


def cross_entropy_loss(model, x, y, reconstruction_weight: float, originals=None) -> torch.Tensor:
    """The CNN baselines: cross-entropy on their logits (they have no decoder). One label per
    image: MultiMNIST's pairs are for CapsNet (TrainConfig refuses the combination)."""
    (logits,) = model(x)  # (B, K)
    return F.cross_entropy(logits, y)


@dataclass(frozen=True)
class ModelKind:
    model_class: type
    config_class: type
    loss: Callable  # (model, x, y, reconstruction_weight, originals) -> batch-mean loss
    has_decoder: bool  # digit capsules with a decoder: reconstructions and capsule figures
    reads_pairs: bool  # its loss takes two labels an image (MultiMNIST)


MODEL_KINDS = {
    "capsnet": ModelKind(CapsNet, CapsNetConfig, capsnet_loss, has_decoder=True, reads_pairs=True),
    "cnn": ModelKind(
        BaselineCNN, BaselineConfig, cross_entropy_loss, has_decoder=False, reads_pairs=False
    ),
    "paper-cnn": ModelKind(
        PaperCNN, PaperCNNConfig, cross_entropy_loss, has_decoder=False, reads_pairs=False
    ),
}


def trains_decoder(model_kind: str, reconstruction_weight: float) -> bool:
    """Whether training learns a decoder: a kind with one, and the reconstruction loss on.
    (Weight 0 trains the margin loss alone; the decoder stays as initialised.)"""
    return MODEL_KINDS[model_kind].has_decoder and reconstruction_weight > 0


def refuse_unbuildable(model_class: type, config, copies: int, need: str, name: str) -> None:
    """Refuse a model (`name`) that cannot be built, or whose `copies` float32 copies of its
    weights (2 to load it: the file's and the model's; 4 to train it: weights, gradients and
    Adam's two moments) exceed this machine's memory, which would otherwise end in the kernel
    killing the process. Built on the meta device: no memory used, no random numbers drawn."""
    try:
        with torch.device("meta"):
            parameters = sum(parameter.numel() for parameter in model_class(config).parameters())
    except (RuntimeError, TypeError, OverflowError) as error:  # sizes torch cannot index
        raise UserError(f"{name} cannot be built ({first_line(error)})") from error
    needed, available = parameters * 4 * copies, memory_bytes()
    if available is not None and needed > available:
        raise UserError(
            f"{name} would have {parameters:,} parameters: {need} needs {needed / 2**30:,.1f} "
            f"GiB, more than this machine's {available / 2**30:,.1f} GiB of memory"
        )
