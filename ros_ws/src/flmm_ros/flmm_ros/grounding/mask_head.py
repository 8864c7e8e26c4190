"""F-LMM's mask head: a U-Net that turns word-to-image attention maps into coarse mask logits.

A plain-PyTorch re-implementation of F-LMM's `UNetHead` (`flmm/models/mask_head/mask_decoder.py`),
which subclasses mmseg 1.x `UNet` (`mmseg/models/backbones/unet.py`) with F-LMM's config:
base_channels=64, num_stages=4, strides 1, two convs per block, MaxPool downsampling, dilation 1,
GroupNorm(num_groups=1), ReLU, `InterpConv` upsampling (bilinear x2 then a 1x1 conv), plus
`conv_seg` = Conv2d(64, 1, 1).

Module names follow mmseg/mmcv exactly, so F-LMM's released `mask_head.*` weights load as they are:
mmcv's `ConvModule` holds `conv` (no bias, because a norm follows), `gn` and a parameter-free ReLU;
encoder stage i > 0 is `Sequential(MaxPool2d, BasicConvBlock)`, so its convs live at
`encoder.{i}.1.convs.*`; decoder block i is `UpConvBlock` with `conv_block.convs.*` and
`upsample.interp_upsample.{0: Upsample, 1: ConvModule}`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .types import GroundingError

# Attention probabilities are in [0, 1]; allow for rounding in low-precision means.
_RANGE_TOLERANCE = 1e-3


class ConvModule(nn.Module):
    """conv -> GroupNorm(1) -> ReLU, named like mmcv's ConvModule (`conv`, `gn`, `activate`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups=1, num_channels=out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


class BasicConvBlock(nn.Module):
    """Two 3x3 ConvModules (mmseg `BasicConvBlock` with stride 1, dilation 1)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2):
        super().__init__()
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else out_channels, out_channels, 3)
                                     for i in range(num_convs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Upsample2x(nn.Module):
    """Bilinear x2 (align_corners=False), computed in fp32 like F-LMM's patched mmseg `Upsample`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [2 * s for s in x.shape[-2:]]
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


class InterpConv(nn.Module):
    """mmseg `InterpConv` with conv_first=False: upsample, then a 1x1 ConvModule."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.interp_upsample = nn.Sequential(Upsample2x(), ConvModule(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interp_upsample(x)


class UpConvBlock(nn.Module):
    """mmseg `UpConvBlock`: upsample the deeper map, concatenate [skip, up], two 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv_block = BasicConvBlock(2 * skip_channels, out_channels)
        self.upsample = InterpConv(in_channels, skip_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


class UNetHead(nn.Module):
    """Attention maps (N, C, h, w) in [0, 1] -> coarse mask logits (N, 1, H, W).

    Forward (F-LMM `UNetHead.forward`): each map is divided by its spatial sum; maps smaller than
    `upsample_input` are bilinearly upsampled so the long side is `upsample_input`; the result is
    zero-padded (bottom/right) to a multiple of 2**(num_stages-1), run through the U-Net, cropped back
    and projected to one logit by `conv_seg`.
    """

    def __init__(self, in_channels: int, base_channels: int = 64, num_stages: int = 4,
                 upsample_input: int | None = 64, normalize_input: bool = True):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or num_stages < 2:
            raise ValueError(f"bad U-Net size: in_channels={in_channels}, base_channels={base_channels}, "
                             f"num_stages={num_stages}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.upsample_input = upsample_input
        self.normalize_input = normalize_input

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        stage_in = in_channels
        for i in range(num_stages):
            width = base_channels * 2 ** i
            stage = [BasicConvBlock(stage_in, width)]
            if i > 0:
                stage.insert(0, nn.MaxPool2d(kernel_size=2))
                self.decoder.append(UpConvBlock(in_channels=width, skip_channels=width // 2,
                                                out_channels=width // 2))
            self.encoder.append(nn.Sequential(*stage))
            stage_in = width
        self.conv_seg = nn.Conv2d(base_channels, 1, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmseg UNet's default init: Kaiming-normal (fan_out, ReLU) convs with zero bias, GN weight 1."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_seg.weight.dtype

    def _check_input(self, maps: torch.Tensor) -> None:
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise GroundingError(f"mask head expects attention maps shaped (N, C, h, w), got {shape}")
        n, c, h, w = maps.shape
        if c != self.in_channels:
            raise GroundingError(f"mask head was built for {self.in_channels} attention channels "
                                 f"(LMM layers x heads) but got {c}: wrong checkpoint for this LMM?")
        if n == 0 or h == 0 or w == 0:
            raise GroundingError(f"mask head got empty attention maps {tuple(maps.shape)}")
        if self.normalize_input:
            lo, hi = torch.stack(torch.aminmax(maps.detach())).tolist()   # one device round trip, not two
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise GroundingError("attention maps contain NaN or infinite values")
            if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise GroundingError(f"attention maps must be probabilities in [0, 1], got [{lo:.4g}, {hi:.4g}]")

    def prepare_input(self, maps: torch.Tensor) -> torch.Tensor:
        """Normalise each map to sum 1 and upsample to `upsample_input` (in fp32), in the head's dtype."""
        self._check_input(maps)
        x = maps.float()
        if self.normalize_input:
            x = x / x.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        if self.upsample_input is not None:
            scale = max(1.0, self.upsample_input / max(x.shape[-2:]))
            if scale > 1.0:  # F-LMM's call with scale 1 is an identity
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return x.to(self.dtype)

    def unet(self, x: torch.Tensor) -> torch.Tensor:
        """The mmseg UNet body: returns the last (full-resolution, base_channels) decoder output."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
        return x

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(maps)
        h, w = x.shape[-2:]
        multiple = 2 ** (self.num_stages - 1)
        padded = x.new_zeros(*x.shape[:2], math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple)
        padded[..., :h, :w] = x
        return self.conv_seg(self.unet(padded)[..., :h, :w])

