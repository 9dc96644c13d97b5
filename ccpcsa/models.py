"""Model registry: architectures, where BAM goes in each, and how layers map to stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from ccpcsa.attention import insert_bam


class ModelError(ValueError):
    pass


class BasicBlock(nn.Module):
    """CIFAR ResNet block. Projection (1x1 conv + BN) shortcuts, so every width is prunable."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2): widths 16/32/64."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_stage(name: str) -> str:
    head = name.split(".")[0]
    return head if head.startswith("layer") else "stem"


_VGG_POOLS = (6, 13, 23, 33, 43)  # indices of MaxPool2d in vgg16_bn.features


def _vgg_stage(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "features":
        return "classifier"
    index = int(parts[1])
    return f"block{sum(index > p for p in _VGG_POOLS) + 1}"


_MBV2_STAGE_STARTS = (0, 2, 4, 7, 14, 18)  # features index where each resolution stage begins


def _mobilenet_stage(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "features":
        return "classifier"
    index = int(parts[1])
    return f"stage{sum(index >= s for s in _MBV2_STAGE_STARTS) - 1}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int], nn.Module]
    bam_placements: dict[str, int]  # dotted path of the stage to wrap -> its output channels
    input_size: int  # the size it was designed for; the data decides the actual size
    stage_of: Callable[[str], str]  # module name -> stage name, for per-stage ratio caps
    stages: tuple[str, ...]

    def classifier(self, model: nn.Module) -> nn.Module:
        """The last Linear: its output width is the number of classes, never pruned."""
        return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _tv(builder: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    return lambda num_classes: builder(weights=None, num_classes=num_classes)


_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(
        "resnet20", lambda n: CifarResNet(20, n), {"layer1": 16, "layer2": 32}, 32,
        _resnet_stage, _RESNET_STAGES[:4],
    ),
    "resnet56": ModelSpec(
        "resnet56", lambda n: CifarResNet(56, n), {"layer1": 16, "layer2": 32}, 32,
        _resnet_stage, _RESNET_STAGES[:4],
    ),
    "resnet18": ModelSpec(
        "resnet18", _tv(torchvision.models.resnet18),
        {"layer1": 64, "layer2": 128, "layer3": 256}, 224, _resnet_stage, _RESNET_STAGES,
    ),
    "resnet50": ModelSpec(
        "resnet50", _tv(torchvision.models.resnet50),
        {"layer1": 256, "layer2": 512, "layer3": 1024}, 224, _resnet_stage, _RESNET_STAGES,
    ),
    "resnet101": ModelSpec(
        "resnet101", _tv(torchvision.models.resnet101),
        {"layer1": 256, "layer2": 512, "layer3": 1024}, 224, _resnet_stage, _RESNET_STAGES,
    ),
    # VGG: BAM on the last ReLU before each of the first four max-pools.
    "vgg16_bn": ModelSpec(
        "vgg16_bn", _tv(torchvision.models.vgg16_bn),
        {"features.5": 64, "features.12": 128, "features.22": 256, "features.32": 512}, 224,
        _vgg_stage, ("block1", "block2", "block3", "block4", "block5"),
    ),
    # MobileNetV2: BAM on the output of the block before each stride-2 block.
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2", _tv(torchvision.models.mobilenet_v2),
        {"features.1": 16, "features.3": 24, "features.6": 32, "features.13": 96}, 224,
        _mobilenet_stage, tuple(f"stage{i}" for i in range(6)),
    ),
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int, with_bam: bool = False) -> nn.Module:
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    spec = get_spec(name)
    model = spec.build(num_classes)
    model.ccpcsa_model = name  # lets the model be rebuilt elsewhere (Ray workers, checkpoints)
    if with_bam:
        insert_bam(model, spec.bam_placements)
    return model
