"""The compiled op agrees with the pure-PyTorch reference in float64, on the output and on all
five gradients, across 1D/2D/3D configurations; gradcheck on tiny cases."""

from dataclasses import replace

import pytest
import torch
from conftest import assert_close_to_scale, assert_grads_close, make_case, random_grad_output, run_with_grads

from dcnlab.ops import deform_conv, deform_conv_reference

FP64_REL = 1e-10

CONFIGS = {
    "1d-basic": dict(dims=1, in_channels=4, out_channels=6),
    "1d-groups-offset_groups-stride-pad-dil-even-kernel": dict(
        dims=1,
        in_size=13,
        in_channels=4,
        out_channels=6,
        groups=2,
        offset_groups=2,
        kernel=4,
        stride=2,
        padding=1,
        dilation=2,
    ),
    "1d-kernel1-no-mask-no-bias": dict(dims=1, kernel=1, mask=False, bias=False),
    "1d-far-offsets": dict(dims=1, offset_scale=1e3, in_size=11, padding=2),
    "2d-basic": dict(dims=2, in_channels=3, out_channels=5),
    "2d-rect-kernel-per-axis-params": dict(
        dims=2,
        in_size=(9, 8),
        in_channels=6,
        out_channels=6,
        groups=3,
        offset_groups=2,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
    ),
    "2d-depthwise-offset-group-per-channel": dict(dims=2, in_channels=4, out_channels=8, groups=4, offset_groups=4),
    "2d-no-mask": dict(dims=2, mask=False, offset_scale=2.0, padding=1),
    "2d-no-bias": dict(dims=2, bias=False, stride=2, dilation=2, in_size=(11, 10)),
    "2d-far-offsets": dict(dims=2, offset_scale=1e3, padding=(2, 1)),
    "3d-basic": dict(dims=3, in_channels=2, out_channels=3),
    "3d-rect-kernel-per-axis-params": dict(
        dims=3,
        in_size=(6, 7, 5),
        in_channels=4,
        out_channels=4,
        groups=2,
        offset_groups=2,
        kernel=(2, 3, 1),
        stride=(1, 2, 1),
        padding=(1, 0, 1),
        dilation=(2, 1, 1),
    ),
    "3d-no-mask-no-bias": dict(dims=3, in_size=(4, 5, 6), kernel=(3, 1, 2), mask=False, bias=False, batch=1),
    "3d-far-offsets": dict(dims=3, offset_scale=1e3, in_size=4, kernel=2, padding=1),
}


@pytest.mark.parametrize("seed, config", list(enumerate(CONFIGS.values())), ids=CONFIGS.keys())
def test_output_and_all_gradients_match_reference_in_float64(seed, config):
    case = make_case(**config, seed=seed)
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, case, grad_output)
    expected_output, expected_grads = run_with_grads(deform_conv_reference, case, grad_output)
    assert output.shape == case.output_shape
    assert_close_to_scale(output, expected_output, FP64_REL, "output")
    assert_grads_close(grads, expected_grads, FP64_REL)


def test_far_offsets_leave_most_points_outside_and_still_match_reference():
    # With offsets ~1e3 almost every point falls outside: the output is close to the bias alone.
    case = make_case(2, offset_scale=1e3, seed=3)
    outside = deform_conv(*case.args()) - case.bias.reshape(1, -1, 1, 1)
    inside_count = (outside != 0).sum().item()
    assert inside_count < outside.numel() // 4
    torch.testing.assert_close(deform_conv(*case.args()), deform_conv_reference(*case.args()), rtol=0, atol=1e-12)


def _grid_and_border_positions(case, seed):
    """Sample points exactly on integer coordinates, including the borders -1 and size (which
    must contribute nothing), the last valid index, half-way into the border cells and beyond."""
    generator = torch.Generator().manual_seed(seed)
    batch = case.input.shape[0]
    shape = (batch, case.offset_groups, case.kernel_points, 1, *case.out_size)
    axes = []
    for size in case.input.shape[2:]:
        borders = [-2.0, -1.0, -0.5, 0.0, 1.0, size - 1.0, size - 0.5, size, size + 1.0]
        choices = torch.cat([torch.tensor(borders, dtype=torch.float64), torch.arange(size, dtype=torch.float64)])
        axes.append(choices[torch.randint(len(choices), shape, generator=generator)])
    return torch.cat(axes, dim=3)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_points_on_integer_grid_and_exact_borders_match_reference(dims):
    case = make_case(dims, in_size={1: 6, 2: 5, 3: 4}[dims], in_channels=4, offset_groups=2, padding=1, seed=dims)
    case = case.with_positions(_grid_and_border_positions(case, seed=10 + dims))
    assert (case.offset == case.offset.round()).float().mean() > 0.5  # mostly integer offsets
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, case, grad_output)
    expected_output, expected_grads = run_with_grads(deform_conv_reference, case, grad_output)
    assert_close_to_scale(output, expected_output, FP64_REL, "output")
    assert_grads_close(grads, expected_grads, FP64_REL)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_point_at_exact_border_contributes_nothing(dims):
    # Every point at coordinate -1 or `size` along axis 0 and inside along the others: output == bias.
    # The same points moved half a cell inside do contribute (so the comparison is not vacuous).
    case = make_case(dims, in_size=4, kernel=1, seed=20 + dims)
    size = case.input.shape[2]
    positions = torch.full((case.input.shape[0], 1, 1, dims, *case.out_size), 1.5, dtype=torch.float64)
    border = torch.where(torch.arange(case.out_size[0]) % 2 == 0, -1.0, float(size)).double()
    positions[:, :, :, 0] = border.reshape(-1, *[1] * (dims - 1))
    bias_only = case.bias.reshape(1, -1, *[1] * dims).expand(case.output_shape)
    output = deform_conv(*case.with_positions(positions).args())
    torch.testing.assert_close(output, bias_only, rtol=0, atol=0)
    positions[:, :, :, 0] = torch.where(border < 0, -0.5, size - 0.5).reshape(-1, *[1] * (dims - 1))
    inside_output = deform_conv(*case.with_positions(positions).args())
    assert (inside_output != bias_only).all()


def _off_grid_case(dims, seed):
    """A tiny case whose sample points all have fractional parts in [0.1, 0.9] (bilinear
    interpolation is not differentiable at integer coordinates)."""
    case = make_case(
        dims,
        batch=2 if dims < 3 else 1,
        in_channels=2,
        out_channels=2,
        offset_groups=2,
        groups=2,
        kernel=2,
        padding=1 if dims < 3 else 0,
        in_size={1: 5, 2: 3, 3: 3}[dims],
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    whole = torch.randint(-2, 3, case.offset.shape, generator=generator).double()
    fraction = 0.1 + 0.8 * torch.rand(case.offset.shape, generator=generator, dtype=torch.float64)
    return replace(case, offset=whole + fraction)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradcheck_all_inputs(dims):
    case = _off_grid_case(dims, seed=30 + dims)
    fractions = case.offset - case.offset.floor()  # undeformed positions are integers
    assert ((fractions >= 0.1) & (fractions <= 0.9)).all()
    leaves = case.leaves()

    def op(input, offset, weight, bias, mask):
        return deform_conv(input, offset, weight, bias, case.stride, case.padding, case.dilation, mask)

    assert torch.autograd.gradcheck(
        op, (leaves.input, leaves.offset, leaves.weight, leaves.bias, leaves.mask), eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_chunking_matches_per_sample_calls(dtype):
    # Per-sample columns of C_in*K*L = 4*9*64*64 = 147456 elements: the CPU kernel's 2**23-element
    # column buffer holds 56 samples, so a batch of 130 runs as three chunks (44, 44, 42).
    case = make_case(2, dtype, batch=130, in_channels=4, out_channels=3, in_size=66, seed=40)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, case, grad_output)
    for b in (0, 43, 44, 87, 88, 129):
        single = replace(case, input=case.input[b : b + 1], offset=case.offset[b : b + 1], mask=case.mask[b : b + 1])
        single_output, single_grads = run_with_grads(deform_conv, single, grad_output[b : b + 1])
        torch.testing.assert_close(output[b : b + 1], single_output, **tolerance)
        for name in ("input", "offset", "mask"):
            torch.testing.assert_close(grads[name][b : b + 1], single_grads[name], **tolerance, msg=name)
