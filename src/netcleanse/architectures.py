"""Registry of known network architectures, written as PyTorch modules.

A registered architecture lets a weights-only file (Keras ``.h5`` or a PyTorch ``state_dict``)
be turned into a working model. Submodule names follow the Keras layer names of the original
files, so weights map one-to-one in both directions (loading and exporting).

Every architecture returns **logits**; the softmax of the original Keras output layer is
applied by :meth:`netcleanse.model.Classifier.predict_proba`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .errors import NetcleanseError


def flatten_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Flatten NCHW activations in Keras order (H, W, C), so Keras Dense weights apply as-is."""
    return x.permute(0, 2, 3, 1).flatten(1)


class CSAWDeepID(nn.Module):
    """The CSAW-HackML-2020 DeepID-style face classifier (input 3x55x47).

    conv_1 20@4x4 -> pool -> conv_2 40@3x3 -> pool -> conv_3 60@3x3 -> pool_3;
    fc_1 on flatten(pool_3) and fc_2 on flatten(conv_4(pool_3)); relu(fc_1 + fc_2) -> output.
    """

    input_shape = (3, 55, 47)
    # The last convolutional feature map whose channels fine-pruning ranks (as in the CSAW lab).
    prune_layer = "conv_3"

    def __init__(self, num_classes: int = 1283):
        super().__init__()
        self.conv_1 = nn.Conv2d(3, 20, 4)
        self.conv_2 = nn.Conv2d(20, 40, 3)
        self.conv_3 = nn.Conv2d(40, 60, 3)
        self.conv_4 = nn.Conv2d(60, 80, 2)
        self.fc_1 = nn.Linear(60 * 5 * 4, 160)
        self.fc_2 = nn.Linear(80 * 4 * 3, 160)
        self.output = nn.Linear(160, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv_1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv_2(x)), 2)
        pool_3 = F.max_pool2d(F.relu(self.conv_3(x)), 2)
        fc_1 = self.fc_1(flatten_channels_last(pool_3))
        fc_2 = self.fc_2(flatten_channels_last(F.relu(self.conv_4(pool_3))))
        return self.output(F.relu(fc_1 + fc_2))


class SmallCNN(nn.Module):
    """A small CNN for 1x28x28 digits (MNIST-like), used by the BadNet lab and the demo."""

    input_shape = (1, 28, 28)
    prune_layer = "conv_2"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv_1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv_2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc_1 = nn.Linear(32 * 7 * 7, 128)
        self.output = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv_1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv_2(x)), 2)
        return self.output(F.relu(self.fc_1(flatten_channels_last(x))))


class GTSRBCNN(nn.Module):
    """Neural Cleanse's traffic-sign (GTSRB) classifier (input 3x32x32, 43 classes).

    Three pairs of 3x3 convolutions (32-32, 64-64, 128-128 channels, ``same`` padding, ReLU), each
    pair followed by 2x2 max-pooling and dropout 0.2; then dense 512 (ReLU), dropout 0.5 and the
    output layer, as in Wang et al. (IEEE S&P 2019), Table VI. Dropout acts in training only.
    """

    input_shape = (3, 32, 32)
    prune_layer = "conv_6"

    def __init__(self, num_classes: int = 43):
        super().__init__()
        self.conv_1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv_3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv_4 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv_5 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv_6 = nn.Conv2d(128, 128, 3, padding=1)
        self.fc_1 = nn.Linear(128 * 4 * 4, 512)
        self.output = nn.Linear(512, num_classes)
        # He initialisation: with PyTorch's default (variance 1/(3 fan_in)) the signal shrinks ~6x per
        # layer through seven ReLU layers and the net did not start learning in 12 epochs
        for layer in (self.conv_1, self.conv_2, self.conv_3, self.conv_4, self.conv_5, self.conv_6, self.fc_1):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a, b in ((self.conv_1, self.conv_2), (self.conv_3, self.conv_4), (self.conv_5, self.conv_6)):
            x = F.dropout(F.max_pool2d(F.relu(b(F.relu(a(x)))), 2), 0.2, self.training)
        x = F.dropout(F.relu(self.fc_1(flatten_channels_last(x))), 0.5, self.training)
        return self.output(x)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int], nn.Module]
    input_shape: tuple[int, int, int]
    default_classes: int
    description: str


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, build: Callable[[int], nn.Module], input_shape, default_classes: int,
                          description: str) -> None:
    ARCHITECTURES[name] = Architecture(name, build, tuple(input_shape), default_classes, description)


register_architecture("csaw-deepid", CSAWDeepID, CSAWDeepID.input_shape, 1283,
                      "CSAW-HackML-2020 DeepID face net, 3x55x47, pixels/255")
register_architecture("mnist-cnn", SmallCNN, SmallCNN.input_shape, 10,
                      "small 2-conv CNN for 1x28x28 digits")
register_architecture("gtsrb-cnn", GTSRBCNN, GTSRBCNN.input_shape, 43,
                      "Neural Cleanse's 6-conv traffic-sign net (32-32-64-64-128-128, dense 512), 3x32x32")


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise NetcleanseError(f"unknown architecture {name!r}; known: {known} (your own module: "
                              "--arch FILE.py:CLASS)") from None


def build_architecture(name: str, num_classes: int | None = None) -> nn.Module:
    arch = get_architecture(name)
    return arch.build(num_classes or arch.default_classes)
