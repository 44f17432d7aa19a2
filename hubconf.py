"""torch.hub entry points: the CapsNet of Sabour, Frosst & Hinton (2017), trained on MNIST, and
the same architecture trained on MultiMNIST's overlapping pairs.

model = torch.hub.load("path/to/this/repo", "capsnet", source="local", pretrained=True)
lengths, reconstructions, v = model(x)  # x (B, 1, 28, 28) in [0, 1], white digit on black
model = torch.hub.load("path/to/this/repo", "capsnet_multimnist", source="local")
lengths, reconstructions, v = model(x)  # x (B, 1, 36, 36): the pair is lengths.topk(2)
model = torch.hub.load("path/to/this/repo", "capsnet", source="local", checkpoint="my.pt")
model.class_names  # ["0", ..., "9"], or the sub-folders of the folder a model was trained on
"""

from pathlib import Path

import torch

from capslab.checkpoint import SHIPPED_CHECKPOINT, SHIPPED_MULTIMNIST, class_names, load_capsnet
from capslab.data import CLASS_NAMES, IMAGE_SIZE
from CapsNet import CapsNet, CapsNetConfig

dependencies = ["torch", "torchvision", "numpy"]  # what hub checks before importing this file


def capsnet(pretrained: bool = True, checkpoint: str | Path | None = None) -> CapsNet:
    """A CapsNet in eval mode on the CPU, the paper's configuration (3 routing iterations).

    pretrained=True: the shipped weights, checkpoints/capsnet_mnist.pt, or those of
    `checkpoint` (a file train.py or export.py wrote). pretrained=False: an untrained
    CapsNet(CapsNetConfig()), weights freshly initialised.

    Calling it on x (B, 1, 28, 28) in [0, 1] returns the 10 digit capsules' lengths (B, 10),
    the prediction is their argmax; the decoder's reconstructions (B, 1, 28, 28) from the
    longest capsule; and the capsules v (B, 10, 16). inference.classify does this for one
    (28, 28) digit, and preprocess.preprocess turns a photo into one.

    A model trained on a folder of images (train.py --dataset folder, then export.py) takes
    x (B, C, N, N) in [0, 1], its own channels and side (model.config.in_channels,
    .image_size), as imagefolder.read_image reads a file; model.class_names names its outputs.
    """
    if not pretrained:
        model = CapsNet(CapsNetConfig()).eval()
        model.class_names = CLASS_NAMES["mnist"]
        return model
    model, saved = load_capsnet(checkpoint or SHIPPED_CHECKPOINT, torch.device("cpu"))
    model.class_names = class_names(saved)
    return model


def capsnet_multimnist(pretrained: bool = True, checkpoint: str | Path | None = None) -> CapsNet:
    """The CapsNet trained on MultiMNIST (36x36 inputs, 3,200 primary capsules), in eval mode
    on the CPU: checkpoints/capsnet_multimnist.pt, or `checkpoint`.

    Called on x (B, 1, 36, 36) in [0, 1], white digits on black, it returns the same triple as
    `capsnet`: lengths (B, 10), whose two largest are the two digits; reconstructions from the
    longest capsule; and v (B, 10, 16). model(x, target) with target (B, 2) draws each digit
    from its own capsule: reconstructions (B, 2, 1, 36, 36).
    """
    if not pretrained:
        return CapsNet(CapsNetConfig(image_size=IMAGE_SIZE["multimnist"])).eval()
    model, _ = load_capsnet(checkpoint or SHIPPED_MULTIMNIST, torch.device("cpu"))
    return model
