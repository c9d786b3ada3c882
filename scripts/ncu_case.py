"""A bf16 2D forward for Nsight Compute: `ncu --kernel-name regex:forward_kernel python3 scripts/ncu_case.py B C H`.

Runs three forwards of a 3x3 deformable conv with C_in = C_out = C on (B, C, H, H) inputs.
"""

import sys

import torch

import dcnlab.ops


def main() -> None:
    batch, channels, side = (int(arg) for arg in sys.argv[1:4])
    options = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, channels, side, side, **options)
    offset = torch.randn(batch, 18, side, side, **options)
    mask = torch.rand(batch, 9, side, side, **options)
    weight = torch.randn(channels, channels, 3, 3, **options)
    for _ in range(3):
        dcnlab.ops.deform_conv2d(x, offset, weight, None, padding=1, mask=mask)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
