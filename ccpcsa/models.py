"""Model registry: architectures, where BAM goes in each, and how layers map to stages.

Beyond the registry's names, `torchvision:NAME` builds any torchvision classification model
and `package.module:callable` a user's own (callable(num_classes) -> nn.Module); their BAM
placement and stages are traced (ccpcsa.layout).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from ccpcsa.attention import insert_bam
from ccpcsa.layout import resolve_module, trace_layout


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
    classifier_path: str | None = None  # traced models: the last Conv2d / Linear that ran

    def classifier(self, model: nn.Module) -> nn.Module:
        """The layer whose outputs are the classes (never pruned): the registry's last Linear,
        or the last Conv2d / Linear run by a traced model (SqueezeNet's is a Conv2d)."""
        if self.classifier_path is not None:
            return resolve_module(model, self.classifier_path)
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

TORCHVISION = "torchvision:"
# torchvision builders' options that make a plain classifier: no auxiliary heads (their
# training-mode tuple outputs would not train), and the weight init without a warning
_TORCHVISION_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_names() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video...)."""
    return torchvision.models.list_models(module=torchvision.models)


def is_registered(name: str) -> bool:
    return name in MODELS


def model_builder(name: str) -> Callable[[int], nn.Module]:
    """num_classes -> a fresh nn.Module, for a registry name, `torchvision:NAME` or
    `package.module:callable`; a bad name raises ModelError saying what is accepted."""
    if name in MODELS:
        return MODELS[name].build
    if name.startswith(TORCHVISION):
        arch = name[len(TORCHVISION):]
        if arch not in torchvision_names():
            raise ModelError(f"{arch!r} is not a torchvision classification model; see "
                             f"torchvision.models.list_models(module=torchvision.models)")
        options = _TORCHVISION_OPTIONS.get(arch, {})
        return lambda num_classes: torchvision.models.get_model(
            arch, weights=None, num_classes=num_classes, **options)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or "
                         f"torchvision:NAME (e.g. torchvision:resnet34), or MODULE:CALLABLE "
                         f"(your own: a callable taking num_classes, returning an nn.Module)")
    return _user_factory(name, module_name, attr)


def _user_factory(name: str, module_name: str, attr: str) -> Callable[[int], nn.Module]:
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # ImportError or anything the user's module raises on import
        raise ModelError(f"cannot import {module_name!r} for --model {name}: "
                         f"{type(exc).__name__}: {exc}; it must be importable on every node "
                         f"(PYTHONPATH or the Ray runtime env's working_dir)") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"module {module_name!r} has no {attr!r} (--model {name})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"{name} is not callable: --model MODULE:CALLABLE takes a function "
                         f"(num_classes) -> nn.Module")

    def build(num_classes: int) -> nn.Module:
        try:
            model = target(num_classes)
        except Exception as exc:
            raise ModelError(f"{name}({num_classes}) failed: {type(exc).__name__}: {exc}"
                             ) from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"{name}({num_classes}) returned {type(model).__name__}, "
                             f"not an nn.Module")
        return model

    return build


def check_model_name(name: str) -> None:
    """Raise ModelError unless `name` can be built (imports a user's module; builds nothing)."""
    model_builder(name)


def get_spec(name: str, input_shape: tuple[int, ...] | None = None) -> ModelSpec:
    """The registry's spec, or one traced from the model on `input_shape` (C, H, W), which
    every model outside the registry needs: BAM placement depends on the resolutions."""
    if name in MODELS:
        return MODELS[name]
    model_builder(name)
    if input_shape is None:
        raise ModelError(f"model {name} is placed by tracing: give its input shape")
    return _traced_spec(name, tuple(input_shape))


@functools.lru_cache(maxsize=64)
def _traced_spec(name: str, input_shape: tuple[int, ...]) -> ModelSpec:
    build = model_builder(name)
    # the number of classes changes only the classifier's width, not the layout
    layout = trace_layout(build(TRACE_CLASSES), input_shape, name)
    if not layout.placements:
        raise ModelError(f"found no place for BAM in {name} on a {_size(input_shape)} input: "
                         f"no block ends before its feature map shrinks (ccpcsa needs a CNN "
                         f"whose main path downsamples; stages seen: {', '.join(layout.stages)})")
    model = insert_bam(build(TRACE_CLASSES), layout.placements).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ModelError(f"{name} does not run with BAM after {', '.join(layout.placements)} "
                         f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
    return ModelSpec(name, build, layout.placements, input_shape[-1], layout.stage_of,
                     layout.stages, layout.classifier)


TRACE_CLASSES = 10


def _size(input_shape: tuple[int, ...]) -> str:
    return "x".join(map(str, input_shape))


def build_model(name: str, num_classes: int, with_bam: bool = False, *,
                input_shape: tuple[int, ...] | None = None,
                placements: dict[str, int] | None = None) -> nn.Module:
    """A fresh model; with BAM where `placements` says, else where its spec puts it (traced
    on `input_shape` for a model outside the registry)."""
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    model = model_builder(name)(num_classes)
    # how to rebuild it elsewhere (Ray workers, checkpoints)
    model.ccpcsa_model = name
    model.ccpcsa_num_classes = num_classes
    if with_bam:
        if placements is None:
            placements = get_spec(name, input_shape).bam_placements
        insert_bam(model, placements)
    return model
