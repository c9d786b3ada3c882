"""ONNX export of models that use dcnlab's deformable convolution.

torch.onnx's exporter (torch.export based) has no translation for the custom op
``dcnlab::deform_conv``; :func:`export_onnx` supplies one that emits ONNX's ``DeformConv``
(opset 19), whose input layout is the op's: offset (B, G*K*d, *out) with channel
(g*K + k)*d + axis, mask (B, G*K, *out).

onnxruntime's DeformConv kernel only accepts 2-D inputs, so 1-D convolutions are exported as
2-D ones over a height-1 image (a zero offset along the dummy axis samples exactly the row
itself); 3-D convolutions are refused at export time rather than producing a model that no
common runtime can execute.

Usage::

    from dcnlab.onnx import export_onnx

    export_onnx(model.eval(), (example_input,), "model.onnx")
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from onnxscript import opset19 as op
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError("dcnlab.onnx needs onnxscript and onnx: pip install 'dcnlab[onnx]'") from error

__all__ = ["OPSET_VERSION", "DeformConvExportError", "deform_conv_to_onnx", "export_onnx"]

# DeformConv first appears in opset 19; the translation builds nodes from onnxscript's opset19.
OPSET_VERSION = 19


class DeformConvExportError(NotImplementedError):
    """A dcnlab::deform_conv call that has no runnable ONNX form (for instance a 3-D one)."""


def _static_dim(value: Any, axis: int, name: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        # group and offset_group are attributes, so the channel dims must be known at export.
        raise DeformConvExportError(
            f"dcnlab deform_conv ONNX export: {name} needs a static size on dim {axis}, got {dim!r}"
        )
    return dim


def _axes(*axes: int) -> Any:
    return op.Constant(value_ints=list(axes))


def deform_conv_to_onnx(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any = None,
    stride: Sequence[int] = (),
    padding: Sequence[int] = (),
    dilation: Sequence[int] = (),
    mask: Any = None,
) -> Any:
    """Translation of ``torch.ops.dcnlab.deform_conv.default`` into an ONNX DeformConv node.

    Used as a ``custom_translation_table`` entry of ``torch.onnx.export(dynamo=True)``; the
    arguments are the op's, as ONNX values (tensors) and Python ints (lists). Raises
    :class:`DeformConvExportError` for 3-D convolutions and non-static channel counts.
    """
    # The parameter annotations above are read by the exporter: Sequence[int] makes the lists
    # attributes, unannotated parameters are tensor inputs (None when bias/mask are absent).
    kernel = [_static_dim(weight, axis, "weight") for axis in range(2, len(weight.shape))]
    dims = len(kernel)
    if dims == 3:
        raise DeformConvExportError(
            "dcnlab deform_conv ONNX export: 3-D deformable convolution is not supported. ONNX's DeformConv "
            "is N-D in the spec, but onnxruntime (and ONNX's reference implementation) only run 2-D inputs."
        )
    group = _static_dim(input, 1, "input") // _static_dim(weight, 1, "weight")
    offset_group = _static_dim(offset, 1, "offset") // (dims * math.prod(kernel))
    if dims == 2:
        return op.DeformConv(
            input,
            weight,
            offset,
            bias,
            mask,
            dilations=list(dilation),
            group=group,
            kernel_shape=kernel,
            offset_group=offset_group,
            pads=[*padding, *padding],
            strides=list(stride),
        )

    # 1-D: a 2-D convolution over (1, W) with a (1, k) kernel. The offset gains a zero row
    # displacement ahead of each column displacement: (B, G*K, W_out) -> (B, G*K*2, 1, W_out).
    column_offset = op.Unsqueeze(offset, _axes(2))
    row_offset = op.Expand(op.CastLike(op.Constant(value_float=0.0), offset), op.Shape(column_offset))
    offset_shape = op.Concat(op.Shape(offset, end=1), _axes(-1, 1), op.Shape(offset, start=2), axis=0)
    offset_2d = op.Reshape(op.Concat(row_offset, column_offset, axis=2), offset_shape)
    output = op.DeformConv(
        op.Unsqueeze(input, _axes(2)),
        op.Unsqueeze(weight, _axes(2)),
        offset_2d,
        bias,
        None if mask is None else op.Unsqueeze(mask, _axes(2)),
        dilations=[1, *dilation],
        group=group,
        kernel_shape=[1, *kernel],
        offset_group=offset_group,
        pads=[0, *padding, 0, *padding],
        strides=[1, *stride],
    )
    return op.Squeeze(output, _axes(2))


def export_onnx(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    path: str | os.PathLike,
    **kwargs: Any,
) -> torch.onnx.ONNXProgram:
    """Export `model` to ONNX (opset 19) at `path`, with dcnlab's deformable convolution as DeformConv.

    A thin wrapper over ``torch.onnx.export(model, args, path, dynamo=True, opset_version=19,
    custom_translation_table=...)``; other keyword arguments (input_names, dynamic_shapes,
    external_data, verbose, ...) are passed on, and a ``custom_translation_table`` given here
    is merged with dcnlab's. 1-D and 2-D deformable convolutions export (1-D as a 2-D DeformConv
    of height 1); 3-D ones raise :class:`DeformConvExportError`.

    Args:
        model: the module to export, usually in eval mode.
        args: example positional inputs.
        path: where to write the .onnx file.
        **kwargs: further keyword arguments of ``torch.onnx.export``.

    Returns:
        The ``torch.onnx.ONNXProgram`` that was saved.
    """
    for fixed in ("dynamo", "opset_version"):
        if fixed in kwargs:
            # The translation only exists for the dynamo exporter and emits opset-19 nodes.
            raise TypeError(f"export_onnx: {fixed!r} is fixed (dynamo=True, opset_version={OPSET_VERSION})")
    table: dict[Callable, Callable] = {torch.ops.dcnlab.deform_conv.default: deform_conv_to_onnx}
    table.update(kwargs.pop("custom_translation_table", None) or {})
    try:
        return torch.onnx.export(
            model,
            args,
            path,
            dynamo=True,
            opset_version=OPSET_VERSION,
            custom_translation_table=table,
            **kwargs,
        )
    except Exception as error:
        # The exporter wraps translation errors in several layers; surface ours directly.
        cause = error.__cause__
        while cause is not None:
            if isinstance(cause, DeformConvExportError):
                raise DeformConvExportError(str(cause)) from error
            cause = cause.__cause__
        raise
