"""N-D U-Net whose double-conv blocks at chosen levels are deformable, and its plain-conv twin."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcnlab._nd import BATCH_NORMS, CONVS, DIMS, MAX_POOLS, TRANSPOSED_CONVS
from dcnlab.nn.deform_conv import DEFORM_CONVS, Modulation

INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
Upsampling = Literal["transposed", "interpolate"]
UPSAMPLINGS = ("transposed", "interpolate")


class DoubleConv(nn.Module):
    """(conv3x3 -> BatchNorm -> ReLU) x 2: (B, C_in, *spatial) -> (B, C_out, *spatial).

    Both convs are `dcnlab.nn.DeformConv{dim}d` when `deformable` is set, nn.Conv{dim}d otherwise;
    the parameter names are the same either way apart from the offset predictors.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        deformable: bool = False,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
    ) -> None:
        super().__init__()
        self.conv1 = self._conv(dim, in_channels, out_channels, deformable, offset_groups, modulation)
        self.bn1 = BATCH_NORMS[dim](out_channels)
        self.conv2 = self._conv(dim, out_channels, out_channels, deformable, offset_groups, modulation)
        self.bn2 = BATCH_NORMS[dim](out_channels)
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _conv(
        dim: int, in_channels: int, out_channels: int, deformable: bool, offset_groups: int, modulation: Modulation
    ) -> nn.Module:
        # No bias: the BatchNorm that follows would cancel it.
        if deformable:
            return DEFORM_CONVS[dim](
                in_channels, out_channels, 3, padding=1, bias=False, offset_groups=offset_groups, modulation=modulation
            )
        return CONVS[dim](in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class UNetDCN(nn.Module):
    """U-Net over 1, 2 or 3 spatial dims with deformable double-conv blocks at chosen levels.

    Args:
        dim: number of spatial dims, 1, 2 or 3.
        in_channels: channels of the input.
        num_classes: channels of the output (per-position logits).
        base_channels: channels at level 0, doubled per level.
        depth: number of resolution levels; the input is max-pooled depth - 1 times.
        deformable: False builds the plain-conv twin (same architecture, `dcn_levels` ignored):
            its state_dict is the deformable model's minus the `*.conv_offset.*` entries.
        dcn_levels: levels (0 = full resolution, depth - 1 = bottom) whose blocks, encoder and
            decoder, use deformable convs; None means the two deepest levels, where the
            receptive field is large and the feature maps are small, so deformable sampling is
            both useful and cheap.
        offset_groups, modulation: passed to every deformable conv; `offset_groups` must divide
            the input channels of each deformable conv.
        upsampling: "transposed" (learned stride-2 transposed conv) or "interpolate" (N-linear
            upsampling followed by a 1x1 conv).

    Input (B, in_channels, *spatial), output (B, num_classes, *spatial). Any spatial size works:
    sizes not divisible by 2**(depth - 1) are zero-padded at the end of each dim up to the next
    multiple (the padding takes part in BatchNorm statistics), and the output is cropped back.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 32,
        depth: int = 4,
        deformable: bool = True,
        dcn_levels: Sequence[int] | None = None,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
        upsampling: Upsampling = "transposed",
    ) -> None:
        super().__init__()
        if dim not in DIMS:
            raise ValueError(f"dim: expected one of {DIMS}, got {dim!r}")
        if depth < 1:
            raise ValueError(f"depth: expected a positive number of levels, got {depth!r}")
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling: expected one of {UPSAMPLINGS}, got {upsampling!r}")
        if dcn_levels is None:
            dcn_levels = range(max(depth - 2, 0), depth)
        if any(level not in range(depth) for level in dcn_levels):
            raise ValueError(f"dcn_levels: expected levels in 0..{depth - 1}, got {tuple(dcn_levels)!r}")
        self.dim = dim
        self.depth = depth
        self.dcn_levels = tuple(sorted(set(dcn_levels))) if deformable else ()

        channels = [base_channels * 2**level for level in range(depth)]
        block_args = dict(offset_groups=offset_groups, modulation=modulation)
        self.encoders = nn.ModuleList(
            DoubleConv(
                dim,
                in_channels if level == 0 else channels[level - 1],
                channels[level],
                deformable=level in self.dcn_levels,
                **block_args,
            )
            for level in range(depth)
        )
        self.pool = MAX_POOLS[dim](2)
        # ups[level] and decoders[level] bring level + 1 back to level (level 0..depth-2).
        self.ups = nn.ModuleList(
            self._up(dim, channels[level + 1], channels[level], upsampling) for level in range(depth - 1)
        )
        self.decoders = nn.ModuleList(
            DoubleConv(dim, 2 * channels[level], channels[level], deformable=level in self.dcn_levels, **block_args)
            for level in range(depth - 1)
        )
        self.head = CONVS[dim](channels[0], num_classes, 1)

    @staticmethod
    def _up(dim: int, in_channels: int, out_channels: int, upsampling: Upsampling) -> nn.Module:
        if upsampling == "transposed":
            return TRANSPOSED_CONVS[dim](in_channels, out_channels, 2, stride=2)
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode=INTERPOLATION_MODES[dim], align_corners=False),
            CONVS[dim](in_channels, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *spatial) -> logits (B, num_classes, *spatial)."""
        if x.dim() != self.dim + 2:
            raise ValueError(f"x: expected (B, C, *spatial) with {self.dim} spatial dims, got shape {tuple(x.shape)}")
        spatial = x.shape[2:]
        multiple = 2 ** (self.depth - 1)
        # F.pad lists (before, after) pairs starting from the last dim.
        padding = [amount for size in reversed(spatial) for amount in (0, -size % multiple)]
        x = F.pad(x, padding)

        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth - 1)):
            x = self.decoders[level](torch.cat((skips[level], self.ups[level](x)), dim=1))

        logits = self.head(x)
        return logits[(..., *(slice(0, size) for size in spatial))]


def unet(**kwargs) -> UNetDCN:
    """U-Net-DCN; kwargs are UNetDCN's (`dim` is required)."""
    return UNetDCN(**kwargs)
