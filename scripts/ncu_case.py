"""A bf16 deformable conv for Nsight Compute, forward or forward+backward.

    ncu --kernel-name regex:backward_kernel --launch-skip 1 --launch-count 1 \\
        python3 scripts/ncu_case.py --shape 4 64 32 32 32 --backward

Runs a few calls of a deformable conv with C_in = C_out = C, stride 1, padding kernel//2, mask
on, offsets N(0, 1) (the bench_op.py inputs) on (B, C, *spatial).
"""

import argparse
import math

import torch

import dcnlab.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 256, 28, 28], help="B C *spatial")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="also run the backward")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    batch, channels, *spatial = args.shape
    dims = len(spatial)
    points = args.kernel**dims
    options = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, channels, *spatial, **options)
    offset = torch.randn(batch, points * dims, *spatial, **options)
    mask = torch.rand(batch, points, *spatial, **options)
    weight = torch.randn(channels, channels, *(args.kernel,) * dims, **options) / math.sqrt(channels * points)
    leaves = [t.requires_grad_(args.backward) for t in (x, offset, mask, weight)]
    for _ in range(args.runs):
        with torch.set_grad_enabled(args.backward):
            out = dcnlab.ops.deform_conv(x, offset, weight, None, 1, args.kernel // 2, 1, mask)
            if args.backward:
                torch.autograd.grad(out, leaves, torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
