"""Small test models shared by the test-suite (each built from a fixed seed).

Every factory returns a fresh model; ``INPUTS`` gives a matching input batch. Kept tiny so
tracing and surgery stay fast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(seed: int = 0) -> nn.Sequential:
    """``6 -> 10 -> 12 -> 3`` with ReLU; widenable layers ``"0"`` and ``"2"``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def cnn(seed: int = 0) -> nn.Sequential:
    """Conv/BN/ReLU/MaxPool twice, Flatten, Linear head; input ``(N, 3, 8, 8)``.

    Widenable: ``"0"``, ``"4"`` (feeds the Flatten: 4 columns per channel), ``"9"``.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 4),
    )  # fmt: skip


class Block(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``: conv2 is coupled with ``x``'s producer."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    """Stem conv -> two residual blocks -> global pool -> MLP head; input ``(N, 3, 6, 6)``.

    ``stem``, ``block1.conv2`` and ``block2.conv2`` share one (coupled) channel space.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block1 = Block(4, 5)
        self.block2 = Block(4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc2(torch.relu(self.fc1(self.flat(self.pool(x)))))


def resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet()


RESNET_COUPLED = ["stem", "block1.conv2", "block2.conv2"]


class CustomMLP(nn.Module):
    """A non-Sequential module with ``self.fc1``, ``self.act = nn.ReLU()``, ``self.fc2``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def custom_mlp(seed: int = 0) -> CustomMLP:
    torch.manual_seed(seed)
    return CustomMLP()


class FunctionalCNN(nn.Module):
    """Functional style: ``torch.relu``, ``F.max_pool2d``, ``x.view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def functional_cnn(seed: int = 0) -> FunctionalCNN:
    torch.manual_seed(seed)
    return FunctionalCNN()


class Variants(nn.Module):
    """Less common layouts; input ``(N, 3, 8, 8)``.

    ``bias=False``, ``BatchNorm2d(affine=False)``, ``BatchNorm2d(track_running_stats=False)``,
    stride + dilation, ``torch.flatten`` after ``F.adaptive_avg_pool2d`` (4 columns per
    channel) *and* ``x.mean((2, 3))`` reading the same channels, two Linear layers coupled
    by an add, ``BatchNorm1d``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(5, track_running_stats=False)
        self.fc_a = nn.Linear(5 * 4, 6, bias=False)
        self.fc_b = nn.Linear(5, 6)
        self.bn3 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        a = torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
        h = self.fc_a(a) + self.fc_b(x.mean((2, 3)))
        return self.head(torch.relu(self.bn3(h)))


def variants(seed: int = 0) -> Variants:
    torch.manual_seed(seed)
    return Variants()


class FoldedSequence(nn.Module):
    """``fc1`` runs on ``(N, 3, 4)``; ``flatten(1)`` folds the sequence axis into features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(15, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x).flatten(1))


def layernorm_mlp(seed: int = 0) -> nn.Sequential:
    """``Linear(6, 8) -> LayerNorm(8) -> ReLU -> Linear(8, 3)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


class CatModel(nn.Module):
    """``fc1``'s output reaches ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(4, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.fc1(x), self.fc2(x)], dim=1))


class DataDependent(nn.Module):
    """Control flow on tensor values: not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.fc2(self.fc1(x))


class Twice(nn.Module):
    """``fc`` is called twice in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc(torch.relu(self.fc(x))))


def conv_k(kernel: int, seed: int = 0) -> nn.Sequential:
    """Conv(kernel) -> BN -> ReLU -> 1x1 conv head; input ``(N, 3, 6, 6)``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel, padding=kernel // 2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 1),
    )  # fmt: skip


def add_mask(layer: nn.Module, density: float = 0.5, seed: int = 0) -> Tensor:
    """Give ``layer`` a ``weight_mask`` bool buffer (by hand) and zero the masked weights."""
    assert isinstance(layer, nn.Linear | nn.Conv2d)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(layer.weight.shape, generator=g) < density
    layer.register_buffer("weight_mask", mask)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return mask


def batch(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    """A fixed input batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


#: name -> (factory, input shape, widenable layer names)
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    "mlp": (mlp, (5, 6), ["0", "2"]),
    "cnn": (cnn, (4, 3, 8, 8), ["0", "4", "9"]),
    "resnet": (
        resnet,
        (4, 3, 6, 6),
        ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc1"],
    ),
    "custom": (custom_mlp, (5, 5), ["fc1"]),
    "functional": (functional_cnn, (3, 3, 8, 8), ["conv", "fc1"]),
    "variants": (variants, (4, 3, 8, 8), ["conv1", "conv2", "fc_a", "fc_b"]),
}


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Custom(nn.Module):
    """``head(relu(stem(x)) + block(relu(stem(x))))``: ``stem`` and ``block.fc2`` coupled by a
    residual add (built from seed 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.block = Inner()
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.stem(x))
        return self.head(h + self.block(h))
