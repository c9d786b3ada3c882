"""dcnlab.nn.convert_to_deform on a torchvision ResNet and on small models."""

import pytest
import torch
import torchvision
from torch import nn

from dcnlab.nn import DeformConv1d, DeformConv2d, convert_to_deform


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double().eval()


def test_converting_resnet_stage_keeps_its_output_and_weights():
    model = _resnet18()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    original_weight = model.layer4[0].conv2.weight.detach().clone()
    convert_to_deform(model, ["layer4.*.conv2", "layer3.0.conv1"], offset_groups=4)
    converted = [name for name, m in model.named_modules() if isinstance(m, DeformConv2d)]
    assert converted == ["layer3.0.conv1", "layer4.0.conv2", "layer4.1.conv2"]
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer4[0].conv2.offset_groups == 4
    assert torch.equal(model.layer4[0].conv2.weight, original_weight)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_default_converts_every_conv_larger_than_1x1():
    model = convert_to_deform(_resnet18())
    deformable = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    plain = [m for name, m in model.named_modules() if type(m) is nn.Conv2d and not name.endswith("conv_offset")]
    assert len(deformable) == 17  # stem 7x7 + 16 3x3 convs
    assert len(plain) == 3 and all(m.kernel_size == (1, 1) for m in plain)  # downsample 1x1 convs stay


def test_predicate_selects_convs_and_the_converted_model_trains():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 5, padding=2))
    convert_to_deform(model, lambda name, conv: conv.kernel_size == (5,), modulation="softmax")
    assert type(model[0]) is nn.Conv1d and isinstance(model[2], DeformConv1d)
    model(torch.randn(3, 2, 16)).square().mean().backward()
    assert model[2].conv_offset.weight.grad.abs().sum() > 0


def test_patterns_matching_nothing_raise():
    with pytest.raises(ValueError, match="^include: no nn.Conv1d/2d/3d of the model matches"):
        convert_to_deform(_resnet18(), ["layer9.*"])
