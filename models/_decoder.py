"""The pixelwise classifier of Oh & Kim's CLS+CNF (``models.clscnf``): a U-Net-like decoder on an extractor's stages
(their ``custom_models/wideresnet50_dec.py``, ``WideResNetDec``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adbench.errors import ConfigError
from adbench.models._resize import resize_bicubic


def _conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, padding_mode="reflect", bias=False)  # their reflect padding


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 residual block, BN after each conv (their Bottleneck with width = output channels)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                                  _conv(c_out, c_out, 3), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                                  _conv(c_out, c_out, 1), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if c_in == c_out else nn.Sequential(_conv(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Decoder(nn.Module):
    """U-Net-like pixelwise classifier (their ``WideResNetDec``, skip connections): the deepest stage through two
    1x1 convs halving its width, then per level bicubic upsampling (align_corners=True, as theirs), concatenation of
    the next shallower stage while there is one, and bottlenecks, down to stride 2 * ``out_stride``; a last x2,
    conv-BN-ReLU-conv; returns logits, bilinearly upsampled to the input when ``out_stride`` > 1 (theirs: 1, the head
    at full resolution)."""

    def __init__(self, channels: list[int], strides: list[int], width: int, blocks: tuple[int, ...],
                 out_stride: int = 1) -> None:
        super().__init__()
        if out_stride & (out_stride - 1) or not 1 <= out_stride <= strides[0] // 2:
            raise ConfigError(f"clscnf decoder_stride must be a power of two <= {strides[0] // 2}, got {out_stride}")
        steps = strides[0].bit_length() - out_stride.bit_length() - 1  # x2 levels from stride s0 to 2 * out_stride
        levels = len(channels) - 1 + steps
        if len(blocks) != levels:
            raise ConfigError(f"clscnf decoder_blocks needs {levels} entries for strides {strides} and decoder_stride "
                              f"{out_stride}, got {blocks}")
        self.out_stride = out_stride
        self.resize = resize_bicubic  # their bicubic upsampling (align_corners=True); F.interpolate computes the same
        deep = channels[-1]
        self.nin = nn.Sequential(_conv(deep, deep // 2, 1), nn.ReLU(inplace=True), _conv(deep // 2, deep // 2, 1),
                                 nn.ReLU(inplace=True))
        c, groups = deep // 2, []
        for g, n in enumerate(blocks):
            skip = channels[-2 - g] if g < len(channels) - 1 else 0
            out = max(2 * width >> g, 1)
            groups.append(nn.Sequential(Bottleneck(c + skip, out), *(Bottleneck(out, out) for _ in range(n - 1))))
            c = out
        self.groups = nn.ModuleList(groups)
        mid = max(width // 16, 4)  # theirs width / 16 = 8
        self.head = nn.Sequential(_conv(c, mid, 3), nn.BatchNorm2d(mid), nn.ReLU(inplace=True), _conv(mid, 1, 3))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # as their decoder

    def forward(self, features: list[torch.Tensor], size: int) -> torch.Tensor:
        """Logits [B, size, size] of the features (shallow to deep) of a batch."""
        x = self.nin(features[-1])
        for g, group in enumerate(self.groups):
            skip = features[-2 - g] if g < len(features) - 1 else None
            target = skip.shape[-2:] if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
            x = self.resize(x, target)
            x = group(torch.cat((skip, x), 1) if skip is not None else x)
        out = -(-size // self.out_stride)
        x = self.head(self.resize(x, (out, out)))
        if self.out_stride > 1:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x[:, 0]
