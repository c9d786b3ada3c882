"""Functional API of the N-D modulated deformable convolution, with its fake kernels and
autograd formula. The kernels and all argument checks are in csrc/."""

from collections.abc import Sequence

import torch
from torch import Tensor

from dcnlab.ops._params import expand_param, spatial_dims

IntOrTuple = int | Sequence[int]


def deform_conv(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Modulated deformable convolution over 1, 2 or 3 spatial dims (inferred from input.dim()).

    With d spatial dims, kernel (k_1..k_d), K = prod(k_i) kernel points and G offset groups:

    Args:
        input: (B, C_in, *in_spatial).
        offset: (B, G*K*d, *out_spatial); channel (g*K + k)*d + axis displaces kernel point k
            (row-major over the kernel) of offset group g along spatial axis `axis`.
        weight: (C_out, C_in/groups, *kernel).
        bias: (C_out,) or None.
        stride, padding, dilation: an int or one int per spatial dim.
        mask: (B, G*K, *out_spatial) modulation, or None for all ones (DCNv1).

    Returns:
        (B, C_out, *out_spatial) with out = floor((in + 2*pad - dil*(k-1) - 1) / stride) + 1.
    """
    dims = spatial_dims(input.dim(), input.shape)
    return torch.ops.dcnlab.deform_conv.default(
        input,
        offset,
        weight,
        bias,
        expand_param(stride, dims, "stride"),
        expand_param(padding, dims, "padding"),
        expand_param(dilation, dims, "dilation"),
        mask,
    )


def _fixed_dims(dims: int, name: str):
    def op(
        input: Tensor,
        offset: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1,
        mask: Tensor | None = None,
    ) -> Tensor:
        if input.dim() != dims + 2:
            raise ValueError(
                f"input: {name} expects a {dims + 2}-D tensor (B, C_in, *{dims} spatial dims), "
                f"got shape {tuple(input.shape)}"
            )
        return deform_conv(input, offset, weight, bias, stride, padding, dilation, mask)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"{dims}-D modulated deformable convolution; see :func:`deform_conv`."
    return op


deform_conv1d = _fixed_dims(1, "deform_conv1d")
deform_conv2d = _fixed_dims(2, "deform_conv2d")
deform_conv3d = _fixed_dims(3, "deform_conv3d")


@torch.library.register_fake("dcnlab::deform_conv")
def _deform_conv_fake(input, offset, weight, bias, stride, padding, dilation, mask):
    dims = spatial_dims(input.dim(), input.shape)
    out_size = [
        (input.shape[a + 2] + 2 * padding[a] - dilation[a] * (weight.shape[a + 2] - 1) - 1) // stride[a] + 1
        for a in range(dims)
    ]
    return input.new_empty((input.shape[0], weight.shape[0], *out_size))


@torch.library.register_fake("dcnlab::deform_conv_backward")
def _deform_conv_backward_fake(grad_output, input, offset, weight, mask, stride, padding, dilation, output_mask):
    def grad_like(tensor, wanted):
        return torch.empty_like(tensor, memory_format=torch.contiguous_format) if wanted else input.new_empty(0)

    want_mask = output_mask[4] and mask is not None
    return (
        grad_like(input, output_mask[0]),
        grad_like(offset, output_mask[1]),
        grad_like(weight, output_mask[2]),
        input.new_empty(weight.shape[0]) if output_mask[3] else input.new_empty(0),
        grad_like(mask, want_mask) if want_mask else input.new_empty(0),
    )


# The autograd formula of dcnlab::deform_conv is registered in C++ (csrc/autograd/): it calls
# dcnlab::deform_conv_backward with the gradients autograd asks for. Its backward op gets an
# autograd kernel here only to refuse double backward.


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "dcnlab deform_conv: double backward (the gradient of a gradient) is not supported; "
        "call backward without create_graph=True through deform_conv"
    )


torch.library.register_autograd(
    "dcnlab::deform_conv_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
