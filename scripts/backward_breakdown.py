"""Time of the CUDA backward op per requested gradient subset and path (bf16).

    python3 scripts/backward_breakdown.py [--repeats 20] [--wide]

For each shape, calls torch.ops.dcnlab.deform_conv_backward with output masks that ask for all
gradients, only the weight's, only the input's, or only the offset's and mask's, under
DCNLAB_CUDA_PATH=fused and =im2col, and prints the median times (CUDA events) as a markdown
table. The differences show what each part of the backward costs (e.g. the grad_input atomics).
Inputs as in bench_op.py: C_in = C_out, stride 1, padding k//2, offsets N(0, 1), mask U(0, 1).
"""

import argparse
import functools
import math
import os
import statistics

import torch

import dcnlab.ops  # noqa: F401  (registers the op)

SHAPES = [(8, 64, (128, 128), 3), (4, 64, (32, 32, 32), 3), (2, 32, (64, 64, 64), 3), (32, 128, (4096,), 9)]
# More than 128 channels per group: the per-shape pick runs im2col for these (fused only when forced).
WIDE_SHAPES = [(32, 256, (28, 28), 3), (32, 512, (14, 14), 3), (4, 256, (100, 168), 3)]
SUBSETS = {
    "all": [True] * 5,
    "weight": [False, False, True, False, False],
    "input": [True, False, False, False, False],
    "offset+mask": [False, True, False, False, True],
}


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def shape_rows(batch: int, channels: int, spatial: tuple, kernel: int, repeats: int) -> list[str]:
    options = dict(device="cuda", dtype=torch.bfloat16)
    dims = len(spatial)
    points = kernel**dims
    x = torch.randn(batch, channels, *spatial, **options)
    offset = torch.randn(batch, points * dims, *spatial, **options)
    mask = torch.rand(batch, points, *spatial, **options)
    weight = torch.randn(channels, channels, *(kernel,) * dims, **options) / math.sqrt(channels * points)
    grad = torch.randn(batch, channels, *spatial, **options)
    conv = ([1] * dims, [kernel // 2] * dims, [1] * dims)
    forward = functools.partial(torch.ops.dcnlab.deform_conv, x, offset, weight, None, *conv, mask)
    name = f"B{batch} C{channels} {'x'.join(map(str, spatial))} k{kernel}"
    rows = []
    for path in ("fused", "im2col"):
        os.environ["DCNLAB_CUDA_PATH"] = path
        times = [median_ms(forward, repeats)]
        for output_mask in SUBSETS.values():
            backward = functools.partial(
                torch.ops.dcnlab.deform_conv_backward, grad, x, offset, weight, mask, *conv, output_mask
            )
            times.append(median_ms(backward, repeats))
        rows.append(f"| {name} | {path} | " + " | ".join(f"{t:.3f}" for t in times) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--wide", action="store_true", help="the three wide 2D benchmark shapes instead")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, bf16, median of {args.repeats} (ms)\n")
    print("| shape | path | forward | " + " | ".join(f"backward: {name}" for name in SUBSETS) + " |")
    print("|---|---|---|" + "---|" * len(SUBSETS))
    for shape in WIDE_SHAPES if args.wide else SHAPES:
        for line in shape_rows(*shape, repeats=args.repeats):
            print(line)
    os.environ.pop("DCNLAB_CUDA_PATH", None)


if __name__ == "__main__":
    main()
