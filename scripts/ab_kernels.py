"""Per-kernel times of one dcnlab fwd+bwd, for same-machine A/B runs (scripts/ab_device.sh).

    python scripts/ab_kernels.py A,B,C TAG

For each named shape (bench_op.py's inputs: C_in = C_out, stride 1, padding k//2, offsets N(0,1),
mask U(0,1), bias on; three rotating input sets): the median wall time of a fwd+bwd (CUDA events,
30 runs; host-bound for small shapes), the sum of its kernels' times per fwd+bwd, the peak extra
memory of one fwd+bwd and the TOP (environment, default 12) kernels, from torch.profiler over 6
calls. DTYPE (environment) picks the dtype, bfloat16 by default.
"""

import collections
import math
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import dcnlab.ops

SHAPES = {
    "A": (32, 256, (28, 28), 3),
    "B": (32, 512, (14, 14), 3),
    "C": (4, 256, (100, 168), 3),
    "D": (8, 64, (128, 128), 3),
    "1D": (32, 128, (4096,), 9),
    "3D": (4, 64, (32, 32, 32), 3),
    "3D2": (2, 32, (64, 64, 64), 3),
}


def short_name(name: str) -> str:
    return name.replace("void ", "").replace("dcnlab::(anonymous namespace)::", "").split("(")[0][:90]


def measure(name: str, tag: str, dtype: torch.dtype, top: int) -> None:
    batch, channels, spatial, k = SHAPES[name]
    dims = len(spatial)
    points = k**dims

    def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", dtype=dtype) * scale).requires_grad_()

    sets = [
        (
            make(batch, channels, *spatial),
            make(batch, points * dims, *spatial),
            make(channels, channels, *([k] * dims), scale=1 / math.sqrt(channels * points)),
            make(channels),
            torch.rand(batch, points, *spatial, device="cuda", dtype=dtype).requires_grad_(),
        )
        for _ in range(3)
    ]
    calls = [0]

    def step() -> None:
        x, offset, weight, bias, mask = sets[calls[0] % len(sets)]
        calls[0] += 1
        out = dcnlab.ops.deform_conv(x, offset, weight, bias, 1, k // 2, 1, mask)
        torch.autograd.grad(out, [x, offset, weight, bias, mask], torch.ones_like(out))

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    runs = 6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    per_kernel: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time_total / runs
    total = sum(per_kernel.values())
    wall = statistics.median(times) * 1000
    print(f"[{tag}] {name} {dtype} fwd+bwd {wall:.1f} us (kernel sum {total:.1f}; peak extra {peak_mib:.0f} MiB)")
    for kernel, us in per_kernel.most_common(top):
        print(f"    {us:8.1f}  {short_name(kernel)}")
    sys.stdout.flush()


def main() -> None:
    names, tag = sys.argv[1].split(","), sys.argv[2]
    dtype = getattr(torch, os.environ.get("DTYPE", "bfloat16"))
    top = int(os.environ.get("TOP", "12"))
    for name in names:
        measure(name, tag, dtype, top)


if __name__ == "__main__":
    main()
