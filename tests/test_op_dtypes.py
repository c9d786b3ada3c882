"""Half types on CPU: bf16/fp16 results agree with the float64 reference on the same rounded
inputs, sample positions are computed in fp32 (positions beyond 256 stay exact), and autocast
runs the op in the autocast dtype."""

from dataclasses import replace

import pytest
import torch
from conftest import DEVICES, assert_close_to_scale, assert_grads_close, make_case, random_grad_output, run_with_grads

from dcnlab.ops import deform_conv, deform_conv_reference

HALF_TYPES = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]
# Max error relative to the largest reference value: a few units in the last place of the dtype
# (fp32 accumulation, one final rounding).
HALF_REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _reference_with_grads(case, grad_output):
    """The float64 reference evaluated on the case's (already rounded) values."""
    return run_with_grads(deform_conv_reference, case.to(torch.float64), grad_output.double())


def _assert_dtype_everywhere(output, grads, dtype):
    assert output.dtype == dtype
    for name, grad in grads.items():
        assert grad.dtype == dtype, f"grad {name}: {grad.dtype}"


CONFIGS = {
    "1d": dict(dims=1, in_channels=4, out_channels=4, offset_groups=2, padding=1),
    "2d-groups-stride": dict(dims=2, in_channels=4, out_channels=6, groups=2, kernel=(3, 2), stride=(2, 1), padding=1),
    "2d-no-mask-no-bias": dict(dims=2, mask=False, bias=False, dilation=2, in_size=9),
    "3d": dict(dims=3, in_channels=2, out_channels=3, kernel=2, padding=(1, 0, 1)),
    # 64 channels * 9 kernel points per output: sums this long need fp32 accumulation.
    "2d-many-channels": dict(dims=2, in_channels=64, out_channels=4, batch=1, in_size=6),
}


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize("seed, config", list(enumerate(CONFIGS.values())), ids=CONFIGS.keys())
def test_half_output_and_gradients_match_float64_reference_on_rounded_inputs(seed, config, dtype):
    _assert_matches_reference_on_rounded_inputs(make_case(dtype=dtype, **config, seed=200 + seed), dtype)


def _assert_matches_reference_on_rounded_inputs(case, dtype):
    """Output and gradients in `dtype`, within HALF_REL of the float64 reference; returns the
    reference output."""
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv, case, grad_output)
    expected_output, expected_grads = _reference_with_grads(case, grad_output)
    _assert_dtype_everywhere(output, grads, dtype)
    assert_close_to_scale(output, expected_output, HALF_REL[dtype], "output")
    assert_grads_close(grads, expected_grads, HALF_REL[dtype])
    return expected_output


def _far_positions_case(dtype):
    """1D input of 320 samples; offsets are either small fractions or a few hundred, so many
    sample positions lie beyond 256, where bf16 (spacing 2) and fp16 (spacing 0.25) cannot
    represent them."""
    case = make_case(1, dtype, batch=2, in_channels=2, out_channels=3, in_size=320, kernel=3, seed=300)
    generator = torch.Generator().manual_seed(301)
    small = torch.rand(case.offset.shape, generator=generator, dtype=torch.float64) * 2 - 1
    large = torch.rand(case.offset.shape, generator=generator, dtype=torch.float64) * 600 - 300
    pick_large = torch.rand(case.offset.shape, generator=generator) < 0.5
    offset = torch.where(pick_large, large, small).to(dtype)
    return replace(case, offset=offset)


def _positions(case):
    base = case.base_positions().reshape(1, -1, *case.out_size).repeat(1, case.offset_groups, 1)
    return base + case.offset.double()


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
def test_sample_positions_beyond_256_are_computed_in_fp32(dtype):
    case = _far_positions_case(dtype)
    positions = _positions(case)
    inside = (positions > -1) & (positions < 320)
    assert (positions[inside] > 256).float().mean() > 0.1
    assert (positions.to(dtype).double() != positions)[inside].float().mean() > 0.1  # not representable in dtype
    expected_output = _assert_matches_reference_on_rounded_inputs(case, dtype)

    # Positions rounded to the tensor dtype (what half-precision coordinate math gives) would
    # miss that tolerance by far: the comparison above can tell the two apart.
    half_positions_case = replace(case, offset=positions.to(dtype).double() - (positions - case.offset.double()))
    half_math_output = deform_conv_reference(*half_positions_case.to(torch.float64).args())
    error = (half_math_output - expected_output).abs().max()
    assert error > 10 * HALF_REL[dtype] * expected_output.abs().max()


# Max error relative to the largest reference value, fp32 included (fp32 accumulation, one rounding).
REL = {torch.float32: 2e-5, **HALF_REL}


def _tiny_offsets_at_large_positions_case(dims, dtype, device):
    """An input 20000 (1-D) or 4100 (2-D and 3-D) samples long along the last axis, 32 channels (the
    fused CUDA kernels' smallest step); every offset a few units of 2^-14 either side of zero, exact
    in every dtype. In fp32, base + offset rounds to base for base >= 2048 (spacing 2^-12 and wider),
    which puts the points just below an integer in the cell above it: their offset gradients would
    take the slope of the wrong cell."""
    in_size = {1: (20000,), 2: (2, 4100), 3: (1, 2, 4100)}[dims]
    case = make_case(dims, dtype, batch=1, in_channels=32, out_channels=8, in_size=in_size, padding=1, seed=310)
    generator = torch.Generator().manual_seed(311)
    units = torch.randint(1, 6, case.offset.shape, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(case.offset.shape, generator=generator) < 0.5, -1.0, 1.0)
    return replace(case, offset=(sign * units * 2.0**-14).to(dtype)).to(device=device)


def _last_axis_positions(case):
    """Sample positions along the last axis in float64: (B, offset groups, K, *out_size)."""
    axis = case.dims - 1
    offset = case.offset.double().cpu().reshape(case.offset.shape[0], -1, case.kernel_points, case.dims, *case.out_size)
    return case.base_positions()[:, axis] + offset[:, :, :, axis]


# (dtype, device, DCNLAB_CUDA_PATH): the CPU's one path; CUDA's column path for every dtype and its
# fused kernels, which take half types only.
EXACT_CELL_PATHS = [
    *[pytest.param(dtype, "cpu", "auto", id=f"{dtype}-cpu") for dtype in (torch.float32, *HALF_TYPES)],
    *[
        pytest.param(dtype, "cuda", "im2col", id=f"{dtype}-cuda-im2col", marks=pytest.mark.gpu)
        for dtype in (torch.float32, *HALF_TYPES)
    ],
    *[pytest.param(dtype, "cuda", "fused", id=f"{dtype}-cuda-fused", marks=pytest.mark.gpu) for dtype in HALF_TYPES],
]


@pytest.mark.parametrize("dtype, device, path", EXACT_CELL_PATHS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tiny_offsets_at_large_positions_take_the_exact_cell(dims, dtype, device, path, monkeypatch):
    """The kernels keep the sample position as its integer part and the offset (cell base +
    floor(offset), fraction offset - floor(offset)) instead of summing them in fp32; against the
    float64 reference on every path (DCNLAB_CUDA_PATH: CUDA's fused and column paths, the fused one
    checked to have run; the CPU has one)."""
    monkeypatch.setenv("DCNLAB_CUDA_PATH", path)
    case = _tiny_offsets_at_large_positions_case(dims, dtype, device)
    positions = _last_axis_positions(case)
    large = positions > 2048
    assert large.float().mean() > 0.4
    assert (positions < torch.round(positions))[large].float().mean() > 0.4  # just below an integer
    assert (positions.float().double() != positions)[large].float().mean() > 0.7  # fp32 rounds most of them
    grad_output = random_grad_output(case)
    if path == "fused":  # and the fused kernels ran, not the column path that would pass too
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            output, grads = run_with_grads(deform_conv, case, grad_output)
            torch.cuda.synchronize()
        names = {event.name for event in prof.events()}
        for kernel in ("forward_kernel", "backward_kernel"):
            assert any("implicit_gemm" in name and kernel in name for name in names), names
    else:
        output, grads = run_with_grads(deform_conv, case, grad_output)
    expected_output, expected_grads = _reference_with_grads(case.to(device="cpu"), grad_output.cpu())
    assert_close_to_scale(output, expected_output, REL[dtype], "output")
    assert_grads_close(grads, expected_grads, REL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_dtype_equals_input_dtype(dims, dtype, device):
    case = make_case(dims, dtype, batch=1, in_channels=2, out_channels=2, kernel=2, device=device)
    output = deform_conv(*case.args())
    assert output.dtype == dtype
    assert output.device.type == device
    assert output.shape == case.output_shape
    assert torch.isfinite(output).all()


@pytest.mark.parametrize(
    "dtype, mask, bias",
    [(torch.bfloat16, True, True), (torch.float16, True, True), (torch.bfloat16, False, False)],
    ids=["bf16", "fp16", "bf16-no-mask-no-bias"],
)
def test_autocast_runs_op_in_autocast_dtype_and_grads_reach_fp32_leaves(dtype, mask, bias):
    case = make_case(2, torch.float32, in_channels=4, offset_groups=2, padding=1, mask=mask, bias=bias, seed=400)
    leaves = case.leaves()
    with torch.autocast("cpu", dtype=dtype):
        output = deform_conv(*leaves.args())
    assert output.dtype == dtype  # not upcast to fp32
    grad_output = random_grad_output(case).to(dtype)
    output.backward(grad_output)

    # Same as casting every input to the autocast dtype by hand, bit for bit, grads included.
    cast_output, cast_grads = run_with_grads(deform_conv, case.to(dtype), grad_output)
    assert torch.equal(output, cast_output)
    for name, leaf in leaves.tensors().items():
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == torch.float32, f"grad {name}: {leaf.grad.dtype}"
        assert torch.equal(leaf.grad, cast_grads[name].float()), name


def test_autocast_leaves_float64_inputs_in_float64():
    case = make_case(2, torch.float64, seed=401)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = deform_conv(*case.args())
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, deform_conv(*case.args()), rtol=0, atol=0)
