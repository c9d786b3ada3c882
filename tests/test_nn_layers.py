"""dcnlab.nn.DeformConv{1,2,3}d: drop-in behaviour, offset prediction and learning."""

import pytest
import torch
from torch import nn

from dcnlab.nn import DeformConv1d, DeformConv2d, DeformConv3d
from dcnlab.ops import deform_conv_reference

LAYERS = {1: DeformConv1d, 2: DeformConv2d, 3: DeformConv3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZES = {1: (11,), 2: (9, 8), 3: (5, 6, 7)}


def _input(dims, batch=2, channels=4, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SIZES[dims], generator=generator, dtype=dtype)


def _randomise_predictor(layer, scale=0.3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.conv_offset.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


@pytest.mark.parametrize("modulation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_shape_matches_plain_conv(dims, stride, modulation):
    kwargs = dict(kernel_size=3, stride=stride, padding=1, dilation=1, groups=2)
    layer = LAYERS[dims](4, 6, offset_groups=2, modulation=modulation, **kwargs)
    conv = CONVS[dims](4, 6, **kwargs)
    x = _input(dims)
    assert layer(x).shape == conv(x).shape


@pytest.mark.parametrize("modulation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_at_init_equals_the_plain_conv_with_the_same_weights(dims, modulation):
    conv = CONVS[dims](4, 6, 3, stride=2, padding=1, dilation=1, groups=2, dtype=torch.float64)
    layer = LAYERS[dims].from_conv(conv, offset_groups=2, modulation=modulation)
    x = _input(dims, dtype=torch.float64)
    offset, mask = layer.offsets_and_mask(x)
    assert torch.count_nonzero(offset) == 0
    assert mask is None if modulation == "none" else torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)


def test_from_conv_copies_weights_and_rejects_other_layers():
    conv = nn.Conv2d(3, 5, (3, 1), stride=(2, 1), padding=(1, 0), bias=False)
    layer = DeformConv2d.from_conv(conv, offset_scale=0.5)
    assert torch.equal(layer.weight, conv.weight) and layer.bias is None
    assert (layer.kernel_size, layer.stride, layer.padding, layer.offset_scale) == ((3, 1), (2, 1), (1, 0), 0.5)
    with pytest.raises(TypeError, match="conv: expected an Conv2d"):
        DeformConv2d.from_conv(nn.Conv1d(3, 5, 3))


@pytest.mark.parametrize("modulation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_stride_2_output_matches_float64_reference_given_the_predicted_offsets(dims, modulation):
    layer = LAYERS[dims](4, 6, 3, stride=2, padding=1, groups=2, offset_groups=2, modulation=modulation)
    layer = layer.double()
    _randomise_predictor(layer)
    x = _input(dims, dtype=torch.float64)
    offset, mask = layer.offsets_and_mask(x)
    assert offset.abs().max() > 0.1  # the predictor really moves the sample points
    expected = deform_conv_reference(x, offset, layer.weight, layer.bias, 2, 1, 1, mask)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_softmax_mask_sums_to_kernel_points_per_offset_group():
    layer = DeformConv2d(4, 4, 3, padding=1, offset_groups=2, modulation="softmax")
    _randomise_predictor(layer)
    _, mask = layer.offsets_and_mask(_input(2))
    sums = mask.unflatten(1, (2, 9)).sum(dim=2)
    torch.testing.assert_close(sums, torch.full_like(sums, 9.0))


def test_gradients_reach_every_predictor_parameter():
    layer = DeformConv2d(4, 6, 3, padding=1, offset_groups=2)
    layer(_input(2)).square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_predictor_learns_a_shift_and_lowers_the_loss():
    # Target: a fixed conv applied to the input shifted by one pixel along x. Only the offset
    # predictor trains; a constant offset of +1 along x solves the task exactly.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.nn.functional.avg_pool2d(torch.randn(4, 2, 20, 20), 3, stride=1, padding=1)
    target = conv(torch.roll(x, shifts=-1, dims=-1)).detach()[..., 2:-2, 2:-2]
    layer = DeformConv2d.from_conv(conv)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    before = [p.detach().clone() for p in layer.conv_offset.parameters()]
    optimizer = torch.optim.Adam(layer.conv_offset.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = (layer(x)[..., 2:-2, 2:-2] - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert all(not torch.equal(b, a) for b, a in zip(before, layer.conv_offset.parameters(), strict=True))
    offset, _ = layer.offsets_and_mask(x)
    assert offset[:, 1::2, 2:-2, 2:-2].mean().item() == pytest.approx(1.0, abs=0.1)
    assert offset[:, 0::2, 2:-2, 2:-2].mean().item() == pytest.approx(0.0, abs=0.1)


def test_channels_last_input_gives_the_same_output():
    layer = DeformConv2d(4, 6, 3, padding=1, offset_groups=2)
    _randomise_predictor(layer)
    x = _input(2)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x))


def test_state_dict_round_trip():
    layer = DeformConv3d(4, 6, 3, padding=1, offset_groups=2, modulation="softmax")
    _randomise_predictor(layer)
    copy = DeformConv3d(4, 6, 3, padding=1, offset_groups=2, modulation="softmax")
    copy.load_state_dict(layer.state_dict())
    x = _input(3)
    assert torch.equal(copy(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(padding_mode="reflect"), "^padding_mode: .*expected 'zeros'"),
        (dict(modulation="tanh"), "^modulation: expected one of"),
        (dict(offset_groups=3), "^offset_groups: expected a positive divisor of in_channels=4"),
        (dict(padding="same", stride=2), "^padding: 'same' needs stride 1"),
        (dict(padding="same", kernel_size=2), "^padding: 'same' needs an odd dilated kernel extent"),
    ],
)
def test_bad_layer_arguments_raise_value_error(kwargs, message):
    arguments = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        DeformConv2d(**arguments)


def test_same_padding_keeps_the_spatial_size():
    layer = DeformConv2d(4, 4, 3, padding="same", dilation=2)
    assert layer.padding == (2, 2)
    assert layer(_input(2)).shape[2:] == SIZES[2]
