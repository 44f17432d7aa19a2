"""The CNN baselines CapsNet is compared against, trained with cross-entropy on the same data,
shifts, optimizer and epoch budget.

- `python train.py --model paper-cnn`: the paper's baseline (Sabour et al. 2017, Section 5,
  Table 1): three 5x5 conv layers of 256, 256 and 128 channels, FC 328 and 192, dropout,
  35.4M parameters. It costs about ten times CapsNet's arithmetic per image.
- `python train.py --model cnn`: the small convnet of pytorch/examples `mnist/main.py`, cheap
  enough to train on a CPU next to CapsNet.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BaselineConfig:
    in_channels: int = 1  # grayscale
    image_size: int = 28  # square input side in pixels
    num_classes: int = 10
    channels: tuple[int, int] = (32, 64)  # two 3x3 conv layers, stride 1
    hidden: int = 128  # the one hidden FC layer
    dropout: tuple[float, float] = (0.25, 0.5)  # after the pooling and after the hidden layer

    @property
    def flat_features(self) -> int:
        """64 * 12 * 12 = 9216: two unpadded 3x3 convs (28 -> 24), then 2x2 max pooling (-> 12)."""
        return self.channels[1] * ((self.image_size - 4) // 2) ** 2


class BaselineCNN(nn.Module):
    """conv 3x3 (32) -> conv 3x3 (64) -> max pool 2 -> FC 128 -> FC 10: 1,199,882 parameters.

    tests/test_beyond.py counts the parameters of the default config against that number.
    """

    def __init__(self, config: BaselineConfig | None = None):
        super().__init__()
        self.config = config or BaselineConfig()
        first, second = self.config.channels
        self.conv1 = nn.Conv2d(self.config.in_channels, first, 3)
        self.conv2 = nn.Conv2d(first, second, 3)
        self.fc1 = nn.Linear(self.config.flat_features, self.config.hidden)
        self.fc2 = nn.Linear(self.config.hidden, self.config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """x (B, C, 28, 28) in [0, 1] -> (class logits (B, K),).

        A one-element tuple, so scoring takes the class scores as `model(x)[0]` from either
        model.
        """
        out = F.relu(self.conv1(x))  # (B, 32, 26, 26)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)  # (B, 64, 12, 12)
        out = F.dropout(out.flatten(1), self.config.dropout[0], self.training)  # (B, 9216)
        out = F.dropout(F.relu(self.fc1(out)), self.config.dropout[1], self.training)  # (B, 128)
        return (self.fc2(out),)  # (B, K)


@dataclass(frozen=True)
class PaperCNNConfig:
    """The paper's baseline. It gives channels, kernels, stride and FC sizes; 'same' padding
    (which yields its 35.4M parameters), ReLU and the dropout rate are this code's choices."""

    in_channels: int = 1  # grayscale
    image_size: int = 28  # square input side in pixels; 'same' padding keeps it
    num_classes: int = 10
    channels: tuple[int, int, int] = (256, 256, 128)  # 5x5 kernels, stride 1
    kernel_size: int = 5
    hidden: tuple[int, int] = (328, 192)  # the two FC layers
    dropout: float = 0.5  # before the 10-way softmax; the paper gives no rate


class PaperCNN(nn.Module):
    """conv 5x5 (256) -> conv 5x5 (256) -> conv 5x5 (128) -> FC 328 -> FC 192 -> dropout
    -> FC 10: 35,445,522 parameters, the paper's "35.4M".

    tests/test_beyond.py counts the parameters of the default config against that number.
    """

    def __init__(self, config: PaperCNNConfig | None = None):
        super().__init__()
        self.config = config or PaperCNNConfig()
        widths = (self.config.in_channels, *self.config.channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(inputs, outputs, self.config.kernel_size, padding="same")
            for inputs, outputs in zip(widths, widths[1:])
        )
        flat = self.config.channels[-1] * self.config.image_size**2  # 128 * 28 * 28 = 100,352
        first, second = self.config.hidden
        self.fc1 = nn.Linear(flat, first)
        self.fc2 = nn.Linear(first, second)
        self.classifier = nn.Linear(second, self.config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """x (B, C, 28, 28) in [0, 1] -> (class logits (B, K),), as BaselineCNN."""
        out = x
        for conv in self.convs:
            out = F.relu(conv(out))  # (B, 256 | 256 | 128, 28, 28)
        out = F.relu(self.fc1(out.flatten(1)))  # (B, 328)
        out = F.relu(self.fc2(out))  # (B, 192)
        out = F.dropout(out, self.config.dropout, self.training)
        return (self.classifier(out),)  # (B, K)
