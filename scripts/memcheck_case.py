"""A small forward+backward of every dim and dtype on CUDA, for compute-sanitizer memcheck.

Offsets include points far outside the input and non-finite values, so the bounds handling is
exercised too. Exits non-zero if a result is non-finite.
"""

import os

import torch

import dcnlab.ops


def run_case(
    dims: int,
    dtype: torch.dtype,
    channels: int = 4,
    in_size: tuple = (7, 6, 5),
    offset_groups: int = 2,
    out_channels: int = 6,
    groups: int = 2,
) -> None:
    generator = torch.Generator(device="cuda").manual_seed(dims)
    kernel = (3,) * dims
    in_size = in_size[:dims]
    batch = 2
    out_size = in_size  # stride 1, padding 1, 3-wide kernel
    points = 3**dims
    shape = (batch, offset_groups * points * dims, *out_size)
    offset = torch.randn(shape, device="cuda", generator=generator) * 4
    offset.view(-1)[::7] = 1e6
    offset.view(-1)[1::11] = float("nan")
    offset.view(-1)[2::13] = float("-inf")
    tensors = {
        "input": torch.randn(batch, channels, *in_size, device="cuda", generator=generator),
        "offset": offset,
        "weight": torch.randn(out_channels, channels // groups, *kernel, device="cuda", generator=generator),
        "bias": torch.randn(out_channels, device="cuda", generator=generator),
        "mask": torch.rand(batch, offset_groups * points, *out_size, device="cuda", generator=generator),
    }
    tensors = {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}
    out = dcnlab.ops.deform_conv(
        tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], 1, 1, 1, tensors["mask"]
    )
    grads = torch.autograd.grad(out.float().square().sum(), list(tensors.values()))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), f"non-finite output for {dims}-D {dtype}"
    for name, grad in zip(tensors, grads, strict=True):
        assert torch.isfinite(grad).all(), f"non-finite grad of {name} for {dims}-D {dtype}"


def main() -> None:
    for dims in (1, 2, 3):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            run_case(dims, dtype)
        for dtype in (torch.float16, torch.bfloat16):
            # The fused implicit-GEMM forward and backward (channels per group: 32): offset gradients
            # written directly and (one offset group of 64 channels) summed over chunks; positions
            # per sample a multiple of 8 (16-byte grad-output copies) and not.
            run_case(dims, dtype, channels=64)
            run_case(dims, dtype, channels=64, in_size=(16, 8, 4), offset_groups=1)
            # One group of 64 input channels and at most 64 output channels: the 2-D and 3-D fused
            # forward's steps of 64 channels; in 2-D 15 position tiles, so that the backward's walks
            # rotated by kernel point start apart.
            run_case(dims, dtype, channels=64, offset_groups=1, groups=1, out_channels=48, in_size=(40, 24, 4))
            # One conv group of 256 channels: the im2col path's paired kernels (two 8-channel packs
            # per lane in the forward, two 4-channel packs in the sampling gradients).
            run_case(dims, dtype, channels=256, offset_groups=1, groups=1, out_channels=16)
            # Two offset groups of 128 channels (teams of 16 lanes in the sampling gradients).
            run_case(dims, dtype, channels=256, offset_groups=2, groups=1, out_channels=16, in_size=(9, 10, 3))
            # 160 output channels per group: the backward's loop over output tiles (forced).
            os.environ["DCNLAB_CUDA_PATH"] = "fused"
            try:
                run_case(dims, dtype, channels=64, out_channels=320)
            finally:
                del os.environ["DCNLAB_CUDA_PATH"]
    print("memcheck cases ran: 3 dims x 4 dtypes (and the fused and paired paths for half types), forward and backward")


if __name__ == "__main__":
    main()
