"""A small CNN baseline to compare CapsNet against, trained by `python train.py --model cnn`.

This is not the paper's baseline (three 256/256/128-channel conv layers and two FC layers,
35.4M parameters, Sabour et al. 2017 Section 5). It is the small convnet of pytorch/examples
`mnist/main.py`: cheap enough to train on a CPU next to CapsNet, with the same data, shifts,
optimizer and epoch budget, and cross-entropy in place of the margin loss.
"""

from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels), "dropout": list(self.dropout)}

    @classmethod
    def from_dict(cls, values: dict) -> "BaselineConfig":
        return cls(
            **{**values, "channels": tuple(values["channels"]), "dropout": tuple(values["dropout"])}
        )


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
