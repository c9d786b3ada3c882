"""DCNv3-style separable deformable operator (InternImage), N-D.

Channel mixing and spatial aggregation are split: a pointwise projection makes the values, a
depthwise deformable aggregation sums K modulated samples per channel (no per-point weights:
the modulation is the only weighting), and a pointwise projection mixes the result. Offsets and
modulation come from a depthwise conv + LayerNorm + GELU branch followed by pointwise
projections, as in DCNv3.
"""

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from dcnlab._nd import CONVS
from dcnlab.ops import deform_conv

AggregationModulation = Literal["softmax", "unbounded"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of a (B, C, *spatial) tensor."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input.movedim(1, -1)).movedim(-1, 1)


class DCNv3(nn.Module):
    """DCNv3-style deformable aggregation over `dims` spatial dims: (B, C, *in) -> (B, C, *out).

    Args:
        channels: C, kept from input to output.
        dims: 1, 2 or 3 spatial dims.
        kernel_size, stride, padding, dilation: of the aggregation (padding defaults to
            dilation * (kernel_size - 1) // 2, which keeps the size at stride 1).
        groups: offset groups; every group of C/groups channels has its own offsets and
            modulation.
        modulation: "softmax" (DCNv3: the K weights of a group sum to 1) or "unbounded" (DCNv4:
            free weights, initialised to 1/K).
        offset_scale: multiplies the predicted offsets.
        dw_kernel_size: kernel of the depthwise conv of the offset branch (default kernel_size).

    At initialisation the offsets are zero and every weight is 1/K, so the aggregation is a
    box filter of the projected values.
    """

    def __init__(
        self,
        channels: int,
        dims: int = 2,
        kernel_size: int | tuple[int, ...] = 3,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | None = None,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 4,
        modulation: AggregationModulation = "softmax",
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        if dims not in CONVS:
            raise ValueError(f"dims: expected 1, 2 or 3, got {dims}")
        if groups < 1 or channels % groups:
            raise ValueError(f"groups: expected a positive divisor of channels={channels}, got {groups}")
        if modulation not in ("softmax", "unbounded"):
            raise ValueError(f"modulation: expected 'softmax' or 'unbounded', got {modulation!r}")
        expand = _ntuple(dims)
        self.dims = dims
        self.channels = channels
        self.groups = groups
        self.modulation = modulation
        self.offset_scale = offset_scale
        self.kernel_size = expand(kernel_size)
        self.stride = expand(stride)
        self.dilation = expand(dilation)
        self.padding = (
            tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation, strict=True))
            if padding is None
            else expand(padding)
        )
        self.kernel_points = math.prod(self.kernel_size)
        conv = CONVS[dims]
        dw_kernel = dw_kernel_size or max(self.kernel_size)
        self.input_proj = conv(channels, channels, 1)
        self.offset_branch = nn.Sequential(
            conv(channels, channels, dw_kernel, self.stride, dw_kernel // 2, groups=channels),
            ChannelLayerNorm(channels),
            nn.GELU(),
        )
        self.offset = conv(channels, groups * self.kernel_points * dims, 1)
        self.mask = conv(channels, groups * self.kernel_points, 1)
        self.output_proj = conv(channels, channels, 1)
        # The aggregation is depthwise and carries no weights of its own: a constant weight of
        # ones turns the op into the modulated sum over the K samples.
        self.register_buffer("aggregation_weight", torch.ones(channels, 1, *self.kernel_size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for predictor in (self.offset, self.mask):
            nn.init.zeros_(predictor.weight)
            nn.init.zeros_(predictor.bias)
        if self.modulation == "unbounded":
            nn.init.constant_(self.mask.bias, 1.0 / self.kernel_points)
        for projection in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets (B, G*K*d, *out) and modulation (B, G*K, *out) predicted from `input`."""
        features = self.offset_branch(input)
        offset = self.offset(features) * self.offset_scale
        logits = self.mask(features)
        if self.modulation == "unbounded":
            return offset, logits
        grouped = logits.unflatten(1, (self.groups, self.kernel_points))
        return offset, torch.softmax(grouped, dim=2).flatten(1, 2)

    def forward(self, input: Tensor) -> Tensor:
        values = self.input_proj(input)
        offset, mask = self.offsets_and_mask(input)
        weight = self.aggregation_weight.to(values.dtype)
        aggregated = deform_conv(values, offset, weight, None, self.stride, self.padding, self.dilation, mask)
        return self.output_proj(aggregated)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, dims={self.dims}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, modulation={self.modulation!r}, offset_scale={self.offset_scale}"
        )
