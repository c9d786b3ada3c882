"""What the op does with what users pass: bad arguments raise errors naming the argument,
memory layouts and empty batches work, and non-finite or huge offsets are harmless."""

import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torchvision
from conftest import GRAD_NAMES, DeformConvCase, make_case, random_grad_output, run_with_grads

from dcnlab.ops import deform_conv, deform_conv1d, deform_conv2d, deform_conv3d, deform_conv_reference


def _base_case() -> DeformConvCase:
    """2D, B=2, C_in=C_out=4, 3x3 kernel, 7x7 input: output 5x5, offset (2, 18, 5, 5), mask (2, 9, 5, 5)."""
    return make_case(2, torch.float64, batch=2, in_channels=4, out_channels=4, in_size=7, kernel=3, seed=600)


def _zeros(*shape, dtype=torch.float64):
    return torch.zeros(shape, dtype=dtype)


# name -> (change to the base case's arguments, expected message pattern)
BAD_ARGUMENTS = {
    "offset-channels-not-multiple-of-K-dims": (
        dict(offset=_zeros(2, 17, 5, 5)),
        r"^offset: expected channels a positive multiple of K\*2 = 18 .*got 17",
    ),
    "offset-zero-channels": (dict(offset=_zeros(2, 0, 5, 5)), r"^offset: expected channels a positive multiple"),
    "offset-groups-not-dividing-C_in": (dict(offset=_zeros(2, 54, 5, 5)), r"^offset: offset_groups = 3 .*C_in = 4"),
    "offset-spatial-size": (
        dict(offset=_zeros(2, 18, 4, 5)),
        r"^offset: expected shape \[2, 18, 5, 5\].*got \[2, 18, 4, 5\]",
    ),
    "offset-batch": (dict(offset=_zeros(1, 18, 5, 5)), r"^offset: expected shape \[2, 18, 5, 5\]"),
    "offset-dims": (dict(offset=_zeros(2, 18, 25)), r"^offset: expected a 4-D tensor"),
    "mask-channels": (dict(mask=_zeros(2, 8, 5, 5)), r"^mask: expected shape \[2, 9, 5, 5\].*got \[2, 8, 5, 5\]"),
    "mask-spatial-size": (dict(mask=_zeros(2, 9, 5, 6)), r"^mask: expected shape \[2, 9, 5, 5\]"),
    "mask-dims": (dict(mask=_zeros(2, 9, 25)), r"^mask: expected a 4-D tensor"),
    "bias-size": (dict(bias=_zeros(5)), r"^bias: expected shape \[4\].*got \[5\]"),
    "bias-dims": (dict(bias=_zeros(4, 1)), r"^bias: expected shape \[4\]"),
    "weight-group-channels-not-dividing-C_in": (
        dict(weight=_zeros(4, 3, 3, 3)),
        r"^weight: C_in/groups = 3 must divide input channels C_in = 4",
    ),
    "weight-C_out-not-divisible-by-groups": (
        dict(weight=_zeros(3, 2, 3, 3)),
        r"^weight: C_out = 3 must be divisible by groups = 2",
    ),
    "weight-dims": (dict(weight=_zeros(4, 4, 9)), r"^weight: expected a 4-D tensor"),
    "weight-empty-kernel": (dict(weight=_zeros(4, 4, 0, 3)), r"^weight: expected kernel sizes in \[1, 2\^31\)"),
    "input-integer-dtype": (dict(input=torch.ones(2, 4, 7, 7, dtype=torch.int64)), r"^input: expected dtype float32"),
    "input-empty-spatial": (dict(input=_zeros(2, 4, 0, 7)), r"^input: expected non-empty spatial dims"),
    "offset-dtype": (
        dict(offset=_zeros(2, 18, 5, 5, dtype=torch.float32)),
        r"^offset: expected dtype Double .*got Float",
    ),
    "weight-dtype": (dict(weight=_zeros(4, 4, 3, 3, dtype=torch.float32)), r"^weight: expected dtype Double"),
    "mask-dtype": (dict(mask=_zeros(2, 9, 5, 5, dtype=torch.float16)), r"^mask: expected dtype Double .*got Half"),
    "bias-dtype": (dict(bias=_zeros(4, dtype=torch.bfloat16)), r"^bias: expected dtype Double .*got BFloat16"),
    "stride-zero": (dict(stride=(1, 0)), r"^stride: expected every value in \[1, 2\^31\), got \[1, 0\]"),
    "stride-negative": (dict(stride=-1), r"^stride: expected every value in \[1, 2\^31\)"),
    "dilation-zero": (dict(dilation=0), r"^dilation: expected every value in \[1, 2\^31\)"),
    "dilation-huge": (dict(dilation=2**62), r"^dilation: expected every value in \[1, 2\^31\)"),
    "padding-huge": (dict(padding=2**40), r"^padding: expected every value in \[0, 2\^31\)"),
    "padding-negative": (dict(padding=(0, -1)), r"^padding: expected every value in \[0, 2\^31\), got \[0, -1\]"),
    "stride-tuple-too-long": (dict(stride=(1, 1, 1)), r"^stride: expected an int or a sequence of 2 ints"),
    "padding-tuple-too-short": (dict(padding=(1,)), r"^padding: expected an int or a sequence of 2 ints"),
    "dilation-float": (dict(dilation=1.0), r"^dilation: expected an int or a sequence of 2 ints"),
    "stride-bool": (dict(stride=True), r"^stride: expected an int or a sequence of 2 ints"),
    "kernel-larger-than-padded-input": (
        dict(weight=_zeros(4, 4, 9, 3), offset=_zeros(2, 54, 1, 5), mask=_zeros(2, 27, 1, 5)),
        r"^input: output would be empty: spatial dim 0 of size 7 with padding 0 .* extent 9",
    ),
    "dilated-kernel-larger-than-padded-input": (
        dict(dilation=(1, 5), padding=(0, 1)),
        r"^input: output would be empty: spatial dim 1 of size 7 with padding 1 .* extent 11",
    ),
}


@pytest.mark.parametrize("change, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_raises_value_error_naming_it(change, message):
    case = replace(_base_case(), **change)
    with pytest.raises(ValueError, match=message):
        deform_conv(*case.args())


def test_base_case_of_bad_argument_tests_is_valid():
    case = _base_case()
    assert deform_conv(*case.args()).shape == (2, 4, 5, 5)


@pytest.mark.parametrize(
    "functional, input_shape, message",
    [
        (deform_conv1d, (2, 4, 7, 7), r"^input: deform_conv1d expects a 3-D tensor .*got shape \(2, 4, 7, 7\)"),
        (deform_conv2d, (2, 4, 7), r"^input: deform_conv2d expects a 4-D tensor"),
        (deform_conv2d, (2, 4, 7, 7, 7), r"^input: deform_conv2d expects a 4-D tensor"),
        (deform_conv3d, (2, 4, 7, 7), r"^input: deform_conv3d expects a 5-D tensor"),
        (deform_conv, (2, 4, 3, 3, 3, 3), r"^input: expected a 3-D, 4-D or 5-D tensor"),
        (deform_conv, (2, 4), r"^input: expected a 3-D, 4-D or 5-D tensor"),
    ],
    ids=["1d-given-4d", "2d-given-3d", "2d-given-5d", "3d-given-4d", "nd-given-6d", "nd-given-2d"],
)
def test_wrong_input_dims_raise_value_error_naming_input(functional, input_shape, message):
    case = _base_case()
    with pytest.raises(ValueError, match=message):
        functional(torch.randn(input_shape, dtype=torch.float64), case.offset, case.weight)


def test_compiled_op_rejects_six_dim_input_and_wrong_length_stride():
    case = _base_case()
    op = torch.ops.dcnlab.deform_conv.default
    with pytest.raises(ValueError, match=r"^input: expected a 3-D, 4-D or 5-D tensor"):
        op(
            torch.randn(2, 4, 3, 3, 3, 3, dtype=torch.float64),
            case.offset,
            case.weight,
            None,
            [1] * 4,
            [0] * 4,
            [1] * 4,
            None,
        )
    with pytest.raises(ValueError, match=r"^stride: expected 2 values \(one per spatial dim\), got 3"):
        op(case.input, case.offset, case.weight, None, [1, 1, 1], [0, 0], [1, 1], None)


def test_zero_input_channels_raise_error_instead_of_crashing():
    # Run in a child process: an integer division by zero (groups = C_in / weight.shape[1] = 0)
    # kills the whole interpreter with SIGFPE.
    script = textwrap.dedent(
        """
        import torch, dcnlab
        from dcnlab.ops import deform_conv
        try:
            deform_conv(torch.randn(1, 0, 5), torch.zeros(1, 3, 3), torch.randn(2, 1, 3))
        except (ValueError, RuntimeError) as error:
            print(type(error).__name__, error)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"process died with code {child.returncode}: {child.stderr[-500:]}"
    assert child.stdout.startswith(("ValueError input", "ValueError weight")), child.stdout


def test_backward_op_rejects_wrongly_shaped_grad_output():
    case = _base_case()
    grad_output = random_grad_output(case)
    backward = torch.ops.dcnlab.deform_conv_backward.default
    assert backward(*case.backward_args(grad_output))[0].shape == case.input.shape
    expected = r"^grad_output: expected shape \[2, 4, 5, 5\] \(B, C_out, \*out_spatial\)"
    for bad in (grad_output[:, :3], grad_output[:1], grad_output[..., :4], grad_output[:, :, None]):
        with pytest.raises(ValueError, match=expected):
            backward(*case.backward_args(bad))
    with pytest.raises(ValueError, match=r"^grad_output: expected dtype Double"):
        backward(*case.backward_args(grad_output.float()))


# --- memory layouts and empty batches ---------------------------------------------------------


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous: stored transposed in the last two dims."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else _strided(t)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous: every other element of a twice-as-long buffer (last dim)."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buffer[..., ::2] = t
    return buffer[..., ::2]


def _grads_of_layout(case: DeformConvCase, layout, grad_output: torch.Tensor):
    """Output and grads with every tensor re-laid by `layout` into a non-contiguous leaf."""
    leaves = case.map(lambda t: layout(t.detach()).requires_grad_())
    assert not any(t.is_contiguous() for t in leaves.tensors().values())
    output = deform_conv(*leaves.args())
    output.backward(layout(grad_output))
    return output, {name: t.grad for name, t in leaves.tensors().items()}


@pytest.mark.parametrize("layout", [_transposed, _strided], ids=["transposed", "sliced"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_non_contiguous_tensors_give_same_results_as_contiguous(dims, layout):
    case = make_case(
        dims, in_size=(5, 6, 4)[:dims], kernel=(2, 3, 2)[:dims], offset_groups=2, padding=1, seed=610 + dims
    )
    grad_output = random_grad_output(case)
    expected_output, expected_grads = run_with_grads(deform_conv, case, grad_output)
    output, grads = _grads_of_layout(case, layout, grad_output)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_tensors_give_same_results_as_contiguous(dims):
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    case = make_case(dims, in_size=5, offset_groups=2, padding=1, seed=620 + dims)
    grad_output = random_grad_output(case)
    expected_output, expected_grads = run_with_grads(deform_conv, case, grad_output)
    leaves = case.map(
        lambda t: (
            t.detach().contiguous(memory_format=memory_format) if t.dim() == dims + 2 else t.detach()
        ).requires_grad_()
    )
    assert not leaves.input.is_contiguous() and leaves.input.is_contiguous(memory_format=memory_format)
    output = deform_conv(*leaves.args())
    output.backward(grad_output.contiguous(memory_format=memory_format))
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for name, leaf in leaves.tensors().items():
        torch.testing.assert_close(leaf.grad, expected_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_empty_batch_gives_empty_output_and_zero_parameter_grads(dims):
    case = make_case(dims, batch=0, in_channels=4, out_channels=6, kernel=2, offset_groups=2, seed=630)
    leaves = case.leaves()
    output = deform_conv(*leaves.args())
    assert output.shape == (0, 6, *case.out_size)
    output.sum().backward()
    for name in ("input", "offset", "mask"):
        assert leaves.tensors()[name].grad.shape == case.tensors()[name].shape, name
    assert torch.equal(leaves.weight.grad, torch.zeros_like(case.weight))
    assert torch.equal(leaves.bias.grad, torch.zeros_like(case.bias))


# --- non-finite and huge offsets ----------------------------------------------------------------

BAD_OFFSETS = {
    "nan": float("nan"),
    "+inf": float("inf"),
    "-inf": float("-inf"),
    "1e30": 1e30,
    "-1e30": -1e30,
    "3e9": 3e9,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("value", BAD_OFFSETS.values(), ids=BAD_OFFSETS.keys())
def test_non_finite_or_huge_offset_point_contributes_exactly_zero(value, axis, dtype):
    # The point: sample 1, offset group 1, kernel point 4 (the centre of 3x3), output (2, 3), so mask
    # channel g*K + k = 13 and offset channel (g*K + k)*2 + axis.
    case = make_case(2, dtype, in_channels=4, out_channels=3, offset_groups=2, in_size=6, padding=1, seed=640)
    channel = 13
    bad_offset = case.offset.clone()
    bad_offset[1, 2 * channel + axis, 2, 3] = value
    bad = replace(case, offset=bad_offset)
    masked_offset = case.offset.clone()
    masked_offset[1, 2 * channel + axis, 2, 3] = 0
    masked_mask = case.mask.clone()
    masked_mask[1, channel, 2, 3] = 0
    masked = replace(case, offset=masked_offset, mask=masked_mask)

    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, bad, grad_output)
    expected_output, expected_grads = run_with_grads(deform_conv, masked, grad_output)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for name in GRAD_NAMES:
        assert torch.isfinite(grads[name]).all(), name
    for name in ("input", "weight", "bias", "offset"):
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0, msg=name)
    # The mask gradient of the point is its (zero) sample value; the others are unchanged.
    assert grads["mask"][1, channel, 2, 3] == 0
    assert expected_grads["mask"][1, channel, 2, 3] != 0
    grads["mask"][1, channel, 2, 3] = expected_grads["mask"][1, channel, 2, 3]
    torch.testing.assert_close(grads["mask"], expected_grads["mask"], rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_offsets_full_of_non_finite_and_huge_values_match_reference(dims):
    case = make_case(dims, in_size=5, kernel=2, in_channels=4, offset_groups=2, padding=1, seed=650 + dims)
    generator = torch.Generator().manual_seed(651)
    specials = torch.tensor(list(BAD_OFFSETS.values()), dtype=torch.float64)
    pick = torch.randint(len(specials), case.offset.shape, generator=generator)
    replace_some = torch.rand(case.offset.shape, generator=generator) < 0.3
    case = replace(case, offset=torch.where(replace_some, specials[pick], case.offset))
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, case, grad_output)
    expected_output, expected_grads = run_with_grads(deform_conv_reference, case, grad_output)
    torch.testing.assert_close(output, expected_output, rtol=1e-10, atol=1e-10)
    for name in GRAD_NAMES:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    bad_points = ~torch.isfinite(case.offset) | (case.offset.abs() > 1e9)
    assert (grads["offset"][bad_points] == 0).all()


@pytest.mark.parametrize("value", BAD_OFFSETS.values(), ids=BAD_OFFSETS.keys())
def test_all_offsets_non_finite_or_huge_give_bias_only(value):
    case = make_case(3, torch.float32, in_size=4, kernel=2, seed=660)
    case = replace(case, offset=torch.full_like(case.offset, value))
    output, grads = run_with_grads(deform_conv, case, random_grad_output(case))
    torch.testing.assert_close(output, case.bias.reshape(1, -1, 1, 1, 1).expand_as(output), rtol=0, atol=0)
    for name in ("input", "offset", "weight", "mask"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_non_finite_input_value_does_not_leak_into_points_outside_the_input(dims, value):
    # Every sample point lies outside the input, so each contributes 0 whatever the input holds
    # (torchvision gives exactly the bias here). The first element of each input plane is
    # non-finite: an implementation that reads it for outside corners and multiplies by a zero
    # weight turns the output into NaN.
    case = make_case(dims, in_size=4, kernel=2, padding=1, seed=670)
    poisoned = case.input.clone()
    poisoned[(slice(None), slice(None)) + (0,) * dims] = value
    case = replace(case, input=poisoned, offset=torch.full_like(case.offset, 100.0))
    bias_only = case.bias.reshape(1, -1, *[1] * dims).expand(case.output_shape)
    if dims == 2:
        torch.testing.assert_close(torchvision.ops.deform_conv2d(*case.args()), bias_only, rtol=0, atol=0)
    output, grads = run_with_grads(deform_conv, case, random_grad_output(case))
    torch.testing.assert_close(output, bias_only, rtol=0, atol=0)
    for name in ("weight", "offset", "mask"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


def test_broadcast_mask_and_offset_views_give_same_results_as_materialised():
    case = make_case(2, batch=3, offset_groups=2, padding=1, seed=680)
    case = replace(case, offset=case.offset[:1].expand_as(case.offset), mask=case.mask[:1].expand_as(case.mask))
    grad_output = random_grad_output(case)
    expected_output, expected_grads = run_with_grads(deform_conv, case.map(torch.Tensor.contiguous), grad_output)
    small_offset = case.offset[:1].clone().requires_grad_()
    small_mask = case.mask[:1].clone().requires_grad_()
    output = deform_conv(
        case.input,
        small_offset.expand_as(case.offset),
        case.weight,
        case.bias,
        case.stride,
        case.padding,
        case.dilation,
        small_mask.expand_as(case.mask),
    )
    output.backward(grad_output)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(small_offset.grad, expected_grads["offset"].sum(0, keepdim=True))
    torch.testing.assert_close(small_mask.grad, expected_grads["mask"].sum(0, keepdim=True))


def test_non_finite_gradient_of_an_outside_point_does_not_reach_input_element_0():
    input = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[0, :, 0, 0] = 100.0  # the point of output (0, 0) lies far outside
    grad_output = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    grad_output[0, :, 0, 0] = float("inf")
    (grad_input,) = torch.autograd.grad(deform_conv(input, offset, weight), input, grad_output)
    (expected,) = torch.autograd.grad(deform_conv_reference(input, offset, weight), input, grad_output)
    assert torch.isfinite(grad_input).all()
    torch.testing.assert_close(grad_input, expected)


def test_reference_handles_an_empty_batch():
    case = replace(_base_case(), input=_zeros(0, 4, 7, 7), offset=_zeros(0, 18, 5, 5), mask=_zeros(0, 9, 5, 5))
    assert deform_conv_reference(*case.args()).shape == (0, 4, 5, 5)


def test_bool_conv_params_are_rejected_in_sequences_too():
    with pytest.raises(ValueError, match="^stride: expected an int or a sequence of 2 ints"):
        deform_conv(*replace(_base_case(), stride=(True, 1)).args())
