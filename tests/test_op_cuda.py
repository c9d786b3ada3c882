"""CUDA kernels of the op against the float64 reference, torchvision and the CPU path.

All tests here carry the `gpu` marker and are skipped where CUDA is absent; run them on the
lent GPU with scripts/gpu_check.sh.
"""

import pytest
import torch
import torchvision
from conftest import GRAD_NAMES, assert_close_to_scale, make_case, random_grad_output, run_with_grads

from dcnlab.ops import deform_conv, deform_conv2d, deform_conv_reference

pytestmark = pytest.mark.gpu

# Relative tolerance (to the largest magnitude of the expected tensor) per dtype. Half types are
# compared with the reference evaluated on the same rounded inputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCE)

CONFIGS = [
    dict(groups=2, offset_groups=2, stride=2, padding=1, dilation=1, offset_scale=2.0),
    dict(groups=1, offset_groups=1, stride=1, padding=2, dilation=2, offset_scale=1.0, mask=False),
    dict(groups=4, offset_groups=4, stride=(1, 2, 1), padding=(0, 1, 2), kernel=(2, 3, 1), bias=False),
    dict(groups=1, offset_groups=2, stride=1, padding=1, offset_scale=50.0),  # mostly far outside
]


def config_for(dims: int, config: dict) -> dict:
    """Trims per-axis tuples of a 3-D config to `dims` axes."""
    return {key: value[:dims] if isinstance(value, tuple) else value for key, value in config.items()}


def check_against_reference(case, dtype, device="cuda", seed=0):
    rounded = case.to(dtype=dtype).to(dtype=torch.float64)
    grad_output = random_grad_output(rounded, seed=seed)
    expected, expected_grads = run_with_grads(deform_conv_reference, rounded, grad_output)
    actual, grads = run_with_grads(deform_conv, case.to(dtype=dtype, device=device), grad_output.to(dtype).to(device))
    assert actual.dtype == dtype and actual.device.type == "cuda"
    rel = TOLERANCE[dtype]
    assert_close_to_scale(actual, expected, rel, "output")
    for name in GRAD_NAMES:
        if name in expected_grads:
            assert grads[name].dtype == dtype, name
            assert_close_to_scale(grads[name], expected_grads[name], rel, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_cuda_matches_float64_reference_on_output_and_all_gradients(dims, dtype, config):
    case = make_case(dims, in_channels=8, out_channels=8, seed=config, **config_for(dims, CONFIGS[config]))
    check_against_reference(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_2d_matches_torchvision(dtype):
    case = make_case(
        2,
        in_channels=8,
        out_channels=6,
        groups=2,
        offset_groups=2,
        in_size=(9, 11),
        stride=(1, 2),
        padding=1,
        dilation=(2, 1),
        offset_scale=1.5,
    )
    case = case.to(dtype=dtype, device="cuda")
    grad_output = random_grad_output(case)
    expected, expected_grads = run_with_grads(torchvision.ops.deform_conv2d, case, grad_output)
    actual, grads = run_with_grads(deform_conv2d, case, grad_output)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close_to_scale(actual, expected, rel, "output")
    for name in GRAD_NAMES:
        assert_close_to_scale(grads[name], expected_grads[name], rel, f"grad {name}")


@pytest.mark.parametrize("batch", [13, 17])
def test_cuda_prime_batch_split_into_chunks_matches_reference(batch):
    # 64 ch * 9 points * 96^2 positions = 5.3M column elements per sample: the 2^26 column
    # budget holds 12 samples, so a prime batch is split into uneven chunks.
    case = make_case(2, batch=batch, in_channels=64, out_channels=16, in_size=96, padding=1, seed=batch)
    cuda_case = case.to(device="cuda")
    grad_output = random_grad_output(cuda_case)
    expected, expected_grads = run_with_grads(deform_conv_reference, cuda_case, grad_output)
    actual, grads = run_with_grads(deform_conv, cuda_case, grad_output)
    assert_close_to_scale(actual, expected, 1e-10, "output")
    for name in GRAD_NAMES:
        assert_close_to_scale(grads[name], expected_grads[name], 1e-10, f"grad {name}")


def test_cuda_input_of_more_than_2_pow_31_elements():
    side = 46341  # side^2 > 2^31: flat indices near the end overflow int32
    input = torch.zeros(1, 1, side, side, device="cuda")
    corner_values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda")
    input[0, 0, side - 2 :, side - 2 :] = corner_values
    stride = 8192
    out = (side - 1) // stride + 1
    weight = torch.ones(1, 1, 1, 1, device="cuda")
    # Every output position samples the point (side - 1.75, side - 1.5), inside the last cell.
    target = torch.tensor([side - 2 + 0.25, side - 2 + 0.5], dtype=torch.float64)
    base = torch.stack(torch.meshgrid(torch.arange(out) * stride, torch.arange(out) * stride, indexing="ij"))
    offset = (target.view(2, 1, 1) - base).unsqueeze(0).float().cuda()
    expected_value = 1.0 * 0.75 * 0.5 + 2.0 * 0.75 * 0.5 + 3.0 * 0.25 * 0.5 + 4.0 * 0.25 * 0.5
    input.requires_grad_()
    result = deform_conv2d(input, offset, weight, stride=stride)
    assert result.shape == (1, 1, out, out)
    torch.testing.assert_close(result, torch.full_like(result, expected_value))
    (grad_input,) = torch.autograd.grad(result.sum(), input)
    expected_corner_grads = torch.tensor([[0.375, 0.375], [0.125, 0.125]], device="cuda") * out * out
    torch.testing.assert_close(grad_input[0, 0, side - 2 :, side - 2 :], expected_corner_grads)
    assert grad_input.abs().sum().item() == pytest.approx(out * out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_autocast_runs_in_autocast_dtype(dtype):
    case = make_case(2, in_channels=8, out_channels=8, padding=1, offset_groups=2).to(torch.float32, "cuda")
    leaves = case.leaves()
    with torch.autocast("cuda", dtype=dtype):
        out = deform_conv(*leaves.args())
    assert out.dtype == dtype
    out.float().sum().backward()
    for name, tensor in leaves.tensors().items():
        assert tensor.grad is not None and tensor.grad.dtype == torch.float32, name
    rounded = case.to(dtype=dtype).to(dtype=torch.float64)
    assert_close_to_scale(out, deform_conv_reference(*rounded.args()), TOLERANCE[dtype], "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_torch_compile_inductor_matches_eager(dtype):
    case = make_case(2, in_channels=8, out_channels=8, padding=1).to(dtype, "cuda")

    def layer(input, offset, weight, bias, mask):
        return torch.relu(deform_conv2d(input, offset, weight, bias, padding=1, mask=mask)) * 2

    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    eager_leaves, compiled_leaves = case.leaves(), case.leaves()
    names = ["input", "offset", "weight", "bias", "mask"]
    eager = layer(*[getattr(eager_leaves, n) for n in names])
    result = compiled(*[getattr(compiled_leaves, n) for n in names])
    torch.testing.assert_close(result, eager)
    grad = torch.randn_like(eager)
    eager.backward(grad)
    result.backward(grad)
    for name in names:
        torch.testing.assert_close(getattr(compiled_leaves, name).grad, getattr(eager_leaves, name).grad)


def test_cuda_non_contiguous_and_channels_last_match_contiguous():
    case = make_case(2, batch=3, in_channels=8, out_channels=8, padding=1, offset_groups=2).to(device="cuda")
    expected = deform_conv(*case.args())
    channels_last = case.map(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    torch.testing.assert_close(deform_conv(*channels_last.args()), expected, rtol=0, atol=1e-12)
    transposed = case.map(lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 else t[::1])
    torch.testing.assert_close(deform_conv(*transposed.args()), expected, rtol=0, atol=1e-12)


def test_cuda_non_finite_and_huge_offsets_contribute_zero():
    case = make_case(2, in_channels=4, out_channels=4, padding=1, offset_groups=2)
    flat = case.offset.view(-1)
    for i, value in enumerate([float("nan"), float("inf"), float("-inf"), 1e30, -3e9, 2.5e9]):
        flat[i * 37] = value
    # The reference gives such points zero value and zero gradient, as the contract says.
    check_against_reference(case, torch.float32)
    check_against_reference(case, torch.float64)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_a_non_current_device():
    case = make_case(2, in_channels=4, out_channels=4, padding=1).to(device="cuda:1")
    with torch.cuda.device(0):
        out = deform_conv(*case.args())
    torch.testing.assert_close(out.cpu(), deform_conv(*case.to(device="cpu").args()))


# (batch, channels, spatial): rows of every vector width the bias-gradient kernel takes for 16-bit
# types (8, 4, 2 and 1 elements: plane % 8 == 0, 196, 4098, odd) with one and several runs per
# channel, and fp32/fp64 rows of 4 and 2.
BIAS_GRAD_SHAPES = [
    (2, 3, (5, 7)),
    (2, 4, (128, 128)),
    (32, 8, (14, 14)),
    (3, 5, (4098,)),
    (3, 4, (4099,)),
    (1, 2, (3, 5, 7)),
]


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BIAS_GRAD_SHAPES, ids=str)
def test_cuda_bias_gradient_is_the_deterministic_channel_sum(shape, dtype, misaligned):
    batch, channels, spatial = shape
    dims = len(spatial)
    generator = torch.Generator().manual_seed(channels)
    grad_output = torch.randn(batch, channels, *spatial, generator=generator, dtype=torch.float64) + 0.25
    # A 1x1 conv of stride 1 keeps the output's shape equal to the input's.
    input = torch.zeros(batch, 1, *spatial, dtype=dtype, device="cuda")
    offset = torch.zeros(batch, dims, *spatial, dtype=dtype, device="cuda")
    weight = torch.zeros(channels, 1, *([1] * dims), dtype=dtype, device="cuda")

    def to_cuda(values):
        if not misaligned:
            return values.to(dtype).to("cuda")
        # A contiguous view one element into its storage: single-element loads.
        return torch.empty(values.numel() + 1, dtype=dtype, device="cuda")[1:].view(values.shape).copy_(values)

    def bias_grad(grad):
        results = torch.ops.dcnlab.deform_conv_backward(
            grad, input, offset, weight, None, [1] * dims, [0] * dims, [1] * dims, [False, False, False, True, False]
        )
        return results[3]

    grad = to_cuda(grad_output)
    actual = bias_grad(grad)
    assert actual.shape == (channels,) and actual.dtype == dtype
    rounded = grad.to(torch.float64).cpu()
    reduced = [0, *range(2, 2 + dims)]
    expected = rounded.sum(reduced)
    # One rounding to the dtype, plus the fp32 (fp64) accumulation of the terms.
    rounding = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, torch.finfo(dtype).eps)
    accumulation = 1e-12 if dtype == torch.float64 else 1e-6
    bound = rounding * expected.abs() + accumulation * rounded.abs().sum(reduced)
    assert ((actual.to(torch.float64).cpu() - expected).abs() <= bound).all(), (actual, expected)
    assert torch.equal(bias_grad(grad), actual)  # fixed order: bitwise equal run to run
    # Entries of +-1: every partial sum is an exact integer in fp32, so the result must be the exact
    # sum rounded once to the dtype; an element missed or counted twice changes it (sums of up to
    # 256 in magnitude are exact even in bf16).
    signs = (torch.randint(0, 2, grad_output.shape, generator=generator) * 2 - 1).to(torch.float64)
    exact = signs.sum(reduced).to(dtype)
    assert torch.equal(bias_grad(to_cuda(signs)).cpu(), exact), (bias_grad(to_cuda(signs)), exact)
