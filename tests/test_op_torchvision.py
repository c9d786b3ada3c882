"""dcnlab.ops.deform_conv2d is a drop-in for torchvision.ops.deform_conv2d: same call styles,
same output and gradients."""

import inspect

import pytest
import torch
from conftest import (
    as_tuple,
    assert_close_to_scale,
    assert_grads_close,
    conv_output_size,
    make_case,
    random_grad_output,
    run_with_grads,
)

from dcnlab.ops import deform_conv2d

torchvision_ops = pytest.importorskip("torchvision.ops")

REL = {torch.float64: 1e-10, torch.float32: 1e-5}

CONFIGS = {
    "basic": dict(),
    "offset_groups-2": dict(in_channels=4, offset_groups=2, padding=1),
    "groups-2-offset_groups-2": dict(in_channels=4, out_channels=6, groups=2, offset_groups=2),
    "stride-2": dict(in_size=(9, 8), stride=2, padding=1),
    "dilation-2": dict(in_size=(9, 10), dilation=2, padding=(2, 1)),
    "rect-kernel-per-axis": dict(in_size=(8, 9), kernel=(3, 2), stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
    "no-mask": dict(mask=False, offset_groups=2),
    "no-bias": dict(bias=False, groups=2, in_channels=4, out_channels=4),
    "no-mask-no-bias-far-offsets": dict(mask=False, bias=False, offset_scale=4.0, padding=1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("seed, config", list(enumerate(CONFIGS.values())), ids=CONFIGS.keys())
def test_output_and_all_gradients_match_torchvision(seed, config, dtype):
    case = make_case(2, dtype, **{"in_size": 7, **config}, seed=100 + seed)
    grad_output = random_grad_output(case)
    output, grads = run_with_grads(deform_conv2d, case, grad_output)
    expected_output, expected_grads = run_with_grads(torchvision_ops.deform_conv2d, case, grad_output)
    assert output.dtype == dtype
    assert_close_to_scale(output, expected_output, REL[dtype], "output")
    assert_grads_close(grads, expected_grads, REL[dtype])


def test_signature_has_torchvision_parameter_names_and_order():
    ours = list(inspect.signature(deform_conv2d).parameters)
    theirs = list(inspect.signature(torchvision_ops.deform_conv2d).parameters)
    assert ours == theirs


# (stride, padding, dilation) each call style passes, and the call itself given the functional f.
CALL_STYLES = {
    "positional-tuples": (
        ((2, 1), (1, 0), (1, 2)),
        lambda f, x, o, w, b, m: f(x, o, w, b, (2, 1), (1, 0), (1, 2), m),
    ),
    "positional-ints": ((2, 1, 2), lambda f, x, o, w, b, m: f(x, o, w, b, 2, 1, 2, m)),
    "keywords-tuples": (
        ((2, 1), (1, 0), (1, 2)),
        lambda f, x, o, w, b, m: f(
            input=x, offset=o, weight=w, bias=b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), mask=m
        ),
    ),
    "keywords-ints-reordered": (
        (2, 1, 2),
        lambda f, x, o, w, b, m: f(x, o, w, mask=m, dilation=2, padding=1, stride=2, bias=b),
    ),
    "keyword-list-stride": ((2, 0, 1), lambda f, x, o, w, b, m: f(x, o, w, b, stride=[2, 2], mask=m)),
    "defaults-only": ((1, 0, 1), lambda f, x, o, w, b, m: f(x, o, w)),
    "mask-without-bias": ((1, 0, 1), lambda f, x, o, w, b, m: f(x, o, w, mask=m)),
}


@pytest.mark.parametrize("style", list(CALL_STYLES))
def test_accepts_torchvision_call_styles_with_same_result(style):
    params, call = CALL_STYLES[style]
    out_size = conv_output_size((9, 8), (3, 3), *(as_tuple(p, 2) for p in params))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 9, 8, generator=generator)
    w = torch.randn(6, 4, 3, 3, generator=generator)
    b = torch.randn(6, generator=generator)
    o = torch.randn(2, 18, *out_size, generator=generator)
    m = torch.rand(2, 9, *out_size, generator=generator)
    ours = call(deform_conv2d, x, o, w, b, m)
    theirs = call(torchvision_ops.deform_conv2d, x, o, w, b, m)
    assert ours.shape == (2, 6, *out_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
