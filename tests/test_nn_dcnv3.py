"""dcnlab.nn.DCNv3: the separable deformable operator, N-D."""

import pytest
import torch
import torch.nn.functional as F

from dcnlab.nn import DCNv3
from dcnlab.ops import deform_conv_reference

SHAPES = {1: (2, 8, 20), 2: (2, 8, 9, 10), 3: (1, 8, 5, 6, 7)}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _randomise_predictors(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for predictor in (module.offset, module.mask):
            for parameter in predictor.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_shape_keeps_channels_and_follows_stride(dims, stride):
    x = torch.randn(SHAPES[dims])
    out = DCNv3(8, dims=dims, stride=stride, groups=2)(x)
    expected = [(size - 1) // stride + 1 for size in SHAPES[dims][2:]]
    assert out.shape == (SHAPES[dims][0], 8, *expected)


@pytest.mark.parametrize("modulation", ["softmax", "unbounded"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_at_init_the_aggregation_is_a_box_filter_of_the_projected_values(dims, modulation):
    module = DCNv3(8, dims=dims, groups=2, modulation=modulation).double()
    module.reset_parameters()  # the unbounded modulation's 1/K, exact in float64
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    box = AVG_POOL[dims](module.input_proj(x), 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(module(x), module.output_proj(box), rtol=1e-10, atol=1e-10)


def test_softmax_modulation_sums_to_one_per_group():
    module = DCNv3(8, groups=4)
    _randomise_predictors(module)
    _, mask = module.offsets_and_mask(torch.randn(SHAPES[2]))
    sums = mask.unflatten(1, (4, 9)).sum(dim=2)
    torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_matches_the_reference_aggregation_given_the_predicted_offsets(dims):
    module = DCNv3(8, dims=dims, groups=2, stride=2).double()
    _randomise_predictors(module)
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    offset, mask = module.offsets_and_mask(x)
    assert offset.abs().max() > 0.1
    weight = torch.ones(8, 1, *module.kernel_size, dtype=torch.float64)
    aggregated = deform_conv_reference(module.input_proj(x), offset, weight, None, 2, 1, 1, mask)
    torch.testing.assert_close(module(x), module.output_proj(aggregated), rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_predictors_at_init_and_every_parameter_once_they_move():
    module = DCNv3(8, groups=2)
    x = torch.randn(SHAPES[2])
    module(x).square().sum().backward()
    for name in ("offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.weight"):
        assert module.get_parameter(name).grad.abs().sum() > 0, name
    module.zero_grad()
    _randomise_predictors(module)
    module(x).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dims=4), "^dims: expected 1, 2 or 3"),
        (dict(groups=3), "^groups: expected a positive divisor of channels=8"),
        (dict(modulation="sigmoid"), "^modulation: expected 'softmax' or 'unbounded'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCNv3(8, **kwargs)
