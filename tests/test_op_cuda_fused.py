"""The fused (implicit-GEMM) CUDA paths against the float64 reference, next to the im2col path.

The fused forward and backward take half types where C_in/groups and C_in/offset_groups are
multiples of 32 and C_in/groups, C_out/groups are at most 128 (the backward outside deterministic
mode). DCNLAB_CUDA_PATH=im2col forces the column path, =fused the fused kernels wherever they can
run (past 128 channels per group too). A profiler check makes sure
each test runs the path it names. All tests carry the `gpu` marker.
"""

import dataclasses
import math

import pytest
import torch
from conftest import GRAD_NAMES, assert_close_to_scale, make_case, random_grad_output, run_with_grads
from test_op_cuda import check_against_reference

from dcnlab.ops import deform_conv, deform_conv_reference

pytestmark = pytest.mark.gpu

HALF_TYPES = [torch.bfloat16, torch.float16]

# Each needs C_in/groups and C_in/offset_groups to be multiples of 32 for the fused forward. Sizes
# make B*L and C_out/groups miss the 128-row and 64/128-column tiles.
FUSED_CONFIGS = [
    dict(in_channels=32, out_channels=40, padding=1),
    dict(in_channels=64, out_channels=160, groups=2, offset_groups=2, stride=2, padding=1, offset_scale=2.0),
    dict(in_channels=64, out_channels=24, offset_groups=2, padding=2, dilation=2, mask=False, bias=False),
    dict(in_channels=96, out_channels=72, groups=3, offset_groups=1, padding=1, offset_scale=50.0),
    dict(in_channels=32, out_channels=8, kernel=(1, 2, 3), stride=(2, 1, 1), padding=(0, 1, 1), batch=5),
    dict(in_channels=64, out_channels=64, padding=1),  # the backward's 64-channel chunks
    dict(in_channels=128, out_channels=100, padding=1),  # 64-channel chunks, 128-column tiles, summed offsets
]


def config_for(dims: int, config: dict) -> dict:
    return {key: value[:dims] if isinstance(value, tuple) else value for key, value in config.items()}


def kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("path", ["fused", "im2col"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", range(len(FUSED_CONFIGS)))
def test_fused_and_im2col_paths_match_float64_reference(dims, dtype, config, path, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", path)
    case = make_case(dims, seed=10 + config, **config_for(dims, FUSED_CONFIGS[config]))
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    names = kernel_names(lambda: fused_forward_backward(cuda_case))
    assert any("implicit_gemm" in name and "forward_kernel" in name for name in names) == (path == "fused"), names
    assert any("implicit_gemm" in name and "backward_kernel" in name for name in names) == (path == "fused"), names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("in_channels, groups", [(32, 1), (32, 2), (6, 1), (40, 1)])
def test_im2col_sampling_kernels_are_register_capped_only_for_2d_half_types(
    dims, dtype, in_channels, groups, monkeypatch
):
    """The capped variants (more blocks per SM, measured for 2D half types) run exactly there, except
    that the sampling gradients of half types with one conv group and 4-channel packs take the
    paired body (two packs per lane, capped at 2 blocks per SM, not 3): 32 channels (16 per offset group: packs of 8 in
    1-D and 2-D, where one lane has both, of 4 in 3-D), 40 (20 per offset group, packs of 4: some
    lanes have one); 6 channels are single channels."""
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "im2col")
    case = make_case(dims, seed=3, in_channels=in_channels, out_channels=8, groups=groups, padding=1, offset_groups=2)
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    names = kernel_names(lambda: fused_forward_backward(cuda_case))
    capped = dims == 2 and dtype != torch.float32
    paired = dtype != torch.float32 and groups == 1 and in_channels % 8 == 0
    for kernel in ("sample_columns", "sampling_grads"):
        kernels = {name for name in names if kernel in name}
        assert len(kernels) == 1, names
        if kernel == "sampling_grads" and paired:
            assert "sampling_grads_paired_kernel" in kernels.pop(), names
            continue
        assert any(f"{kernel}_capped_kernel" in name for name in kernels) == capped, names
        assert any(f"{kernel}_kernel" in name for name in kernels) == (not capped), names


def fused_forward_backward(case) -> None:
    leaves = case.leaves()
    deform_conv(*leaves.args()).sum().backward()


def check_fused_backward(case, dtype) -> None:
    """The case against the float64 reference, and that its backward ran the fused kernel."""
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    assert any("backward_kernel" in name for name in kernel_names(lambda: fused_forward_backward(cuda_case)))


# L = prod(out_size) a multiple of 8 takes the backward's 16-byte grad-output copies. The backward
# works on chunks of 64 channels where C_in/groups, C_in/offset_groups are multiples of 64 and
# C_out/groups <= 64 (<= 128 in 1D), else 32; an offset group of one chunk gets its offset and mask
# gradients written directly, of several summed over the chunks.
VECTOR_CONFIGS = [
    dict(in_channels=64, out_channels=48, offset_groups=1, padding=1, in_size=(16, 8, 4)),
    dict(in_channels=64, out_channels=128, offset_groups=2, padding=1, in_size=(16, 8, 4), batch=3),
    dict(in_channels=96, out_channels=16, offset_groups=1, stride=2, padding=1, in_size=(32, 16, 8), mask=False),
    dict(in_channels=64, out_channels=64, groups=2, offset_groups=2, padding=1, in_size=(16, 8, 4), offset_scale=20.0),
    dict(in_channels=64, out_channels=96, offset_groups=1, padding=1, in_size=(16, 8, 4)),
    dict(in_channels=128, out_channels=48, padding=1, in_size=(16, 8, 4)),  # two 64-channel chunks per offset group
]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", range(len(VECTOR_CONFIGS)))
def test_fused_backward_with_aligned_positions_matches_reference(dims, dtype, config, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(dims, seed=20 + config, **config_for(dims, VECTOR_CONFIGS[config]))
    assert math.prod(case.out_size) % 8 == 0
    check_fused_backward(case, dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_fused_backward_blocks_over_several_columns(dtype, monkeypatch):
    # One block per (column, position split), column = (conv group, kernel point, channel chunk):
    # twenty groups x 27 kernel points of one 128-position tile are 540 columns, more blocks than
    # one wave (2 x 132 on H100/H200), each with its own weight slice, weight-gradient atomics and
    # bias row.
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(
        3, batch=1, in_channels=640, out_channels=640, groups=20, offset_groups=20, in_size=(4, 4, 8), padding=1, seed=9
    )
    check_fused_backward(case, dtype)


@pytest.mark.parametrize("channels, fused", [(64, True), (128, True), (256, False)])
def test_per_shape_pick(channels, fused):
    # Without DCNLAB_CUDA_PATH the forward and the backward are fused up to 128 channels per group.
    case = make_case(2, in_channels=channels, out_channels=channels, padding=1, in_size=8)
    names = kernel_names(lambda: fused_forward_backward(case.to(dtype=torch.bfloat16, device="cuda")))
    assert any("forward_kernel" in name and "implicit_gemm" in name for name in names) == fused, names
    assert any("backward_kernel" in name and "implicit_gemm" in name for name in names) == fused, names


# Wider than one 128-channel tile of output channels per group: the backward sums the grad columns
# over the tiles (the last one partial here) and computes the weight gradient one tile per launch.
WIDE_CONFIGS = [
    dict(in_channels=64, out_channels=160, padding=1),
    dict(in_channels=64, out_channels=600, groups=2, offset_groups=2, stride=2, padding=1, offset_scale=3.0),
    dict(in_channels=160, out_channels=256, offset_groups=5, padding=1, mask=False, in_size=(16, 8, 4)),
]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", range(len(WIDE_CONFIGS)))
def test_fused_backward_over_several_output_tiles_matches_reference(dims, dtype, config, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    check_fused_backward(make_case(dims, seed=30 + config, **config_for(dims, WIDE_CONFIGS[config])), dtype)


# 1-D forward: a contiguous input is read through per-tile windows in shared memory (corners
# beyond them, e.g. of large offsets or of a tile's second sample, from global memory); an input
# in channels-last order, or one whose window would not fit (dilation 150), is read channels-last.
WINDOW_CONFIGS = [
    dict(in_channels=64, out_channels=64, kernel=9, padding=4, in_size=300),
    dict(in_channels=64, out_channels=96, kernel=9, padding=4, stride=2, in_size=300, offset_scale=20.0),
    dict(in_channels=32, out_channels=160, kernel=3, padding=1, in_size=202, offset_groups=1),
    dict(in_channels=32, out_channels=32, kernel=9, padding=600, dilation=150, in_size=300),
    # Lengths that are multiples of 8 take the window copy by 16-byte runs: windows that start
    # before the input and end past it, runs across a 32-byte sector (264), large offsets.
    dict(in_channels=64, out_channels=64, kernel=9, padding=4, in_size=256),
    dict(in_channels=96, out_channels=40, kernel=5, padding=6, in_size=264, offset_scale=20.0),
    dict(in_channels=32, out_channels=64, kernel=3, padding=1, stride=3, in_size=8),
    # Windows wholly before the input (window_lo = -308) and tiles wholly past it: all-zero runs.
    dict(in_channels=32, out_channels=32, kernel=3, padding=300, in_size=16),
]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("config", range(len(WINDOW_CONFIGS)))
def test_fused_1d_forward_reads_any_input_layout_alike(dtype, config, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(1, batch=3, seed=40 + config, **WINDOW_CONFIGS[config])
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    expected = deform_conv(*cuda_case.args())
    channels_last = cuda_case.map(lambda t: t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 3 else t)
    assert channels_last.input.transpose(1, 2).is_contiguous()
    # The same stencils and the same order of operations: equal bit for bit.
    torch.testing.assert_close(deform_conv(*channels_last.args()), expected, rtol=0, atol=0)


# The forward's epilogue stores a run of 8 tile rows as one 16-byte store where its positions are
# contiguous in the output: with one output channel, runs that cross samples are (and take it);
# with two conv groups of one channel each they are not (element by element).
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_forward_output_runs_across_samples(groups, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(
        1,
        batch=8,
        in_channels=32 * groups,
        out_channels=groups,
        groups=groups,
        offset_groups=groups,
        in_size=5,
        padding=1,
        seed=52,
    )
    check_against_reference(case, torch.bfloat16)
    cuda_case = case.to(dtype=torch.bfloat16, device="cuda")
    names = kernel_names(lambda: deform_conv(*cuda_case.args()))
    assert any("implicit_gemm" in name and "forward_kernel" in name for name in names), names


@pytest.mark.parametrize("stride, dilation, padding", [(33818640, 1, 0), (1, 2**30, 2**30)])
def test_fused_1d_forward_with_huge_stride_or_dilation(stride, dilation, padding, monkeypatch):
    # The input window would span ~2^32 positions: the forward must not take it (its size was
    # once narrowed to 32 bits before the shared-memory check), and reads channels-last instead.
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    kernel = 1 if dilation == 1 else 3
    case = make_case(
        1,
        batch=1,
        in_channels=32,
        out_channels=32,
        in_size=2,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        seed=50,
    )
    check_against_reference(case, torch.bfloat16)


def test_fused_backward_of_a_misaligned_input_whose_samples_are_channels_last():
    # (2, 64, 40000) over a channels-last buffer with a padded batch stride, 2 bytes off a 16-byte
    # boundary: the input as a whole is not channels-last (so no alignment check applies to it),
    # but each one-sample chunk of the backward is; such a chunk must be copied, not read in place.
    generator = torch.Generator(device="cuda").manual_seed(0)
    storage = torch.randn(2 * 40001 * 64 + 1, device="cuda", generator=generator).to(torch.bfloat16)
    misaligned = storage[1:].view(2, 40001, 64)[:, :40000].movedim(-1, 1)
    assert misaligned.data_ptr() % 16 != 0 and not misaligned.movedim(1, -1).is_contiguous()
    case = make_case(1, batch=2, in_channels=64, out_channels=64, in_size=40000, padding=1, seed=51)
    case = dataclasses.replace(case.to(dtype=torch.bfloat16, device="cuda"), input=misaligned)
    grad_output = random_grad_output(case)
    leaves = case.leaves().tensors()
    leaves["input"] = misaligned.detach().requires_grad_()  # leaves() would clone it contiguous
    output = deform_conv(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], 1, 1, 1, leaves["mask"])
    grads = torch.autograd.grad(output, list(leaves.values()), grad_output)
    _, expected = run_with_grads(deform_conv, dataclasses.replace(case, input=misaligned.contiguous()), grad_output)
    for name, grad in zip(leaves, grads, strict=True):
        assert_close_to_scale(grad, expected[name], 1e-2, f"grad {name}")


@pytest.mark.parametrize("out_channels", [32, 300])
@pytest.mark.parametrize("wanted", [("weight",), ("input",), ("offset",), ("mask",), ("offset", "weight", "bias")])
def test_fused_backward_computes_any_subset_of_gradients(wanted, out_channels, monkeypatch):
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")  # 300: three output tiles
    case = make_case(2, in_channels=64, out_channels=out_channels, padding=1, in_size=8, seed=7)
    rounded = case.to(dtype=torch.bfloat16).to(dtype=torch.float64)
    grad_output = random_grad_output(rounded)
    _, expected = run_with_grads(deform_conv_reference, rounded, grad_output)
    leaves = case.to(dtype=torch.bfloat16, device="cuda").leaves(requires_grad=False)
    tensors = leaves.tensors()
    for name in wanted:
        tensors[name].requires_grad_(True)
    out = deform_conv(*leaves.args())
    grads = torch.autograd.grad(out, [tensors[name] for name in wanted], grad_output.to(out))
    for name, grad in zip(wanted, grads, strict=True):
        assert_close_to_scale(grad, expected[name], 3e-2, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(
    "dims, in_channels, out_channels, in_size, batch, fused",
    [
        (2, 64, 48, (128, 128), 5, True),
        (2, 32, 96, (64, 64), 3, True),
        (3, 32, 64, (8, 8, 6), 3, True),
        (2, 64, 72, (24, 24), 3, True),  # with groups=2 below: 36 output channels per group
        (1, 128, 128, 4096, 9, False),
        (2, 64, 160, 8, 2, False),
    ],
)
def test_backward_bias_gradient_is_exact_and_deterministic(
    dims, dtype, in_channels, out_channels, in_size, batch, fused
):
    # The fused backward kernels with one tile of output channels, except the 1-D 128 x 64 one, sum
    # the bias gradient in their weight-gradient product (grad-output tiles @ ones), the tiles dealt
    # out to the kernel-point blocks; the others leave it to the channel-sum kernel. With entries of
    # +-1 every partial sum is an exact integer in fp32, so the result is the exact sum rounded
    # once: a tile missed or counted twice changes it. Two launches (5 x 1 Mi and 9 x 0.5 Mi
    # grad_input elements), both tile widths (64 and 128 output channels), a 3-D case, two conv
    # groups of 36 output channels (fragment rows past the group's last channel), the 1-D kernel and
    # 160 output channels (the im2col backward).
    groups = 2 if out_channels == 72 else 1
    case = make_case(
        dims,
        batch=batch,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        offset_groups=groups,
        in_size=in_size,
        padding=1,
    )
    leaves = case.to(dtype=dtype, device="cuda").leaves()
    out = deform_conv(*leaves.args())
    generator = torch.Generator().manual_seed(3)
    signs = (torch.randint(0, 2, out.shape, generator=generator) * 2 - 1).to(torch.float64)
    exact = signs.sum([0, *range(2, 2 + dims)]).to(dtype)
    wanted = [leaves.weight, leaves.bias]
    names = kernel_names(lambda: torch.autograd.grad(out, wanted, signs.to(out), retain_graph=True))
    assert any("implicit_gemm" in name and "backward_kernel" in name for name in names) == (out_channels <= 128)
    assert any("channel_sums" in name for name in names) == (not fused), names
    first = torch.autograd.grad(out, wanted, signs.to(out), retain_graph=True)
    second = torch.autograd.grad(out, wanted, signs.to(out))
    assert torch.equal(first[1].cpu(), exact), (first[1], exact)
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "in_channels, out_channels, in_size", [(64, 64, (128, 128)), (32, 128, (128, 256)), (32, 288, (128, 256))]
)
def test_fused_backward_over_several_sample_chunks_matches_im2col(in_channels, out_channels, in_size, monkeypatch):
    # 9 samples of 1 Mi fp32 grad_input elements each are more than the fused backward's 4 Mi-element
    # buffer: three launches of 3 samples, each with its own channels-last copy of the input, the
    # weight gradient accumulating over them (64 and 128 output channels: both tile widths; 288:
    # three tiles, forced). A channels_last input is read in place and gives the same gradients.
    if out_channels > 128:
        monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(
        2, batch=9, in_channels=in_channels, out_channels=out_channels, in_size=in_size, padding=1, offset_scale=2.0
    )
    case = case.to(dtype=torch.bfloat16, device="cuda")
    grad_output = random_grad_output(case)
    names = kernel_names(lambda: run_with_grads(deform_conv, case, grad_output))
    assert any("backward_kernel" in name for name in names), names
    _, fused = run_with_grads(deform_conv, case, grad_output)
    channels_last = case.map(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    assert channels_last.input.is_contiguous(memory_format=torch.channels_last)
    _, fused_channels_last = run_with_grads(deform_conv, channels_last, grad_output)
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "im2col")
    _, im2col = run_with_grads(deform_conv, case, grad_output)
    for name in GRAD_NAMES:
        assert_close_to_scale(fused[name], im2col[name].float(), 2e-2, f"grad {name}")
        assert_close_to_scale(fused_channels_last[name], fused[name].float(), 1e-2, f"grad {name} (channels_last)")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_fused_forward_with_non_finite_and_far_offsets(dtype):
    case = make_case(2, in_channels=32, out_channels=16, padding=1, offset_groups=1, seed=3)
    flat = case.offset.view(-1)
    for i, value in enumerate([float("nan"), float("inf"), float("-inf"), 1e30, -3e4, 2.5e4]):
        flat[i * 37] = value
    check_against_reference(case, dtype)


def test_fused_forward_used_under_autocast_and_matches_fp32():
    case = make_case(2, batch=3, in_channels=64, out_channels=64, in_size=12, padding=1, seed=5).to(
        torch.float32, "cuda"
    )
    expected = deform_conv(*case.args())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        names = kernel_names(lambda: deform_conv(*case.args()))
        actual = deform_conv(*case.args())
    assert any("implicit_gemm" in name for name in names), names
    scale = expected.abs().max()
    assert (actual.float() - expected).abs().max() <= 3e-2 * scale


def test_backward_under_deterministic_algorithms_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for deterministic GEMMs
    case = make_case(2, in_channels=32, out_channels=8, padding=1).to(torch.bfloat16, "cuda")
    leaves = case.leaves()
    out = deform_conv(*leaves.args())
    grad_output = random_grad_output(case).to(out)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deform_conv_backward.*atomic"):
            torch.autograd.grad(out, [leaves.input], grad_output, retain_graph=True)
        # Without the input gradient every gradient is deterministic: bitwise equal run to run.
        out = deform_conv(leaves.input.detach(), leaves.offset, leaves.weight, leaves.bias, 1, 1, 1, leaves.mask)
        others = [leaves.offset, leaves.weight, leaves.bias, leaves.mask]
        first = torch.autograd.grad(out, others, grad_output, retain_graph=True)
        second = torch.autograd.grad(out, others, grad_output)
        for name, a, b in zip(GRAD_NAMES[1:], first, second, strict=True):
            assert torch.equal(a, b), name
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_forced_fused_path_with_wide_tiles_matches_reference(dims, dtype, monkeypatch):
    # DCNLAB_CUDA_PATH=fused takes the fused forward past the per-shape pick: C_out/G = 160 uses
    # the 64 x 256 tiles (one partial tile of output channels), C_in/G = 160 five channel chunks.
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "fused")
    case = make_case(dims, in_channels=160, out_channels=160, offset_groups=5, padding=1, batch=3, seed=dims)
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    assert any("implicit_gemm" in name for name in kernel_names(lambda: deform_conv(*cuda_case.args())))


@pytest.mark.parametrize("path", ["fused", "im2col"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(
    "in_channels, in_size, batch, offset_bytes, by_eight",
    [
        (64, (4096,), 2, 0, True),  # whole 32 x 64 tiles of the 8 x 8 register transposes
        (40, (72,), 3, 0, True),  # partial tiles on both sides, both ways (40 x 72 and 72 x 40)
        (32, (6, 12), 3, 0, True),
        (32, (2, 4, 5), 2, 0, True),
        (36, (5, 7), 2, 0, False),  # sides that are not multiples of 8: the shared-memory tiles
        (32, (6, 12), 3, 2, None),  # an input 2 bytes off a 16-byte boundary (grad_input is aligned)
        (32, (64,), 2, 2, None),  # the same in 1-D: the window copy element by element
    ],
)
def test_layout_copies_are_exact(in_channels, in_size, batch, offset_bytes, by_eight, dtype, path, monkeypatch):
    # The input's copy to channels-last and the fp32 grad_input buffer's copy back to (B, C, *size)
    # are pure copies (and one rounding): with zero offsets, a mask of ones and small integers every
    # sum is exact in fp32, so the output and the input gradient equal the dense conv's in float64,
    # rounded once, bit for bit; an element copied to or from the wrong place changes them. cuBLAS
    # (the im2col path's GEMM) must not add split-K partial sums in 16 bits for that. 40 and 36
    # channels are not fusable: both settings of the path run im2col there.
    monkeypatch.setenv("DCNLAB_CUDA_PATH", path)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
    dims = len(in_size)
    generator = torch.Generator().manual_seed(11)
    input = torch.randint(-3, 4, (batch, in_channels, *in_size), generator=generator).to(torch.float64)
    weight = torch.randint(-2, 3, (16, in_channels, *([3] * dims)), generator=generator).to(torch.float64)
    grad_output = torch.randint(-2, 3, (batch, 16, *in_size), generator=generator).to(torch.float64)
    conv = [torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][dims - 1]
    reference_input = input.clone().requires_grad_()
    expected = conv(reference_input, weight, padding=1)
    (expected_grad_input,) = torch.autograd.grad(expected, reference_input, grad_output)

    shift = offset_bytes // 2
    storage = torch.zeros(input.numel() + 8, dtype=dtype, device="cuda")
    cuda_input = storage[shift : shift + input.numel()].view(input.shape)
    cuda_input.copy_(input)
    assert (cuda_input.data_ptr() % 16 == 0) == (offset_bytes == 0)
    cuda_input.requires_grad_()
    offset = torch.zeros(batch, 3**dims * dims, *in_size, dtype=dtype, device="cuda")
    mask = torch.ones(batch, 3**dims, *in_size, dtype=dtype, device="cuda")
    cuda_weight = weight.to(dtype=dtype, device="cuda")

    def forward_backward():
        out = deform_conv(cuda_input, offset, cuda_weight, None, 1, 1, 1, mask)
        return out, torch.autograd.grad(out, cuda_input, grad_output.to(out))[0]

    names = kernel_names(forward_backward)
    if by_eight is not None:  # both copies: the input's (16-bit) and grad_input's (from fp32)
        for source in ("transpose8_kernel<c10::", "transpose8_kernel<float"):
            assert any(source in name for name in names) == by_eight, names
    out, grad_input = forward_backward()
    assert torch.equal(out.cpu(), expected.to(dtype))
    assert torch.equal(grad_input.cpu(), expected_grad_input.to(dtype))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(
    "dims, in_channels, offset_groups",
    [(2, 136, 1), (2, 408, 3), (1, 256, 1), (3, 2048, 1), (2, 4096, 4)],
)
def test_paired_im2col_forward_writes_the_unpaired_columns(dims, dtype, in_channels, offset_groups, monkeypatch):
    """The paired sample_columns body (two packs per lane, 128+ channels per offset group) against
    the general body, bit for bit: 136 channels (17 packs: only lane 0 of a 16-lane team has a
    second pack), 3 offset groups of 136, 1-D, 3-D with several pairs per lane, 4 offset groups of
    1024; offsets far enough out that corners fall outside."""
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "im2col")
    case = make_case(
        dims, seed=4, in_channels=in_channels, out_channels=8, offset_groups=offset_groups, padding=1, offset_scale=3.0
    ).to(dtype=dtype, device="cuda")
    leaves = case.leaves(requires_grad=False)
    leaves.weight.requires_grad_()  # a weight-only backward samples the columns again
    grad_output = random_grad_output(case)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        output = deform_conv(*leaves.args())
        return output, torch.autograd.grad(output, leaves.weight, grad_output)[0]

    assert any("sample_columns_paired" in name for name in kernel_names(run))
    paired = run()
    monkeypatch.setenv("DCNLAB_UNPAIRED_FORWARD", "1")
    assert not any("sample_columns_paired" in name for name in kernel_names(run))
    unpaired = run()
    assert torch.equal(paired[0], unpaired[0])
    assert torch.equal(paired[1], unpaired[1])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(
    "dims, in_channels, offset_groups, extra",
    [
        (2, 256, 1, {}),
        (2, 136, 1, {}),
        (2, 384, 3, dict(stride=2, dilation=2, padding=2)),
        (1, 264, 1, {}),
        (2, 2048, 2, {}),
    ],
)
def test_sampling_grads_in_packs_of_eight_match_reference_and_packs_of_four(
    dims, dtype, in_channels, offset_groups, extra, monkeypatch
):
    """DCNLAB_GRADS_PACK=8: the paired sampling-gradient kernel with packs of 8 channels (16-byte
    corner loads, the grad_input reductions in the layout of packs of 4) against the float64
    reference and against packs of 4: 256 channels (16-lane teams, two positions per warp), 136
    (17 packs: lane 0 of a 16-lane team alone has a second pack, lane 1 reduces into it), 3 offset
    groups of 128 with stride and dilation 2, 1-D with 264 (33 packs), 2 offset groups of 1024
    (several pairs per lane); offsets far enough out that corners fall outside. The sampled columns
    (and so the weight gradient) are the same bit for bit."""
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "im2col")
    case = make_case(
        dims,
        seed=9,
        in_channels=in_channels,
        out_channels=8,
        offset_groups=offset_groups,
        offset_scale=3.0,
        **{"padding": 1, **extra},
    )
    monkeypatch.setenv("DCNLAB_GRADS_PACK", "8")
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    grad_output = random_grad_output(cuda_case)

    def run() -> tuple[torch.Tensor, dict]:
        return run_with_grads(deform_conv, cuda_case, grad_output)

    def uses_pack(pack: int) -> bool:
        return any(f"sampling_grads_paired_kernel<{dims}, {pack}," in name for name in kernel_names(run))

    assert uses_pack(8)
    wide = run()
    monkeypatch.setenv("DCNLAB_GRADS_PACK", "4")
    assert uses_pack(4)
    narrow = run()
    assert torch.equal(wide[0], narrow[0])
    assert torch.equal(wide[1]["weight"], narrow[1]["weight"])
    # The same fp32 terms summed in another order, then rounded: at most about one unit of the dtype.
    rounding = 2 * torch.finfo(dtype).eps
    for name in ("input", "offset", "mask"):
        assert_close_to_scale(wide[1][name], narrow[1][name], rounding, f"grad {name}")


@pytest.mark.parametrize("pack", ["8", "4"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("in_channels, offset_groups", [(256, 1), (136, 1), (2048, 2), (128, 1)])
def test_paired_sampling_grads_merge_corners_shared_with_the_next_position(
    in_channels, offset_groups, dtype, pack, monkeypatch
):
    """The 2-D paired sampling-gradient kernel adds a corner that is also one of the team's next
    position into that position's grad_input reduction. Offsets near a constant (0.3, -0.6) make two
    of each position's four corners those of its right-hand neighbour, with nonzero weights on both
    sides; against the float64 reference. Packs of 8: teams of 16 lanes (256 and 136 channels, 4
    positions each), of 32 (1024 channels per offset group, 8 positions, two channel runs) and of 8
    (128 channels, 2 positions: one merge per team and task); packs of 4: teams of 32 lanes (8
    positions) and of 16 (128 channels)."""
    monkeypatch.setenv("DCNLAB_CUDA_PATH", "im2col")
    monkeypatch.setenv("DCNLAB_GRADS_PACK", pack)
    case = make_case(
        2, seed=12, in_channels=in_channels, out_channels=8, offset_groups=offset_groups, padding=1, in_size=(6, 9)
    )
    generator = torch.Generator().manual_seed(13)
    near = torch.tensor([0.3, -0.6], dtype=torch.float64).repeat(case.offset.shape[1] // 2).view(1, -1, 1, 1)
    offset = near + 0.02 * torch.randn(case.offset.shape, generator=generator, dtype=torch.float64)
    case = dataclasses.replace(case, offset=offset)
    check_against_reference(case, dtype)
    # The merging kernel ran (not another path that the reference comparison would pass too).
    cuda_case = case.to(dtype=dtype, device="cuda")
    names = kernel_names(lambda: fused_forward_backward(cuda_case))
    assert any(f"sampling_grads_paired_kernel<2, {pack}," in name for name in names), names


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=64, out_channels=64, padding=1, offset_scale=2.0),
        dict(in_channels=128, out_channels=40, groups=2, offset_groups=2, stride=2, padding=1, offset_scale=20.0),
        dict(in_channels=128, out_channels=64, padding=2, dilation=2, mask=False, bias=False),
        dict(in_channels=128, out_channels=48, offset_groups=2, padding=1),  # offset groups change within a point
        dict(in_channels=128, out_channels=64, groups=2, offset_groups=1, padding=1),  # one offset group, two groups
    ],
)
def test_fused_forward_in_steps_of_64_channels_matches_steps_of_32(dims, dtype, config, monkeypatch):
    """Where C_in/G and C_in/offset_groups are multiples of 64 and C_out/G is at most 64, the 2-D and 3-D
    fused forward takes steps of 64 channels (128-byte swizzled operand rows; wide_steps()). Its products
    add the same terms in the same order as steps of 32 (DCNLAB_FWD_BK=32), so the outputs agree bit for
    bit; and the case against the float64 reference. The configurations cover a partial output tile,
    two conv and offset groups, two steps per kernel point, offsets far outside the input."""
    in_size = {2: (9, 14), 3: (5, 6, 7)}[dims]
    case = make_case(dims, seed=21, in_size=in_size, **config)
    check_against_reference(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")

    def forward():
        return deform_conv(*cuda_case.args())

    # Steps of 64 only where two of their blocks (65 KiB in 2-D, 78 KiB in 3-D) fit on an SM: not on
    # cards with 100 KiB per SM (sm_86, sm_89), which keep steps of 32 (and have nothing to compare).
    if torch.cuda.get_device_properties(0).shared_memory_per_multiprocessor < 2 * (80 << 10):
        pytest.skip("this card fits one block of the 64-channel steps per SM: it keeps steps of 32")
    wide = forward()
    assert any(f"forward_kernel<{dims}, 128, 64, 64," in name for name in kernel_names(forward))
    monkeypatch.setenv("DCNLAB_FWD_BK", "32")
    narrow = forward()
    assert any(f"forward_kernel<{dims}, 128, 64, 32," in name for name in kernel_names(forward))
    assert torch.equal(wide, narrow)


def check_backward_switch_reorders_sums_only(case, dtype, variable, monkeypatch) -> None:
    """With the fused backward's A/B switch `variable` on, the case against the float64 reference;
    then the gradients with it on and off agree up to the order of their fp32 sums: the same terms
    summed in another order, then rounded, at most about one unit of the dtype (a tile missed or
    counted twice would be far more)."""
    monkeypatch.setenv(variable, "1")
    check_fused_backward(case, dtype)
    cuda_case = case.to(dtype=dtype, device="cuda")
    grad_output = random_grad_output(cuda_case)
    switched_on = run_with_grads(deform_conv, cuda_case, grad_output)[1]
    monkeypatch.setenv(variable, "0")
    switched_off = run_with_grads(deform_conv, cuda_case, grad_output)[1]
    rounding = 2 * torch.finfo(dtype).eps
    for name in GRAD_NAMES:
        if name in switched_off:
            assert_close_to_scale(switched_on[name], switched_off[name], rounding, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2])
def test_fused_backward_with_walks_rotated_by_kernel_point_matches_unrotated(dims, dtype, monkeypatch):
    """In 1-D and 2-D the fused backward's blocks of kernel point k start their walk over the position
    tiles k * tiles / K tiles on (DCNLAB_BWD_ROTATE=0 turns it off). Enough tiles that the blocks take
    several (188 tiles in 1-D, 30 in 2-D; walks 0 .. tiles - 1 from the tile queues), so that walks wrap
    around; against the float64 reference, and the gradients of both walks agree up to the order of
    their fp32 sums (the bias gradient included: its tiles are dealt out differently)."""
    in_size = {1: (12000,), 2: (48, 40)}[dims]
    case = make_case(dims, seed=23, batch=2, in_channels=64, out_channels=48, padding=1, in_size=in_size)
    check_backward_switch_reorders_sums_only(case, dtype, "DCNLAB_BWD_ROTATE", monkeypatch)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fused_backward_with_tile_queues_matches_fixed_walks(dims, dtype, monkeypatch):
    """The fused backward's blocks take their position tiles from one counter per (kernel point,
    chunk) (DCNLAB_BWD_QUEUE=0: fixed walks of ceil(tiles / splits) each). Enough tiles that blocks
    take several (on a 132-SM card with two blocks per SM: 188 tiles for 60 blocks per counter in
    1-D, 120 for 60 in 2-D and for 20 in 3-D, about half of them resident at once); against the float64
    reference, and the gradients of both agree up to the order of their fp32 sums (the bias gradient
    included: with a queue its tiles are dealt by tile, not by walk)."""
    in_size = {1: (12000,), 2: (96, 80), 3: (24, 20, 16)}[dims]
    case = make_case(dims, seed=24, batch=2, in_channels=64, out_channels=48, padding=1, in_size=in_size)
    check_backward_switch_reorders_sums_only(case, dtype, "DCNLAB_BWD_QUEUE", monkeypatch)
