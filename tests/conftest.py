"""Shared helpers of the op tests: a seeded factory of deformable convolution cases, the
undeformed sampling grid, gradient collection and scale-relative comparison."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
import torch
from torch import Tensor

import dcnlab  # noqa: F401  (registers torch.ops.dcnlab)

IntOrTuple = int | Sequence[int]
GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")

# Use as a parametrize list: `@pytest.mark.parametrize("device", DEVICES)`; the cuda entry carries
# the `gpu` marker and is skipped where CUDA is absent.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on two busy cores, threads only add synchronisation (measured 48 s vs 4 s for the model tests while
    another process held the second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_tuple(value: IntOrTuple, dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def conv_output_size(
    in_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Output size per DESIGN.md: floor((in + 2*pad - dil*(k-1) - 1) / stride) + 1 per dim."""
    return tuple(
        (i + 2 * p - d * (k - 1) - 1) // s + 1
        for i, k, s, p, d in zip(in_size, kernel, stride, padding, dilation, strict=True)
    )


def base_positions(
    kernel: Sequence[int],
    out_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Undeformed sample positions out*stride - pad + k*dil: float64 (K, dims, *out_size), K row-major."""
    dims = len(kernel)
    kernel_index = torch.stack(torch.meshgrid(*[torch.arange(k) for k in kernel], indexing="ij"), dim=-1).reshape(
        -1, dims
    )  # (K, dims)
    out_index = torch.stack(torch.meshgrid(*[torch.arange(o) for o in out_size], indexing="ij"), dim=0)  # (dims, *out)
    view = (dims,) + (1,) * dims
    out_part = out_index * torch.tensor(stride).reshape(view) - torch.tensor(padding).reshape(view)
    kernel_part = (kernel_index * torch.tensor(dilation)).reshape(-1, dims, *([1] * dims))
    return (kernel_part + out_part[None]).to(torch.float64)


@dataclass
class DeformConvCase:
    """One set of op arguments. Tensors live on `device` in `dtype`; bias/mask may be None."""

    input: Tensor
    offset: Tensor
    weight: Tensor
    bias: Tensor | None
    mask: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    offset_groups: int
    out_size: tuple[int, ...] = field(default=())

    @property
    def dims(self) -> int:
        return self.input.dim() - 2

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def kernel_points(self) -> int:
        return math.prod(self.kernel)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.input.shape[0], self.weight.shape[0], *self.out_size)

    def tensors(self) -> dict[str, Tensor]:
        """The tensor arguments that are present, by name (order of GRAD_NAMES)."""
        all_tensors = dict(input=self.input, offset=self.offset, weight=self.weight, bias=self.bias, mask=self.mask)
        return {name: t for name, t in all_tensors.items() if t is not None}

    def args(self) -> tuple:
        """Positional arguments in the op's (and torchvision's) order."""
        return (self.input, self.offset, self.weight, self.bias, self.stride, self.padding, self.dilation, self.mask)

    def backward_args(self, grad_output: Tensor, output_mask: Sequence[bool] = (True,) * 5) -> tuple:
        """Positional arguments of torch.ops.dcnlab.deform_conv_backward."""
        conv_params = (list(self.stride), list(self.padding), list(self.dilation))
        return (grad_output, self.input, self.offset, self.weight, self.mask, *conv_params, list(output_mask))

    def map(self, fn: Callable[[Tensor], Tensor]) -> "DeformConvCase":
        """A copy with fn applied to every present tensor."""
        return replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "DeformConvCase":
        return self.map(lambda t: t.detach().to(dtype=dtype, device=device))

    def leaves(self, requires_grad: bool = True) -> "DeformConvCase":
        """Fresh leaf copies of every tensor, requiring grad."""
        return self.map(lambda t: t.detach().clone().requires_grad_(requires_grad))

    def base_positions(self) -> Tensor:
        """(K, dims, *out_size) float64 undeformed sample positions."""
        return base_positions(self.kernel, self.out_size, self.stride, self.padding, self.dilation)

    def with_positions(self, positions: Tensor) -> "DeformConvCase":
        """A copy whose offsets put the sample points at `positions`: (B, G, K, dims, *out_size)."""
        offset = positions.to(torch.float64) - self.base_positions().to(positions.device)
        offset = offset.reshape(self.offset.shape).to(dtype=self.offset.dtype, device=self.offset.device)
        return replace(self, offset=offset)


def make_case(
    dims: int,
    dtype: torch.dtype = torch.float64,
    *,
    batch: int = 2,
    in_channels: int = 4,
    out_channels: int = 4,
    groups: int = 1,
    offset_groups: int = 1,
    in_size: IntOrTuple | None = None,
    kernel: IntOrTuple = 3,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    offset_scale: float = 1.0,
    mask: bool = True,
    bias: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DeformConvCase:
    """Random op arguments for one configuration, reproducible from `seed`.

    Values are drawn in float64 on the CPU from a seeded generator and then converted, so the
    same seed gives the same (rounded) values in every dtype and on every device. Offsets are
    N(0, offset_scale); the mask is uniform in [0, 1).
    """
    kernel_t = as_tuple(kernel, dims)
    stride_t, padding_t, dilation_t = (as_tuple(v, dims) for v in (stride, padding, dilation))
    in_size_t = as_tuple(in_size if in_size is not None else {1: 9, 2: 7, 3: 5}[dims], dims)
    out_size = conv_output_size(in_size_t, kernel_t, stride_t, padding_t, dilation_t)
    assert all(o > 0 for o in out_size), f"empty output for in_size={in_size_t}, kernel={kernel_t}"
    assert in_channels % groups == 0 and out_channels % groups == 0 and in_channels % offset_groups == 0
    kernel_points = math.prod(kernel_t)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)

    return DeformConvCase(
        input=randn(batch, in_channels, *in_size_t),
        offset=randn(batch, offset_groups * kernel_points * dims, *out_size, scale=offset_scale),
        weight=randn(
            out_channels, in_channels // groups, *kernel_t, scale=(in_channels // groups * kernel_points) ** -0.5
        ),
        bias=randn(out_channels) if bias else None,
        mask=rand(batch, offset_groups * kernel_points, *out_size) if mask else None,
        stride=stride_t,
        padding=padding_t,
        dilation=dilation_t,
        offset_groups=offset_groups,
        out_size=out_size,
    )


def random_grad_output(case: DeformConvCase, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(case.output_shape, generator=generator, dtype=torch.float64)
    return grad.to(dtype=case.input.dtype, device=case.input.device)


def run_with_grads(fn: Callable[..., Tensor], case: DeformConvCase, grad_output: Tensor) -> tuple[Tensor, dict]:
    """Output of fn(*case.args()) on fresh leaves, and the gradient of every present tensor."""
    leaves = case.leaves()
    output = fn(*leaves.args())
    output.backward(grad_output)
    grads = {name: t.grad for name, t in leaves.tensors().items()}
    return output.detach(), grads


def assert_close_to_scale(actual: Tensor, expected: Tensor, rel: float, name: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (compared in float64, same shape)."""
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values"
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    error = (actual64 - expected64).abs().max().item() if expected64.numel() else 0.0
    assert error <= rel * max(scale, 1e-30), f"{name}: max error {error:.3e} > {rel:.1e} * scale {scale:.3e}"


def assert_grads_close(actual: dict, expected: dict, rel: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close_to_scale(actual[name], expected[name], rel, name=f"grad {name}")
