"""The edge-popup paper's models, built from Subnet layers (or dense ones for the baselines).

* ``fc``: the LeNet-300-100 style MLP of the MNIST experiments (``hidden=(300, 100)``);
* ``conv2`` / ``conv4`` / ``conv6`` / ``conv8``: Frankle & Carbin's VGG-like CIFAR networks
  (pairs of 3x3 convs 64-64, 128-128, 256-256, 512-512 with 2x2 max-pooling, then a 256-256-classes
  head);
* ``cresnet18`` / ``cresnet50``: CIFAR-size ResNets (3x3 stem, no max-pool);
* ``resnet18`` / ``resnet50``: ImageNet-size ResNets (7x7 stride-2 stem, max-pool).

As in the official code, every conv and linear layer has no bias, the first and last layers are
masked too (``first_layer_dense`` / ``last_layer_dense`` keep them dense), and BatchNorm is
non-affine for subnetworks. The official code writes the fully connected heads as 1x1 convs on
1x1 feature maps; here they are ``Linear`` layers, the same computation. The input shape is a
parameter (the official models hard-code 28x28 or 32x32) so the same models run on 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...nn.batchnorm import NonAffineBatchNorm2d
from ...nn.init import init_weight_
from ...nn.subnet import SubnetConv2d, SubnetLinear


@dataclass
class Builder:
    """Makes the layers of a model: Subnet (``subnet=True``) or dense, with the chosen init.

    ``bn``: ``"nonaffine"`` (edge-popup), ``"affine"`` (a learned BatchNorm, for dense baselines)
    or ``"auto"`` (non-affine for subnetworks, affine for dense). ``init=None`` leaves torch's
    default init of the layer.
    """

    subnet: bool = True
    k: float = 0.5
    init: str | None = "signed_constant"
    scale_fan: bool = False
    bn: str = "auto"
    first_layer_dense: bool = False
    last_layer_dense: bool = False

    def _masked(self, first: bool, last: bool) -> bool:
        return self.subnet and not (first and self.first_layer_dense) \
            and not (last and self.last_layer_dense)

    def conv(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
             first: bool = False, last: bool = False) -> nn.Module:
        padding = kernel // 2
        if self._masked(first, last):
            return SubnetConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                                bias=False, k=self.k, init=self.init, scale_fan=self.scale_fan)
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        if self.init is not None:
            init_weight_(conv.weight, self.init, self.k, self.scale_fan and self.subnet)
        return conv

    def linear(self, in_features: int, out_features: int, first: bool = False,
               last: bool = False) -> nn.Module:
        if self._masked(first, last):
            return SubnetLinear(in_features, out_features, bias=False, k=self.k, init=self.init,
                                scale_fan=self.scale_fan)
        linear = nn.Linear(in_features, out_features, bias=False)
        if self.init is not None:
            init_weight_(linear.weight, self.init, self.k, self.scale_fan and self.subnet)
        return linear

    def batchnorm(self, planes: int) -> nn.Module:
        affine = self.bn == "affine" or (self.bn == "auto" and not self.subnet)
        return nn.BatchNorm2d(planes) if affine else NonAffineBatchNorm2d(planes)


def _head(builder: Builder, in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(builder.linear(in_features, 256), nn.ReLU(),
                         builder.linear(256, 256), nn.ReLU(),
                         builder.linear(256, num_classes, last=True))


class FC(nn.Module):
    """Flatten, then Linear + ReLU per hidden width (300, 100), then Linear(., classes)."""

    def __init__(self, builder: Builder, in_shape: tuple[int, int, int], num_classes: int = 10,
                 hidden: tuple[int, ...] = (300, 100)) -> None:
        super().__init__()
        features = in_shape[0] * in_shape[1] * in_shape[2]
        layers: list[nn.Module] = []
        for i, width in enumerate(hidden):
            layers += [builder.linear(features, width, first=i == 0), nn.ReLU()]
            features = width
        layers.append(builder.linear(features, num_classes, first=not hidden, last=True))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class ConvNet(nn.Module):
    """Conv2/4/6/8: ``depth/2`` stages of two 3x3 convs + ReLU and a 2x2 max-pool, then the
    256-256-classes head."""

    WIDTHS = (64, 128, 256, 512)

    def __init__(self, builder: Builder, depth: int, in_shape: tuple[int, int, int],
                 num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        if depth not in (2, 4, 6, 8):
            raise ValueError(f"ConvNet depth must be 2, 4, 6 or 8, got {depth}")
        channels, height, width = in_shape
        stages = depth // 2
        if height >> stages == 0 or width >> stages == 0:
            raise ValueError(f"conv{depth} pools {stages} times: input {height}x{width} too small")
        layers: list[nn.Module] = []
        for stage in range(stages):
            out = int(self.WIDTHS[stage] * width_mult)
            layers += [builder.conv(channels, out, 3, first=stage == 0), nn.ReLU(),
                       builder.conv(out, out, 3), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.convs = nn.Sequential(*layers)
        flat = channels * (height >> stages) * (width >> stages)
        self.linear = _head(builder, flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, builder: Builder, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = builder.conv(in_planes, planes, 3, stride=stride)
        self.bn1 = builder.batchnorm(planes)
        self.conv2 = builder.conv(planes, planes, 3)
        self.bn2 = builder.batchnorm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(builder, in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, builder: Builder, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = builder.conv(in_planes, planes, 1)
        self.bn1 = builder.batchnorm(planes)
        self.conv2 = builder.conv(planes, planes, 3, stride=stride)
        self.bn2 = builder.batchnorm(planes)
        self.conv3 = builder.conv(planes, planes * self.expansion, 1)
        self.bn3 = builder.batchnorm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(builder, in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(builder: Builder, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(builder.conv(in_planes, out_planes, 1, stride=stride),
                         builder.batchnorm(out_planes))


class ResNet(nn.Module):
    """ResNet with the official edge-popup layout. ``imagenet_stem``: 7x7 stride-2 conv and a
    3x3 stride-2 max-pool (ImageNet); otherwise a 3x3 stride-1 conv (CIFAR, official
    ``cResNet``)."""

    def __init__(self, builder: Builder, block: type[BasicBlock] | type[Bottleneck],
                 num_blocks: tuple[int, int, int, int], in_shape: tuple[int, int, int],
                 num_classes: int, imagenet_stem: bool, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        if imagenet_stem:
            self.conv1 = builder.conv(in_shape[0], width, 7, stride=2, first=True)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = builder.conv(in_shape[0], width, 3, first=True)
            self.maxpool = nn.Identity()
        self.bn1 = builder.batchnorm(width)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        for i, blocks in enumerate(num_blocks):
            planes = width * 2**i
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(block(builder, self.in_planes, planes, stride))
                self.in_planes = planes * block.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = builder.linear(self.in_planes, num_classes, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


ModelFactory = Callable[[Builder, tuple[int, int, int], int, float], nn.Module]


def _fc(b: Builder, s: tuple[int, int, int], n: int, w: float) -> nn.Module:
    return FC(b, s, n, hidden=(int(300 * w), int(100 * w)))


def _resnet(block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
            imagenet: bool) -> ModelFactory:
    return lambda b, s, n, w: ResNet(b, block, blocks, s, n, imagenet_stem=imagenet,
                                     width=int(64 * w))


MODELS: dict[str, ModelFactory] = {
    "fc": _fc,
    "conv2": lambda b, s, n, w: ConvNet(b, 2, s, n, width_mult=w),
    "conv4": lambda b, s, n, w: ConvNet(b, 4, s, n, width_mult=w),
    "conv6": lambda b, s, n, w: ConvNet(b, 6, s, n, width_mult=w),
    "conv8": lambda b, s, n, w: ConvNet(b, 8, s, n, width_mult=w),
    "cresnet18": _resnet(BasicBlock, (2, 2, 2, 2), imagenet=False),
    "cresnet50": _resnet(Bottleneck, (3, 4, 6, 3), imagenet=False),
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2), imagenet=True),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3), imagenet=True),
}


def build_model(name: str, builder: Builder, in_shape: tuple[int, int, int],
                num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """Model ``name`` (``MODELS``) for inputs ``in_shape`` (C, H, W) and ``num_classes``.

    ``width_mult`` scales every layer's width (the official ``--width-mult`` of Conv4Wide /
    Conv6Wide; the paper's widths at 1.0). The fc head of the ConvNets stays 256 wide.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}") from None
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return factory(builder, tuple(in_shape), num_classes, width_mult)
