"""Pure-PyTorch N-D modulated deformable convolution: the test oracle (run it in float64).

It follows the op contract literally, with autograd for every gradient, and materialises all
sample values, so it is meant for small shapes.
"""

import itertools
import math

import torch
from torch import Tensor

from dcnlab.ops._params import expand_param, spatial_dims


def _grid(sizes: list[int], device: torch.device) -> Tensor:
    """Row-major coordinates of every point of a grid: (prod(sizes), len(sizes))."""
    axes = [torch.arange(s, device=device) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def deform_conv_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Tensor | None = None,
) -> Tensor:
    """Same contract and signature as :func:`dcnlab.ops.deform_conv`."""
    dims = spatial_dims(input.dim(), input.shape)
    stride = expand_param(stride, dims, "stride")
    padding = expand_param(padding, dims, "padding")
    dilation = expand_param(dilation, dims, "dilation")
    batch, in_channels = input.shape[:2]
    in_size = list(input.shape[2:])
    out_channels, group_channels = weight.shape[:2]
    kernel = list(weight.shape[2:])
    groups = in_channels // group_channels
    kernel_points = math.prod(kernel)
    out_size = [
        (i + 2 * p - d * (k - 1) - 1) // s + 1
        for i, p, d, k, s in zip(in_size, padding, dilation, kernel, stride, strict=True)
    ]
    out_plane = math.prod(out_size)
    offset_groups = offset.shape[1] // (kernel_points * dims)
    per_offset_group = in_channels // offset_groups
    device = input.device
    coord_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32

    # Undeformed sampling grid p0 = out * stride - pad + k * dil: (K, L, d).
    kernel_grid = _grid(kernel, device) * torch.tensor(dilation, device=device)
    out_grid = _grid(out_size, device) * torch.tensor(stride, device=device) - torch.tensor(padding, device=device)
    base = kernel_grid[:, None, :] + out_grid[None, :, :]  # (K, L, d), integer
    displacement = offset.to(coord_dtype).reshape(batch, offset_groups, kernel_points, dims, out_plane)
    displacement = displacement.transpose(-1, -2)  # (B, G, K, L, d)

    # The sample position is base + displacement, kept as the integer base and the offset (the
    # kernels' arithmetic, sampling.h): the cell is base + floor(displacement) and the fraction
    # displacement - floor(displacement), exact, where a float32 sum would round for large base.
    size = torch.tensor(in_size, device=device)
    in_range = ((displacement > (-1 - base).to(coord_dtype)) & (displacement < (size - base).to(coord_dtype))).all(
        dim=-1
    )  # False for NaN too
    displacement = torch.where(in_range[..., None], displacement, torch.zeros_like(displacement))
    cell = torch.floor(displacement)
    frac = displacement - cell
    low = base + cell.long()

    planes = input.reshape(batch, offset_groups, per_offset_group, math.prod(in_size))
    in_size_t = torch.tensor(in_size, device=device)
    row_major = torch.tensor([math.prod(in_size[a + 1 :]) for a in range(dims)], device=device)
    sampled = input.new_zeros(batch, offset_groups, per_offset_group, kernel_points * out_plane)
    for corner in itertools.product((0, 1), repeat=dims):
        corner_t = torch.tensor(corner, device=device)
        point = low + corner_t
        inside = ((point >= 0) & (point < in_size_t)).all(dim=-1) & in_range
        corner_weight = torch.where(corner_t.bool(), frac, 1 - frac).prod(dim=-1) * inside
        flat = (torch.where(inside[..., None], point, torch.zeros_like(point)) * row_major).sum(dim=-1)
        flat = flat.reshape(batch, offset_groups, 1, kernel_points * out_plane).expand(-1, -1, per_offset_group, -1)
        values = torch.gather(planes, 3, flat) * corner_weight.reshape(
            batch, offset_groups, 1, kernel_points * out_plane
        ).to(input.dtype)
        # A corner outside the input reads element 0 with weight 0; drop it rather than let a
        # non-finite element 0 turn 0 * inf into NaN.
        sampled = sampled + torch.where(inside.reshape(batch, offset_groups, 1, kernel_points * out_plane), values, 0)
    if mask is not None:
        sampled = sampled * mask.reshape(batch, offset_groups, 1, kernel_points * out_plane)

    columns = sampled.reshape(batch, groups, group_channels * kernel_points, out_plane)
    weight_rows = weight.reshape(groups, out_channels // groups, group_channels * kernel_points)
    output = torch.einsum("gor,bgrl->bgol", weight_rows, columns).reshape(batch, out_channels, *out_size)
    if bias is not None:
        output = output + bias.reshape(1, -1, *([1] * dims))
    return output
