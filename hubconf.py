"""torch.hub entry point: the CapsNet of Sabour, Frosst & Hinton (2017), trained on MNIST.

model = torch.hub.load("path/to/this/repo", "capsnet", source="local", pretrained=True)
lengths, reconstructions, v = model(x)  # x (B, 1, 28, 28) in [0, 1], white digit on black
"""

import torch

from capslab.checkpoint import SHIPPED_CHECKPOINT, load_capsnet
from CapsNet import CapsNet, CapsNetConfig

dependencies = ["torch", "torchvision", "numpy"]  # what hub checks before importing this file


def capsnet(pretrained: bool = True) -> CapsNet:
    """A CapsNet in eval mode on the CPU, the paper's configuration (3 routing iterations).

    pretrained=True: the shipped weights, checkpoints/capsnet_mnist.pt. pretrained=False: an
    untrained CapsNet(CapsNetConfig()), weights freshly initialised.

    Calling it on x (B, 1, 28, 28) in [0, 1] returns the 10 digit capsules' lengths (B, 10),
    the prediction is their argmax; the decoder's reconstructions (B, 1, 28, 28) from the
    longest capsule; and the capsules v (B, 10, 16). inference.classify does this for one
    (28, 28) digit, and preprocess.preprocess turns a photo into one.
    """
    if not pretrained:
        return CapsNet(CapsNetConfig()).eval()
    model, _ = load_capsnet(SHIPPED_CHECKPOINT, torch.device("cpu"))
    return model
