"""ONNX export: dcnlab's deformable convolution becomes ONNX DeformConv (opset 19), and
onnxruntime's CPU output matches PyTorch's."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from dcnlab.nn import DeformConv1d, DeformConv2d, DeformConv3d
from dcnlab.onnx import DeformConvExportError, export_onnx


def _randomise_offsets(model: nn.Module, seed: int) -> nn.Module:
    """The layers' offset predictors start at zero; make them predict non-zero offsets and masks
    so the export is checked on actual deformation, not a plain convolution."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeformConv1d | DeformConv2d | DeformConv3d):
                for param in module.conv_offset.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def _export_and_compare(model: nn.Module, input_shape: tuple[int, ...], path: Path, deform_convs: int) -> None:
    generator = torch.Generator().manual_seed(1)
    export_onnx(model, (torch.randn(input_shape, generator=generator),), path, verbose=False)

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == 19
    assert [node.op_type for node in proto.graph.node].count("DeformConv") == deform_convs

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    # A fresh input: the exported graph must not have baked in the example's values.
    input = torch.randn(input_shape, generator=generator)
    (actual,) = session.run(None, {session.get_inputs()[0].name: input.numpy()})
    with torch.no_grad():
        expected = model(input).numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_two_layer_model(tmp_path: Path) -> None:
    model = nn.Sequential(
        DeformConv2d(3, 8, 3, padding=1, offset_groups=1),
        nn.ReLU(),
        DeformConv2d(8, 4, 3, stride=2, padding=1, groups=2, offset_groups=2, modulation="softmax"),
    )
    _export_and_compare(_randomise_offsets(model, seed=0), (2, 3, 9, 11), tmp_path / "model.onnx", deform_convs=2)


def test_no_mask_no_bias(tmp_path: Path) -> None:
    model = nn.Sequential(DeformConv2d(4, 6, (3, 2), dilation=(1, 2), bias=False, modulation="none"))
    _export_and_compare(_randomise_offsets(model, seed=2), (2, 4, 8, 9), tmp_path / "model.onnx", deform_convs=1)


def test_1d_exports_as_2d(tmp_path: Path) -> None:
    model = nn.Sequential(
        DeformConv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, offset_groups=2, modulation="softmax"),
        nn.ReLU(),
        DeformConv1d(6, 6, 3, padding=1, bias=False, modulation="none"),
    )
    _export_and_compare(_randomise_offsets(model, seed=3), (2, 4, 13), tmp_path / "model.onnx", deform_convs=2)


def test_3d_is_refused(tmp_path: Path) -> None:
    model = _randomise_offsets(nn.Sequential(DeformConv3d(2, 2, 3, padding=1)), seed=4)
    with pytest.raises(DeformConvExportError, match="3-D"):
        export_onnx(model, (torch.randn(1, 2, 4, 4, 4),), tmp_path / "model.onnx", verbose=False)


def test_fixed_arguments_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(DeformConv2d(2, 2, 3))
    with pytest.raises(TypeError, match="opset_version"):
        export_onnx(model, (torch.randn(1, 2, 5, 5),), tmp_path / "model.onnx", opset_version=18)
