"""Kernel-level time breakdown of one dcnlab.ops.deform_conv forward+backward (torch.profiler).

python scripts/profile_op.py --shape 32 256 28 28 --kernel 3 --dtype bfloat16
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dcnlab.ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 256, 28, 28], help="B C *spatial")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--sets", type=int, default=4, help="input sets to rotate through (defeats the L2 cache)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    batch, channels, *spatial = args.shape
    dims = len(spatial)
    points = args.kernel**dims

    def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    input_sets = [
        (
            make(batch, channels, *spatial),
            make(batch, points * dims, *spatial),
            make(channels, channels, *([args.kernel] * dims), scale=1 / math.sqrt(channels * points)),
            make(channels),
            torch.rand(batch, points, *spatial, device=device, dtype=dtype).requires_grad_(),
        )
        for _ in range(args.sets)
    ]
    calls = 0

    def step() -> None:
        nonlocal calls
        input, offset, weight, bias, mask = input_sets[calls % len(input_sets)]
        calls += 1
        out = dcnlab.ops.deform_conv(input, offset, weight, bias, 1, args.kernel // 2, 1, mask)
        torch.autograd.grad(out, [input, offset, weight, bias, mask], torch.ones_like(out))

    for _ in range(3):
        step()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            step()
        end.record()
        torch.cuda.synchronize()
        print(f"wall per fwd+bwd without profiler: {start.elapsed_time(end) / 20:.3f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.runs):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"{args.shape} k{args.kernel} {args.dtype} on {device}, {args.runs} runs")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
