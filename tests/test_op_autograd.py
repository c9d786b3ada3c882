"""Autograd and compiler integration of the op: grad modes, checkpointing, double backward,
gradients only where asked, determinism, opcheck and torch.compile."""

import pytest
import torch
from conftest import GRAD_NAMES, make_case, random_grad_output, run_with_grads
from torch.utils._python_dispatch import TorchDispatchMode

from dcnlab.ops import deform_conv, deform_conv2d


def _case(dims=2, **overrides):
    config = dict(in_channels=4, out_channels=4, offset_groups=2, padding=1, seed=500 + dims)
    return make_case(dims, **{**config, **overrides})


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_grad_free_modes_build_no_graph_and_give_same_values(grad_mode):
    case = _case().leaves()
    with_graph = deform_conv(*case.args())
    assert with_graph.requires_grad
    with getattr(torch, grad_mode)():
        without_graph = deform_conv(*case.args())
    assert not without_graph.requires_grad
    assert without_graph.grad_fn is None
    assert without_graph.is_inference() == (grad_mode == "inference_mode")
    assert torch.equal(without_graph, with_graph.detach())


def test_checkpoint_gives_same_gradients_as_plain_backward():
    case = _case(3, in_channels=2, out_channels=3)
    grad_output = random_grad_output(case)

    def layer(*args):
        return torch.relu(deform_conv(*args)) * 2

    plain_output, plain_grads = run_with_grads(layer, case, grad_output)
    leaves = case.leaves()
    stride, padding, dilation = case.stride, case.padding, case.dilation

    def checkpointed(input, offset, weight, bias, mask):
        return layer(input, offset, weight, bias, stride, padding, dilation, mask)

    output = torch.utils.checkpoint.checkpoint(
        checkpointed, leaves.input, leaves.offset, leaves.weight, leaves.bias, leaves.mask, use_reentrant=False
    )
    output.backward(grad_output)
    assert torch.equal(output, plain_output)
    for name, leaf in leaves.tensors().items():
        assert torch.equal(leaf.grad, plain_grads[name]), name


def test_double_backward_raises_runtime_error():
    leaves = _case().leaves()
    output = deform_conv(*leaves.args())
    grads = torch.autograd.grad(output.square().sum(), list(leaves.tensors().values()), create_graph=True)
    assert all(g is not None for g in grads)  # first-order gradients with a graph are fine
    with pytest.raises(RuntimeError, match="double backward"):
        sum(g.square().sum() for g in grads).backward()


class _RecordBackwardCalls(TorchDispatchMode):
    """Records the output_mask of every dcnlab::deform_conv_backward call."""

    def __init__(self):
        super().__init__()
        self.output_masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.dcnlab.deform_conv_backward.default:
            self.output_masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "wanted",
    [("weight",), ("input",), ("offset", "mask"), ("bias",), ("input", "offset", "weight", "bias", "mask")],
    ids=lambda names: "+".join(names),
)
def test_backward_computes_only_requested_gradients(wanted):
    case = _case()
    grad_output = random_grad_output(case)
    _, all_grads = run_with_grads(deform_conv, case, grad_output)
    leaves = case.map(lambda t: t.detach().clone())
    for name in wanted:
        leaves.tensors()[name].requires_grad_(True)
    output = deform_conv(*leaves.args())
    with _RecordBackwardCalls() as recorder:
        output.backward(grad_output)
    assert recorder.output_masks == [[name in wanted for name in GRAD_NAMES]]
    for name, tensor in leaves.tensors().items():
        if name in wanted:
            assert torch.equal(tensor.grad, all_grads[name]), name
        else:
            assert tensor.grad is None, name


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("wanted", [("mask",), ("weight",), ("input", "mask"), ("offset",)], ids="+".join)
def test_requested_gradients_follow_the_tensors_present(wanted, bias, mask):
    # Autograd numbers only the tensor arguments that are given: without a bias the mask is the
    # fourth, so the backward's output_mask must not confuse the two.
    case = _case(bias=bias, mask=mask)
    grad_output = random_grad_output(case)
    _, all_grads = run_with_grads(deform_conv, case, grad_output)
    leaves = case.map(lambda t: t.detach().clone())
    present = leaves.tensors()
    for name in wanted:
        if name in present:
            present[name].requires_grad_(True)
    if not any(t.requires_grad for t in present.values()):
        pytest.skip("nothing requires grad in this combination")
    output = deform_conv(*leaves.args())
    with _RecordBackwardCalls() as recorder:
        output.backward(grad_output)
    assert recorder.output_masks == [[name in wanted and name in present for name in GRAD_NAMES]]
    for name, tensor in present.items():
        if name in wanted:
            assert torch.equal(tensor.grad, all_grads[name]), name
        else:
            assert tensor.grad is None, name


def test_input_without_requires_grad_gets_no_gradient_and_others_unchanged():
    case = _case(1)
    grad_output = random_grad_output(case)
    _, all_grads = run_with_grads(deform_conv, case, grad_output)
    leaves = case.leaves()
    leaves.input.requires_grad_(False)
    deform_conv(*leaves.args()).backward(grad_output)
    assert leaves.input.grad is None
    for name in ("offset", "weight", "bias", "mask"):
        assert torch.equal(leaves.tensors()[name].grad, all_grads[name]), name


def test_backward_op_returns_empty_tensors_for_gradients_not_requested():
    case = _case()
    grad_output = random_grad_output(case)
    _, autograd_grads = run_with_grads(deform_conv, case, grad_output)
    grads = torch.ops.dcnlab.deform_conv_backward.default(
        grad_output,
        case.input,
        case.offset,
        case.weight,
        case.mask,
        case.stride,
        case.padding,
        case.dilation,
        [False, True, False, False, True],
    )
    assert [g.numel() == 0 for g in grads] == [True, False, True, True, False]
    assert torch.equal(grads[1], autograd_grads["offset"])
    assert torch.equal(grads[4], autograd_grads["mask"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_backward_is_bitwise_deterministic(dtype):
    # Big enough that the sampling kernels split work over every thread.
    case = make_case(
        2,
        dtype,
        batch=3,
        in_channels=16,
        out_channels=8,
        offset_groups=4,
        in_size=24,
        padding=1,
        offset_scale=3.0,
        seed=510,
    )
    grad_output = random_grad_output(case)
    first_output, first_grads = run_with_grads(deform_conv, case, grad_output)
    for _ in range(2):
        output, grads = run_with_grads(deform_conv, case, grad_output)
        assert torch.equal(output, first_output)
        for name in GRAD_NAMES:
            assert torch.equal(grads[name], first_grads[name]), name


OPCHECK_CASES = {
    "1d-mask-bias": dict(dims=1),
    "1d-no-mask-no-bias": dict(dims=1, mask=False, bias=False, stride=2),
    "2d-mask-no-bias": dict(dims=2, bias=False, kernel=(3, 2), dilation=(1, 2)),
    "2d-no-mask-bias": dict(dims=2, mask=False, groups=2),
    "3d-mask-bias": dict(dims=3, in_size=4, kernel=2, in_channels=2, out_channels=2, offset_groups=2),
    "3d-no-mask-no-bias": dict(dims=3, in_size=4, kernel=(2, 1, 2), in_channels=2, mask=False, bias=False),
}
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("config", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck_forward_op(config):
    config = {"in_channels": 4, "out_channels": 4, "batch": 2, "padding": 1, **config}
    case = make_case(**config, dtype=torch.float32, seed=520).leaves()
    args = (
        case.input,
        case.offset,
        case.weight,
        case.bias,
        list(case.stride),
        list(case.padding),
        list(case.dilation),
        case.mask,
    )
    result = torch.library.opcheck(torch.ops.dcnlab.deform_conv.default, args, test_utils=OPCHECK_TESTS)
    assert result == dict.fromkeys(OPCHECK_TESTS, "SUCCESS")


@pytest.mark.parametrize(
    "output_mask", [[True] * 5, [False, True, False, True, False], [True, False, True, False, True]], ids=str
)
def test_opcheck_backward_op(output_mask):
    case = _case(2, seed=530)
    args = case.backward_args(random_grad_output(case), output_mask)
    tests = ("test_schema", "test_faketensor")
    result = torch.library.opcheck(torch.ops.dcnlab.deform_conv_backward.default, args, test_utils=tests)
    assert result == dict.fromkeys(tests, "SUCCESS")


def _small_layer(input, offset, weight, bias, mask):
    return torch.nn.functional.gelu(deform_conv2d(input, offset, weight, bias, stride=1, padding=1, mask=mask)) + 1


# Inductor compiles C++ on the CPU: about 15 s for both dtypes on 2 cores, so kept in the default run.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    case = _case(2, dtype=dtype, seed=540)
    grad_output = random_grad_output(case)

    def run(fn):
        leaves = case.leaves()
        output = fn(leaves.input, leaves.offset, leaves.weight, leaves.bias, leaves.mask)
        output.backward(grad_output)
        return output.detach(), {name: t.grad for name, t in leaves.tensors().items()}

    compiled = torch.compile(_small_layer, fullgraph=True)
    eager_output, eager_grads = run(_small_layer)
    compiled_output, compiled_grads = run(compiled)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert compiled_output.dtype == dtype
    torch.testing.assert_close(compiled_output, eager_output, **tolerance)
    for name in GRAD_NAMES:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], **tolerance, msg=name)
