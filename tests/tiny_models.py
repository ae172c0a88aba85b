"""Small models for fast tests (also a ``file.py:factory`` the CLI can load)."""

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """conv-bn-relu-maxpool, one residual block, a strided conv, pooling and a classifier."""

    def __init__(self, num_classes: int = 10, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.block = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.down(self.block(self.stem(x)))), 1))


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    return TinyResNet(num_classes)


def mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.BatchNorm1d(64), nn.LeakyReLU(),
                         nn.Linear(64, 32), nn.BatchNorm1d(32), nn.LeakyReLU(), nn.Linear(32, num_classes))


def not_a_model():
    return "oops"


def fails(num_classes: int = 10) -> nn.Module:
    raise RuntimeError("this factory fails on purpose")


def local_class(num_classes: int = 10) -> nn.Module:
    class Local(nn.Sequential):  # made inside the function: no pickle can name it
        pass
    return Local(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def mnist_mlp(num_classes: int = 10) -> nn.Module:
    """The classic 784-512-256-10 MLP with BatchNorm1d and LeakyReLU (on 1x28x28 inputs)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.1),
                         nn.Linear(512, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.1), nn.Linear(256, num_classes))


class Branches(nn.Module):
    """Two branches concatenated on channels, then a conv over the concatenation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(32, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU())
        self.merge = nn.Sequential(nn.Conv2d(64, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.merge(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc(x.mean(dim=(2, 3)))


class GroupedDepthwise(nn.Module):
    """A grouped conv (4 groups), a depthwise conv and a pointwise conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 48, 1)
        self.gn = nn.GroupNorm(4, 48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.grouped(x)))
        x = F.relu(self.gn(self.pointwise(F.relu(self.depthwise(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Functional(nn.Module):
    """Pooling, activations, padding and the residual all written as functional calls."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(16, 32, 3, bias=False)
        self.fc1 = nn.Linear(32, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.gelu(x + self.conv2(x))
        x = F.silu(self.conv3(F.pad(x, (1, 1, 1, 1))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.leaky_relu(self.fc1(x)))


def small_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer, two layers of 4 heads, on 32x32 inputs."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                             mlp_dim=128, num_classes=num_classes)
