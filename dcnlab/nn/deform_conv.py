"""Deformable convolution layers: drop-ins for nn.Conv1d/2d/3d that predict their own offsets."""

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _ntuple

from dcnlab._nd import CONVS
from dcnlab.ops import deform_conv

Modulation = Literal["none", "sigmoid", "softmax"]
MODULATIONS = ("none", "sigmoid", "softmax")


class _DeformConvNd(_ConvNd):
    """Modulated deformable convolution over `dims` spatial dims (DCNv2; DCNv1 with modulation="none").

    Takes nn.ConvNd's constructor arguments, plus:
        offset_groups: input channels are split into this many groups, each with its own offsets
            and mask (G in the op contract).
        modulation: "sigmoid" (mask = 2 * sigmoid(logits), in (0, 2)), "softmax" (mask = K *
            softmax over the K kernel points of an offset group), or "none" (no mask, DCNv1).
            Both scalings make the mask exactly 1 when the logits are zero.
        offset_scale: multiplies the predicted offsets.

    A conv with the layer's kernel, stride, padding and dilation predicts offsets and mask from
    the input, so they match the output size at any stride. It starts at zero: at
    initialisation the layer computes exactly the plain convolution with its weight and bias.
    """

    dims: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
        offset_scale: float = 1.0,
    ) -> None:
        expand = _ntuple(self.dims)
        kernel_size, stride, dilation = expand(kernel_size), expand(stride), expand(dilation)
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode: deformable sampling treats everything outside the input as zero; "
                f"expected 'zeros', got {padding_mode!r}"
            )
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation: expected one of {MODULATIONS}, got {modulation!r}")
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(
                f"offset_groups: expected a positive divisor of in_channels={in_channels}, got {offset_groups}"
            )
        padding = self._numeric_padding(padding, kernel_size, stride, dilation)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            False,
            expand(0),
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.offset_groups = offset_groups
        self.modulation = modulation
        self.offset_scale = offset_scale
        kernel_points = math.prod(kernel_size)
        channels_per_point = self.dims + (modulation != "none")
        self.conv_offset = CONVS[self.dims](
            in_channels,
            offset_groups * kernel_points * channels_per_point,
            kernel_size,
            stride,
            padding,
            dilation,
            device=device,
            dtype=dtype,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def _numeric_padding(cls, padding, kernel_size, stride, dilation) -> tuple[int, ...]:
        if padding == "valid":
            return (0,) * cls.dims
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding: 'same' needs stride 1, got stride {stride}")
            spans = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
            if any(span % 2 for span in spans):
                raise ValueError(
                    f"padding: 'same' needs an odd dilated kernel extent in every dim (symmetric padding), "
                    f"got kernel {kernel_size} with dilation {dilation}"
                )
            return tuple(span // 2 for span in spans)
        if isinstance(padding, str):
            raise ValueError(f"padding: expected 'valid', 'same', an int or {cls.dims} ints, got {padding!r}")
        return _ntuple(cls.dims)(padding)

    @property
    def kernel_points(self) -> int:
        return math.prod(self.kernel_size)

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predicted offsets (B, G*K*d, *out) and mask (B, G*K, *out) or None."""
        prediction = self.conv_offset(input)
        offset_channels = self.offset_groups * self.kernel_points * self.dims
        offset = prediction[:, :offset_channels] * self.offset_scale
        if self.modulation == "none":
            return offset, None
        logits = prediction[:, offset_channels:]
        if self.modulation == "sigmoid":
            return offset, 2 * torch.sigmoid(logits)
        grouped = logits.unflatten(1, (self.offset_groups, self.kernel_points))
        return offset, (self.kernel_points * torch.softmax(grouped, dim=2)).flatten(1, 2)

    def forward(self, input: Tensor) -> Tensor:
        """(B, C_in, *in) -> (B, C_out, *out), as nn.ConvNd with the same arguments."""
        offset, mask = self.offsets_and_mask(input)
        return deform_conv(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, offset_groups={self.offset_groups}, modulation={self.modulation!r}, "
            f"offset_scale={self.offset_scale}"
        )

    @classmethod
    def from_conv(cls, conv: nn.Module, **kwargs) -> "_DeformConvNd":
        """A deformable layer with `conv`'s configuration and a copy of its weight and bias.

        `conv` is an nn.Conv{d}d; kwargs are the deformable arguments (offset_groups,
        modulation, offset_scale). At initialisation the result computes what `conv` computes.
        """
        expected = CONVS[cls.dims]
        if type(conv) is not expected:
            raise TypeError(f"conv: expected an {expected.__name__}, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer


class DeformConv1d(_DeformConvNd):
    __doc__ = _DeformConvNd.__doc__
    dims = 1


class DeformConv2d(_DeformConvNd):
    __doc__ = _DeformConvNd.__doc__
    dims = 2


class DeformConv3d(_DeformConvNd):
    __doc__ = _DeformConvNd.__doc__
    dims = 3


DEFORM_CONVS = {1: DeformConv1d, 2: DeformConv2d, 3: DeformConv3d}
