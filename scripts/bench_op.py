"""Benchmark of the compiled N-D deformable convolution `dcnlab.ops.deform_conv`.

For each shape of a preset and each dtype it times, on the same inputs and in the same run,
three contenders: dcnlab's op, `torchvision.ops.deform_conv2d` (2D only; for bf16 rows also in
fp16, since torchvision has no bf16) and the dense convolution of the same weight shape
(`torch.nn.functional.conv{1,2,3}d`; on CUDA the faster of cuDNN's autotuned and heuristic
algorithms, each timed). Forward is timed under
`torch.no_grad()`; forward+backward is the forward followed by `torch.autograd.grad` for every
input that requires grad (input, offset, mask, weight and bias; input, weight and bias for the
dense conv) with a random grad_output, so no `.grad` is accumulated in the loop. Times are
medians of CUDA events (CUDA) or time.perf_counter (CPU) after warm-up, rotating among input
sets; on CUDA the peak extra memory of one forward+backward is recorded too.

Before timing, dcnlab's output and all five gradients are checked against a float64 truth
(torchvision for 2D, `deform_conv_reference` otherwise) on a batch-1 slice, in float64 and in
the row's dtype; the exit status is 1 when a check failed, so a wrong kernel cannot hide behind
a good-looking table. The markdown table goes to stdout and to --md, every raw number to --json.

Usage (the repository root is put on sys.path, so an in-place build needs no install):

    .venv/bin/python scripts/bench_op.py --device cpu --preset cpu --threads 2
    python3 scripts/bench_op.py --device cuda --md $OUT/bench.md --json $OUT/bench.json --plot $OUT/bench.png
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import torchvision
    from torchvision.ops import deform_conv2d as tv_deform_conv2d
except ImportError:  # torchvision is optional: its columns become n/a
    torchvision = None
    tv_deform_conv2d = None

REPO_ROOT = Path(__file__).resolve().parent.parent
# Importable from a checkout whose extension was built in place (setup.py build_ext --inplace), not installed.
sys.path.insert(0, str(REPO_ROOT))
import dcnlab  # noqa: E402
from dcnlab.ops import deform_conv, deform_conv_reference  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Bound on ||dcnlab - truth|| / ||truth|| (output and each gradient) per dtype; float32 allows TF32.
TOLERANCE = {"float64": 1e-9, "float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}
CHECK_POINTS = 4096  # spatial points of the correctness slice (batch 1, each dim cropped to fit)
CHECK_OFFSET_MARGIN = 0.05  # the check's sampling coordinates stay this far from integers (see make_inputs)
ROTATION_BYTES = 256 * 2**20  # rotate among input sets until they exceed this, so caches do not flatter
MAX_INPUT_SETS = 8
MIN_RUNS = 3  # runs kept even when --max-seconds is exceeded
MIB = 2**20
GPU_TIME_RUNS = 10  # calls per torch.profiler measurement of kernel time (CUDA)


@dataclass(frozen=True)
class Shape:
    """One benchmark case: C_in = C_out = channels, a k^d kernel, stride 1, padding k//2, dilation 1."""

    batch: int
    channels: int
    spatial: tuple[int, ...]
    kernel: int

    @property
    def dims(self) -> int:
        """Number of spatial dims."""
        return len(self.spatial)

    @property
    def padding(self) -> int:
        """Padding that keeps the spatial size."""
        return self.kernel // 2

    @property
    def kernel_points(self) -> int:
        """K = k^d."""
        return self.kernel**self.dims

    @property
    def label(self) -> str:
        """Short name for the table, e.g. `B32 C256 28x28 k3`."""
        return f"B{self.batch} C{self.channels} {'x'.join(map(str, self.spatial))} k{self.kernel}"


PRESETS: dict[str, list[Shape]] = {
    "tiny": [
        Shape(2, 8, (16, 16), 3),
        Shape(2, 8, (64,), 9),
        Shape(1, 4, (8, 8, 8), 3),
    ],
    "cpu": [
        Shape(4, 64, (32, 32), 3),
        Shape(8, 256, (14, 14), 3),
    ],
    "cuda": [
        Shape(32, 256, (28, 28), 3),
        Shape(32, 512, (14, 14), 3),
        Shape(4, 256, (100, 168), 3),
        Shape(8, 64, (128, 128), 3),
        Shape(4, 64, (32, 32, 32), 3),
        Shape(2, 32, (64, 64, 64), 3),
        Shape(32, 128, (4096,), 9),
    ],
}


class Inputs(NamedTuple):
    """Arguments of one call; the first five are the leaves gradients are taken for."""

    input: Tensor
    offset: Tensor
    mask: Tensor
    weight: Tensor
    bias: Tensor
    grad_output: Tensor


Op = Callable[[Inputs, Shape], Tensor]


@dataclass(frozen=True)
class Contender:
    """An implementation to time: its forward and the Inputs fields it takes gradients for."""

    name: str
    op: Op
    grad_fields: tuple[str, ...]


def dcnlab_op(x: Inputs, shape: Shape) -> Tensor:
    """dcnlab's compiled op."""
    return deform_conv(x.input, x.offset, x.weight, x.bias, 1, shape.padding, 1, x.mask)


def torchvision_op(x: Inputs, shape: Shape) -> Tensor:
    """torchvision's 2D deformable convolution."""
    if tv_deform_conv2d is None:
        raise RuntimeError("torchvision is not installed")
    if shape.dims != 2:
        raise RuntimeError(f"torchvision has no {shape.dims}D deformable convolution")
    return tv_deform_conv2d(x.input, x.offset, x.weight, x.bias, 1, shape.padding, 1, x.mask)


def dense_op(x: Inputs, shape: Shape) -> Tensor:
    """The dense convolution with the same weight shape, stride, padding and dilation."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[shape.dims]
    return conv(x.input, x.weight, x.bias, stride=1, padding=shape.padding, dilation=1)


def reference_op(x: Inputs, shape: Shape) -> Tensor:
    """The pure-PyTorch reference of the op contract."""
    return deform_conv_reference(x.input, x.offset, x.weight, x.bias, 1, shape.padding, 1, x.mask)


DEFORM_GRADS = ("input", "offset", "mask", "weight", "bias")
DCNLAB = Contender("dcnlab", dcnlab_op, DEFORM_GRADS)
TORCHVISION = Contender("torchvision", torchvision_op, DEFORM_GRADS)
DENSE = Contender("dense", dense_op, ("input", "weight", "bias"))
REFERENCE = Contender("deform_conv_reference", reference_op, DEFORM_GRADS)


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator, offset_margin: float = 0.0
) -> Inputs:
    """Random inputs: x ~ N(0,1), offsets ~ N(0,1) (mostly inside the image), mask ~ U(0,1),
    weight scaled by 1/sqrt(fan_in), bias ~ N(0,1), grad_output ~ N(0,1); leaves require grad.

    With offset_margin > 0 each offset keeps the integer part of its N(0,1) draw and gets a fractional part
    uniform in [margin, 1 - margin]: as stride, padding and dilation are integers, no sampling coordinate then
    lies near an integer, where the interpolation is not differentiable and rounding the coordinate (fp32 by
    the op contract) may legitimately pick the other one-sided gradient for the offset."""

    def draw(*size: int, kind: str = "normal", scale: float = 1.0) -> Tensor:
        sample = torch.rand if kind == "uniform" else torch.randn
        return sample(size, generator=generator, device=device, dtype=torch.float32) * scale

    out_spatial = shape.spatial  # stride 1, padding k//2 keeps the size
    kernel = (shape.kernel,) * shape.dims
    offset = draw(shape.batch, shape.kernel_points * shape.dims, *out_spatial)
    if offset_margin > 0:
        fraction = offset_margin + (1 - 2 * offset_margin) * draw(*offset.shape, kind="uniform")
        offset = offset.floor() + fraction
    leaves = [
        draw(shape.batch, shape.channels, *shape.spatial),
        offset,
        draw(shape.batch, shape.kernel_points, *out_spatial, kind="uniform"),
        draw(shape.channels, shape.channels, *kernel, scale=(shape.channels * shape.kernel_points) ** -0.5),
        draw(shape.channels),
    ]
    grad_output = draw(shape.batch, shape.channels, *out_spatial)
    return Inputs(*(t.to(dtype).requires_grad_() for t in leaves), grad_output.to(dtype))


def forward_backward(contender: Contender, x: Inputs, shape: Shape) -> tuple[Tensor, ...]:
    """Forward, then the gradients of every leaf the contender uses for x.grad_output."""
    output = contender.op(x, shape)
    leaves = [getattr(x, field) for field in contender.grad_fields]
    return torch.autograd.grad(output, leaves, x.grad_output)


def relative_error(value: Tensor, truth: Tensor) -> dict[str, float]:
    """Max abs error and ||value - truth|| / ||truth|| (inf when value is not finite)."""
    diff = value.double() - truth
    finite = bool(torch.isfinite(value).all())
    norm = float(truth.norm())
    return {
        "max_abs": float(diff.abs().max()) if finite else math.inf,
        "rel": (float(diff.norm()) / norm if norm > 0 else float(diff.norm())) if finite else math.inf,
    }


def check_shape(shape: Shape) -> Shape:
    """The correctness slice: batch 1, each spatial dim cropped so the plane has <= CHECK_POINTS points."""
    cap = max(1, int(round(CHECK_POINTS ** (1 / shape.dims))))
    return Shape(1, shape.channels, tuple(min(s, cap) for s in shape.spatial), shape.kernel)


def check_dcnlab(shape: Shape, dtype_name: str, device: torch.device, seed: int) -> dict[str, Any]:
    """Compare dcnlab's output and all five gradients with a float64 truth, in float64 and in the benchmark
    dtype (truth computed from the same dtype-rounded inputs). Returns errors per tensor and a pass flag."""
    small = check_shape(shape)
    truth = TORCHVISION if shape.dims == 2 and tv_deform_conv2d is not None else REFERENCE
    generator = torch.Generator(device=device).manual_seed(seed)
    base = make_inputs(small, torch.float64, device, generator, offset_margin=CHECK_OFFSET_MARGIN)
    result: dict[str, Any] = {"truth": f"{truth.name} float64", "shape": asdict(small), "runs": {}}
    passed = True
    for name in dict.fromkeys(["float64", dtype_name]):
        dtype = DTYPES[name]
        rounded = Inputs(*(t.detach().to(dtype).requires_grad_() for t in base[:5]), base.grad_output.to(dtype))
        exact = Inputs(*(t.detach().double().requires_grad_() for t in rounded[:5]), rounded.grad_output.double())
        try:
            with torch.no_grad():
                out = dcnlab_op(rounded, small)
            grads = forward_backward(DCNLAB, rounded, small)
        except (RuntimeError, ValueError) as error:
            result["runs"][name] = {"error": f"{type(error).__name__}: {error}"}
            passed = False
            continue
        true_out = truth.op(exact, small).detach()
        true_grads = forward_backward(truth, exact, small)
        errors = {"output": relative_error(out, true_out)}
        errors |= {f"grad_{f}": relative_error(g, t) for f, g, t in zip(DEFORM_GRADS, grads, true_grads, strict=True)}
        worst = max(e["rel"] for e in errors.values())
        ok = worst <= TOLERANCE[name]
        result["runs"][name] = {"errors": errors, "worst_rel": worst, "tolerance": TOLERANCE[name], "passed": ok}
        passed = passed and ok
    result["passed"] = passed
    return result


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    step: Callable[[int], object], device: torch.device, warmup: int, repeats: int, max_seconds: float
) -> list[float]:
    """Per-run times in ms of step(i): CUDA events on CUDA, perf_counter on CPU, after `warmup` runs.
    Stops early once `max_seconds` of wall time have passed and at least MIN_RUNS runs were made."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    deadline = time.perf_counter() + max_seconds
    if device.type == "cuda":
        events = []
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            events.append((start, end))
            if len(events) >= MIN_RUNS and time.perf_counter() > deadline:
                break
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(repeats):
        begin = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - begin) * 1e3)
        if len(times) >= MIN_RUNS and time.perf_counter() > deadline:
            break
    return times


def gpu_time_ms(step: Callable[[int], object], device: torch.device, runs: int) -> float:
    """Kernel time in ms of one step(i) on the GPU: the sum of the CUDA kernel (and memset / memcpy) times
    that torch.profiler records over `runs` calls, divided by `runs`. The host's speed does not enter it,
    so it compares across machine starts where a host-bound wall time does not."""
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for i in range(runs):
            step(i)
        synchronize(device)
    events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in events) / runs / 1e3


def peak_extra_memory(step: Callable[[int], object], device: torch.device) -> int:
    """Peak device memory (bytes) allocated by one step above what was held before it."""
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - held


def timing_summary(times: list[float]) -> dict[str, Any]:
    """Median and spread of per-run times, with the raw list."""
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
        "times_ms": times,
    }


def bench_contender(
    contender: Contender,
    sets: list[Inputs],
    shape: Shape,
    device: torch.device,
    args: argparse.Namespace,
    gpu_time: bool = False,
) -> dict[str, Any]:
    """Time forward and forward+backward of one contender (and its peak memory on CUDA, and with gpu_time its
    kernel time per call); a mode that raises or is unsupported is recorded as {"na": reason}."""

    def forward(i: int) -> Tensor:
        return contender.op(sets[i % len(sets)], shape)

    def both(i: int) -> tuple[Tensor, ...]:
        return forward_backward(contender, sets[i % len(sets)], shape)

    result: dict[str, Any] = {}
    for mode, step in (("fwd", forward), ("fwd_bwd", both)):
        try:
            with torch.set_grad_enabled(mode == "fwd_bwd"):
                result[mode] = timing_summary(time_runs(step, device, args.warmup, args.repeats, args.max_seconds))
                if device.type == "cuda" and gpu_time:
                    result[mode]["gpu_ms"] = gpu_time_ms(step, device, GPU_TIME_RUNS)
                if device.type == "cuda" and mode == "fwd_bwd":
                    result["fwd_bwd_peak_mib"] = peak_extra_memory(step, device) / MIB
        except (RuntimeError, ValueError) as error:
            result[mode] = {"na": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def input_sets(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> list[Inputs]:
    """Enough independent input sets that together exceed ROTATION_BYTES (at most MAX_INPUT_SETS)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    first = make_inputs(shape, dtype, device, generator)
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    count = min(MAX_INPUT_SETS, max(1, math.ceil(ROTATION_BYTES / set_bytes)))
    return [first] + [make_inputs(shape, dtype, device, generator) for _ in range(count - 1)]


def median(row: dict[str, Any], contender: str, mode: str) -> float | None:
    """Median ms of a contender's mode in a result row, or None when n/a."""
    return row["contenders"].get(contender, {}).get(mode, {}).get("median_ms")


def gpu_ms(row: dict[str, Any], contender: str, mode: str) -> float | None:
    """Kernel time per call (ms) of a contender's mode in a result row, or None when not measured."""
    return row["contenders"].get(contender, {}).get(mode, {}).get("gpu_ms")


def ratios(row: dict[str, Any]) -> dict[str, Any]:
    """Speed-up over torchvision (fwd+bwd; vs its fp16 where the dtype is missing) and cost over dense conv."""

    def divide(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    dcn_fb = median(row, "dcnlab", "fwd_bwd")
    tv_fb, versus = median(row, "torchvision", "fwd_bwd"), row["dtype"]
    if tv_fb is None and median(row, "torchvision_fp16", "fwd_bwd") is not None:
        tv_fb, versus = median(row, "torchvision_fp16", "fwd_bwd"), "float16"
    return {
        "torchvision_over_dcnlab_fwd_bwd": divide(tv_fb, dcn_fb),
        "torchvision_dtype": versus if tv_fb is not None else None,
        "dcnlab_over_dense_fwd": divide(median(row, "dcnlab", "fwd"), median(row, "dense", "fwd")),
        "dcnlab_over_dense_fwd_bwd": divide(dcn_fb, median(row, "dense", "fwd_bwd")),
        "dcnlab_over_dense_fwd_gpu": divide(gpu_ms(row, "dcnlab", "fwd"), gpu_ms(row, "dense", "fwd")),
        "dcnlab_over_dense_fwd_bwd_gpu": divide(gpu_ms(row, "dcnlab", "fwd_bwd"), gpu_ms(row, "dense", "fwd_bwd")),
    }


def bench_dense(sets: list[Inputs], shape: Shape, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The dense conv; on CUDA timed with cuDNN's autotuned algorithms (benchmark=True) and with its heuristic
    choice (benchmark=False), "dense" being the faster of the two per mode. The autotuned pick alone varied up
    to 2.5x between runs on fresh machines, which made the dcnlab/dense ratios swing with it."""
    if device.type != "cuda":
        return {"dense": bench_contender(DENSE, sets, shape, device, args)}
    variants: dict[str, Any] = {}
    for name, autotune in (("dense_autotuned", True), ("dense_heuristic", False)):
        torch.backends.cudnn.benchmark = autotune
        try:
            variants[name] = bench_contender(DENSE, sets, shape, device, args, gpu_time=True)
        finally:
            torch.backends.cudnn.benchmark = True
    best: dict[str, Any] = {}
    for mode in ("fwd", "fwd_bwd"):
        timed = [(v[mode]["median_ms"], name) for name, v in variants.items() if "median_ms" in v.get(mode, {})]
        source = min(timed)[1] if timed else "dense_autotuned"
        best[mode] = {**variants[source][mode], "from": source}
        if mode == "fwd_bwd" and "fwd_bwd_peak_mib" in variants[source]:
            best["fwd_bwd_peak_mib"] = variants[source]["fwd_bwd_peak_mib"]
    return {"dense": best, **variants}


def bench_row(shape: Shape, dtype_name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Check dcnlab on the shape, then time every contender in this dtype (and torchvision in fp16 for bf16)."""
    dtype = DTYPES[dtype_name]
    row: dict[str, Any] = {"shape": asdict(shape), "label": shape.label, "dtype": dtype_name}
    row["check"] = check_dcnlab(shape, dtype_name, device, args.seed)
    sets = input_sets(shape, dtype, device, args.seed)
    row["input_sets"] = len(sets)
    row["contenders"] = {
        c.name: bench_contender(c, sets, shape, device, args, gpu_time=c is DCNLAB) for c in (DCNLAB, TORCHVISION)
    }
    row["contenders"].update(bench_dense(sets, shape, device, args))
    if dtype == torch.bfloat16 and shape.dims == 2:
        fp16_sets = [Inputs(*(t.detach().half().requires_grad_() for t in s[:5]), s.grad_output.half()) for s in sets]
        del sets
        row["contenders"]["torchvision_fp16"] = bench_contender(TORCHVISION, fp16_sets, shape, device, args)
    row["ratios"] = ratios(row)
    return row


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_revision() -> str:
    """Short commit of the repository (with +dirty), or 'unknown' outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def source_digest() -> str:
    """sha256 (12 hex digits) of the compiled sources, csrc/ (every file, by sorted relative path and
    contents): it names the kernels a run measured where the commit does not (a working tree that
    differs from its HEAD, e.g. the copy on the lent GPU). For a commit, run it on a checkout of that
    commit (`git worktree add`)."""
    digest = hashlib.sha256()
    root = REPO_ROOT / "csrc"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def metadata(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the numbers depend on: device, versions, settings, date."""
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__ if torchvision is not None else None,
        "dcnlab": dcnlab.__version__,
        "git": git_revision(),
        "csrc_sha256": source_digest(),
        "python": platform.python_version(),
        "preset": args.preset,
        "dtypes": args.dtypes,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "max_seconds": args.max_seconds,
        "seed": args.seed,
        "rotation_bytes": ROTATION_BYTES,
        "command": " ".join(sys.argv),
    }
    if device.type == "cuda":
        meta |= {
            "device_name": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": "best of True and False (dense)",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    else:
        meta["device_name"] = f"{meta['cpu']}, {meta['threads']} threads"
    return meta


def json_safe(value: Any) -> Any:
    """value with non-finite floats replaced by the strings 'inf', '-inf', 'nan' (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def fmt_ms(value: float | None) -> str:
    """A time in ms with about three significant digits, or n/a."""
    if value is None:
        return "n/a"
    decimals = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:.{decimals}f}"


def fmt_ratio(value: float | None, suffix: str = "") -> str:
    """A ratio as `2.35x`, or n/a."""
    return "n/a" if value is None else f"{value:.2f}x{suffix}"


def fmt_check(check: dict[str, Any]) -> str:
    """`ok 3e-03` or `FAIL 5e-01`: the pass flag and the worst relative error of the float64 and dtype checks."""
    worst = max((run.get("worst_rel", math.inf) for run in check["runs"].values()), default=math.inf)
    return f"{'ok' if check['passed'] else 'FAIL'} {worst:.0e}"


def render_markdown(results: dict[str, Any]) -> str:
    """The header, the timing table and (on CUDA) the memory table, as markdown."""
    meta, rows = results["meta"], results["rows"]
    with_fp16 = any("torchvision_fp16" in row["contenders"] for row in rows)
    lines = [
        f"# dcnlab.ops.deform_conv benchmark ({meta['preset']} preset)",
        "",
        f"- device: {meta['device_name']}"
        + (f" (CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, host {meta['cpu']})" if meta["device"] == "cuda" else ""),
        f"- torch {meta['torch']}, torchvision {meta['torchvision']}, dcnlab {meta['dcnlab']} ({meta['git']}, "
        f"csrc sha256 {meta.get('csrc_sha256', 'n/a')}), "
        f"{meta['threads']} CPU threads, {meta['date']}",
        f"- host load average (1 min): {meta['loadavg_start']:.2f} at start, {meta['loadavg_end']:.2f} at end, "
        f"{meta['cpu_count']} CPUs (other processes on the host inflate the times)",
        f"- timing: {'CUDA events' if meta['device'] == 'cuda' else 'time.perf_counter'}, median of up to "
        f"{meta['repeats']} runs (at most {meta['max_seconds']} s each) after {meta['warmup']} warm-up runs, "
        f"rotating input sets; fwd under no_grad; fwd+bwd = forward + torch.autograd.grad for input, offset, "
        "mask, weight, bias (dense: input, weight, bias) with a random grad_output",
        "- inputs: C_in = C_out, stride 1, padding k//2, dilation 1, mask U(0,1) and bias on, offsets N(0,1); "
        "dense = torch.nn.functional.conv{1,2,3}d with the same weight"
        + (
            " (cuDNN, per mode the faster of its autotuned (benchmark=True) and heuristic (benchmark=False) "
            f"algorithms, cuDNN TF32={meta['cudnn_allow_tf32']}, "
            f"matmul TF32={meta['matmul_allow_tf32']})"
            if meta["device"] == "cuda"
            else ""
        ),
        "- check: dcnlab output and all gradients vs a float64 truth (torchvision for 2D, deform_conv_reference "
        f"otherwise) on a batch-1 slice with offsets' fractional parts in [{CHECK_OFFSET_MARGIN}, "
        f"{1 - CHECK_OFFSET_MARGIN}], in float64 and in the row's dtype; worst ||err||/||truth|| shown",
        f"- command: `{meta['command']}`",
        "",
    ]
    header = ["shape", "dtype", "check", "dcnlab fwd", "dcnlab f+b", "tv fwd", "tv f+b"]
    header += ["tv fp16 f+b"] if with_fp16 else []
    header += ["dense fwd", "dense f+b", "tv / dcnlab f+b", "dcnlab / dense fwd", "dcnlab / dense f+b"]
    lines += ["times in ms; `tv` = torchvision.ops.deform_conv2d, `f+b` = forward+backward", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ratio = row["ratios"]
        versus_fp16 = ratio["torchvision_dtype"] == "float16" and row["dtype"] != "float16"
        cells = [row["label"], SHORT_DTYPE[row["dtype"]], fmt_check(row["check"])]
        cells += [fmt_ms(median(row, name, mode)) for name in ("dcnlab", "torchvision") for mode in ("fwd", "fwd_bwd")]
        if with_fp16:
            has_fp16 = "torchvision_fp16" in row["contenders"]
            cells.append(fmt_ms(median(row, "torchvision_fp16", "fwd_bwd")) if has_fp16 else "—")
        cells += [fmt_ms(median(row, "dense", "fwd")), fmt_ms(median(row, "dense", "fwd_bwd"))]
        cells += [
            fmt_ratio(ratio["torchvision_over_dcnlab_fwd_bwd"], " (vs fp16)" if versus_fp16 else ""),
            fmt_ratio(ratio["dcnlab_over_dense_fwd"]),
            fmt_ratio(ratio["dcnlab_over_dense_fwd_bwd"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(gpu_ms(row, "dcnlab", "fwd") is not None for row in rows):
        lines += [
            "",
            f"kernel time per call, ms (torch.profiler: the CUDA kernels' times summed over {GPU_TIME_RUNS} calls, "
            "divided by the calls; the host's speed does not enter it, so these ratios compare across machine "
            "starts where a host-bound wall time above does not; dense: the variant picked above)",
            "",
            "| shape | dtype | dcnlab fwd | dcnlab f+b | dense fwd | dense f+b "
            "| dcnlab / dense fwd | dcnlab / dense f+b |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            ratio = row["ratios"]
            cells = [fmt_ms(gpu_ms(row, name, mode)) for name in ("dcnlab", "dense") for mode in ("fwd", "fwd_bwd")]
            cells += [fmt_ratio(ratio["dcnlab_over_dense_fwd_gpu"]), fmt_ratio(ratio["dcnlab_over_dense_fwd_bwd_gpu"])]
            lines.append(f"| {row['label']} | {SHORT_DTYPE[row['dtype']]} | " + " | ".join(cells) + " |")
    if meta["device"] == "cuda":
        names = ["dcnlab", "torchvision", "dense"] + (["torchvision_fp16"] if with_fp16 else [])
        lines += ["", "peak extra device memory of one fwd+bwd, MiB", ""]
        lines += ["| shape | dtype | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        for row in rows:
            peaks = [row["contenders"].get(name, {}).get("fwd_bwd_peak_mib") for name in names]
            cells = ["n/a" if peak is None else f"{peak:.0f}" for peak in peaks]
            lines.append(f"| {row['label']} | {SHORT_DTYPE[row['dtype']]} | " + " | ".join(cells) + " |")
    failures = [f"{row['label']} {row['dtype']}" for row in rows if not row["check"]["passed"]]
    if failures:
        lines += ["", f"**CHECK FAILED** (see JSON for errors): {', '.join(failures)}"]
    return "\n".join(lines) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Bar chart of fwd+bwd time relative to dense conv per shape, one panel per dtype; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["rows"]
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    series = [("dcnlab", "dcnlab"), ("torchvision", "torchvision"), ("torchvision_fp16", "torchvision fp16")]
    figure, axes = plt.subplots(len(dtypes), 1, figsize=(10, 3.5 * len(dtypes)), squeeze=False)
    for axis, dtype in zip(axes[:, 0], dtypes, strict=True):
        dtype_rows = [row for row in rows if row["dtype"] == dtype]
        present = {}
        for name, legend in series:
            values = []
            for row in dtype_rows:
                time_ms, dense_ms = median(row, name, "fwd_bwd"), median(row, "dense", "fwd_bwd")
                values.append(time_ms / dense_ms if time_ms is not None and dense_ms else math.nan)
            if not all(math.isnan(v) for v in values):
                present[legend] = values
        width = 0.8 / max(1, len(present))
        for index, (legend, values) in enumerate(present.items()):
            positions = [i + (index - (len(present) - 1) / 2) * width for i in range(len(dtype_rows))]
            axis.bar(positions, values, width, label=legend)
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="dense conv")
        axis.set_yscale("log")
        axis.set_xticks(
            range(len(dtype_rows)), [row["label"] for row in dtype_rows], rotation=15, ha="right", fontsize=8
        )
        axis.set_ylabel("fwd+bwd time / dense")
        axis.set_title(f"{SHORT_DTYPE[dtype]} on {results['meta']['device_name']}", fontsize=9)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults depend on --device."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shape preset (default: the device's)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default cpu: float32; cuda: bf16 fp16 fp32")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 2 on CPU, torch's on CUDA)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default cpu 10, cuda 100)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per measurement (default cpu 2, cuda 10)")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="stop a measurement early after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", type=Path, default=REPO_ROOT / "docs/benchmarks-latest.md", help="markdown output")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "docs/benchmarks-latest.json", help="raw JSON output")
    parser.add_argument("--plot", type=Path, help="PNG of fwd+bwd time relative to dense conv (needs matplotlib)")
    parser.add_argument("--replot", type=Path, help="only redraw --plot from this --json file of an earlier run")
    args = parser.parse_args(argv)
    if args.replot is not None and args.plot is None:
        parser.error("--replot needs --plot")
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.preset = args.preset or args.device
    args.dtypes = args.dtypes or (["bfloat16", "float16", "float32"] if on_cuda else ["float32"])
    args.repeats = args.repeats or (100 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    if args.threads is None and not on_cuda:
        args.threads = 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the preset, print and write the table, JSON and plot; 1 when a correctness check failed."""
    args = parse_args(argv)
    if args.replot is not None:
        return 0 if write_plot(json.loads(args.replot.read_text()), args.plot) else 1
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {"meta": metadata(device, args), "rows": []}
    for shape in PRESETS[args.preset]:
        for dtype_name in args.dtypes:
            print(f"# {shape.label} {dtype_name}", file=sys.stderr, flush=True)
            results["rows"].append(bench_row(shape, dtype_name, device, args))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["meta"]["loadavg_end"] = os.getloadavg()[0]
    markdown = render_markdown(results)
    print(markdown)
    for path, text in ((args.md, markdown), (args.json, json.dumps(json_safe(results), indent=1) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if args.plot is not None and not write_plot(results, args.plot):
        print(f"--plot {args.plot}: matplotlib is not importable, no plot written", file=sys.stderr)
    return 0 if all(row["check"]["passed"] for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
