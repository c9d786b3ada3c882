"""End-to-end training on the GPU: each modality's preset with bf16-mixed and 16-mixed, the DCN model
and its plain-conv twin, each run a `python -m dcnlab train` subprocess; test metric, training
samples/s (the TrainThroughput callback's train/samples_per_s: training batches after a warm-up, all
ranks, validation excluded) and peak GPU memory, read back from each run's metrics.json. Writes
e2e.json and e2e.md (card and torch version on top) under --output.

    python scripts/gpu_e2e.py --output $OUT/e2e
    python scripts/gpu_e2e.py --ddp --output $OUT/ddp        # needs 2 GPUs
    python scripts/gpu_e2e.py --accelerator cpu --epochs 1 --samples 64 --output /tmp/e2e   # dry run

--ddp trains one preset (shapes2d, bf16-mixed) on 1 GPU and with DDP on 2, over several seeds, in two
DDP set-ups: the same global batch (per-GPU batch halved: the same optimisation as on 1 GPU, so its
test metric is the one to hold against the 1-GPU metric) and the same per-GPU batch (global batch
doubled, half the steps: the usual weak-scaling throughput). Scaling efficiency =
samples/s(2 GPUs) / (2 * samples/s(1 GPU)). Writes ddp.json and ddp.md.

`python -m dcnlab` must work (dcnlab and hydra importable); runs write under --output/runs/.
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"signals1d": "1D signals", "shapes2d": "2D shapes", "volumes3d": "3D volumes"}
METRICS = ("test/accuracy", "test/dice")  # the first one a run reports is its test metric


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_output = Path(os.environ["OUT"]) / "gpu_e2e" if os.environ.get("OUT") else Path("outputs/gpu_e2e")
    parser.add_argument("--output", type=Path, default=default_output, help="default: $OUT/gpu_e2e")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu", help="cpu: a dry run of the script")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "16-mixed"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--samples", type=int, default=None, help="training samples (validation and test: a quarter); default: preset's"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="per run (1 GPU); default: preset's, 64 for --ddp")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (0 1 2 for --ddp)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data.num_workers per process; default 8 on GPU (items are generated on the fly on the CPU), 0 on CPU",
    )
    parser.add_argument("--ddp", action="store_true", help="1 GPU vs DDP on --devices GPUs instead of the matrix")
    parser.add_argument("--ddp-preset", choices=list(PRESETS), default="shapes2d")
    parser.add_argument("--ddp-precision", default="bf16-mixed")
    parser.add_argument("--ddp-batch", choices=["global", "per-gpu", "both"], default="both")
    parser.add_argument("--devices", type=int, default=2, help="processes of the DDP runs")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per training run (then it is killed)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. model.base_width=64")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = [0, 1, 2] if args.ddp else [0]
    if args.batch_size is None and args.ddp:
        args.batch_size = 64
    if args.workers is None:
        args.workers = 8 if args.accelerator == "gpu" else 0
    if args.ddp and args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} must split evenly over --devices {args.devices}")
    args.output = args.output.resolve()
    return args


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Card(s), versions and the commit, for the top of the report."""
    if args.accelerator == "gpu":
        if not torch.cuda.is_available():
            sys.exit("gpu_e2e: no CUDA device visible (use --accelerator cpu for a dry run)")
        count = torch.cuda.device_count()
        if args.ddp and count < args.devices:
            sys.exit(f"gpu_e2e: --ddp needs {args.devices} GPUs, {count} visible")
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        card = ", ".join(f"{n} x {name}" for name, n in {name: names.count(name) for name in names}.items())
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dry run"
    try:
        import lightning

        lightning_version = lightning.__version__
    except ImportError:
        lightning_version = "?"
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "card": card,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "lightning": lightning_version,
        "commit": commit or "?",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def data_overrides(args: argparse.Namespace, batch_size: int | None) -> list[str]:
    overrides = [f"data.num_workers={args.workers}"]
    if args.samples is not None:
        held_out = max(args.samples // 4, 8)
        overrides += [f"data.train_samples={args.samples}", f"data.val_samples={held_out}"]
        overrides += [f"data.test_samples={held_out}"]
    if batch_size is not None:
        overrides.append(f"data.batch_size={batch_size}")
    return overrides


def train_run(overrides: list[str], run_dir: Path, args: argparse.Namespace) -> dict:
    """One `python -m dcnlab train` in run_dir (log: run_dir/stdout.log); its metrics.json and wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # never read an earlier invocation's metrics.json
    run_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "dcnlab",
        "train",
        *overrides,
        "callbacks.progress_bar=null",
        *args.overrides,
        f'hydra.run.dir="{run_dir}"',
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with (run_dir / "stdout.log").open("w") as log:
        # Own process group: a DDP run's extra ranks are killed with it on a timeout.
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = 124
            print(f"\ntimed out after {args.timeout} s", file=log)
        except BaseException:  # interrupted: leave no training processes behind
            os.killpg(process.pid, signal.SIGKILL)
            raise
    seconds = time.perf_counter() - start
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if returncode == 0 and metrics_file.is_file() else {}
    name = next((key for key in METRICS if key in metrics), None)
    result = {
        "run_dir": str(run_dir),
        "command": " ".join(command),
        "returncode": returncode,
        "wall_s": round(seconds, 1),
        "metric_name": name,
        "metric": metrics.get(name) if name else None,
        "samples_per_s": metrics.get("train/samples_per_s"),
        "timed_samples": metrics.get("train/timed_samples"),
        "peak_memory_gib": metrics.get("train/peak_memory_gib"),
        "metrics": metrics,
    }
    if returncode != 0 or not metrics:
        tail = (run_dir / "stdout.log").read_text().splitlines()[-25:]
        print(f"FAILED (exit {returncode}): {' '.join(command)}\n" + "\n".join(tail), file=sys.stderr, flush=True)
    return result


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present or len(present) < len(values):
        return None, None
    return statistics.mean(present), (statistics.stdev(present) if len(present) > 1 else None)


def fmt(value: float | None, sd: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def metric_header(runs: list[dict]) -> str:
    names = {r["metric_name"] for r in runs if r["metric_name"]}
    return f"test {names.pop().split('/')[1]}" if len(names) == 1 else "test metric"


def header(title: str, env: dict[str, str], args: argparse.Namespace, batch: str) -> list[str]:
    samples = f"{args.samples} training samples" if args.samples else "the presets' sample counts"
    lines = [
        f"# {title}",
        "",
        f"- card: **{env['card']}**",
        f"- torch {env['torch']} (CUDA {env['cuda']}), lightning {env['lightning']}, dcnlab {env['commit']}, "
        f"{env['date']}",
        f"- budget per run: {args.epochs} epoch(s), {samples}, {batch}, data.num_workers={args.workers}, "
        f"seeds {args.seeds}" + (f", extra overrides {args.overrides}" if args.overrides else ""),
        "- samples/s: training batches only (loading, copy, forward, backward, step) after the warm-up, "
        "validation excluded, summed over ranks; mean ± sd over seeds where there are several",
    ]
    if args.accelerator == "cpu":
        lines.append("- CPU dry run: Lightning runs 16-mixed as bf16-mixed on the CPU; no GPU memory figures")
    return [*lines, ""]


def matrix_plan(args: argparse.Namespace) -> list[tuple[dict, list[str], Path]]:
    """(labels, overrides, run directory) of each run: presets x precisions x {DCN, plain} x seeds."""
    plan = []
    for preset in args.presets:
        for precision in args.precisions:
            for model, deformable in (("DCN", True), ("plain", False)):
                for seed in args.seeds:
                    overrides = [
                        f"experiment={preset}",
                        "trainer=gpu",
                        f"trainer.accelerator={args.accelerator}",
                        "trainer.devices=1",
                        f"trainer.precision={precision}",
                        f"trainer.max_epochs={args.epochs}",
                        f"model.deformable={str(deformable).lower()}",  # the plain-conv twin when false
                        f"seed={seed}",
                        *data_overrides(args, args.batch_size),
                    ]
                    labels = {"preset": preset, "precision": precision, "model": model, "seed": seed}
                    plan.append(
                        (labels, overrides, args.output / "runs" / preset / precision / model.lower() / f"seed{seed}")
                    )
    return plan


def failures(selected: list[dict]) -> str:
    failed = [r for r in selected if r["returncode"] != 0 or not r["metrics"]]
    return f" (FAILED: {len(failed)} of {len(selected)})" if failed else ""


def matrix_table(args: argparse.Namespace, env: dict[str, str], runs: list[dict]) -> tuple[list[dict], str]:
    def group(preset: str, precision: str, model: str) -> list[dict]:
        return [r for r in runs if (r["preset"], r["precision"], r["model"]) == (preset, precision, model)]

    batch = f"batch size {args.batch_size}" if args.batch_size else "the presets' batch sizes"
    lines = header("dcnlab end-to-end training: DCN vs plain twin, bf16-mixed vs 16-mixed", env, args, batch)
    lines += [
        f"| modality | model | precision | {metric_header(runs)} | samples/s | DCN/plain throughput | "
        "peak GPU memory (GiB) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for preset in args.presets:
        for precision in args.precisions:
            plain_rate, _ = mean_sd([r["samples_per_s"] for r in group(preset, precision, "plain")])
            for model in ("DCN", "plain"):
                selected = group(preset, precision, model)
                if not selected:
                    continue
                metric, metric_sd = mean_sd([r["metric"] for r in selected])
                rate, rate_sd = mean_sd([r["samples_per_s"] for r in selected])
                memory, _ = mean_sd([r["peak_memory_gib"] for r in selected])
                ratio = rate / plain_rate if model == "DCN" and rate and plain_rate else None
                lines.append(
                    f"| {PRESETS[preset]} | {model}{failures(selected)} | {precision} | {fmt(metric, metric_sd)} | "
                    f"{fmt(rate, rate_sd, 0)} | {fmt(ratio, digits=2) if model == 'DCN' else '1'} | "
                    f"{fmt(memory, digits=2)} | {statistics.mean(r['wall_s'] for r in selected):.0f} |"
                )
                summary.append(
                    {
                        "preset": preset,
                        "model": model,
                        "precision": precision,
                        "metric": metric,
                        "metric_sd": metric_sd,
                        "samples_per_s": rate,
                        "samples_per_s_sd": rate_sd,
                        "dcn_over_plain_throughput": ratio,
                        "peak_memory_gib": memory,
                    }
                )
    return summary, "\n".join(lines)


def ddp_configs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(name, processes, per-process batch) of the 1-GPU reference and the DDP set-ups."""
    configs = [("1 GPU", 1, args.batch_size)]
    if args.ddp_batch in ("global", "both"):
        configs.append((f"DDP {args.devices}, same global batch", args.devices, args.batch_size // args.devices))
    if args.ddp_batch in ("per-gpu", "both"):
        configs.append((f"DDP {args.devices}, same per-GPU batch", args.devices, args.batch_size))
    return configs


def ddp_plan(args: argparse.Namespace) -> list[tuple[dict, list[str], Path]]:
    plan = []
    for name, devices, per_device in ddp_configs(args):
        for seed in args.seeds:
            trainer = (
                ["trainer=gpu", "trainer.devices=1"] if devices == 1 else ["trainer=ddp", f"trainer.devices={devices}"]
            )
            overrides = [
                f"experiment={args.ddp_preset}",
                *trainer,
                f"trainer.accelerator={args.accelerator}",
                f"trainer.precision={args.ddp_precision}",
                f"trainer.max_epochs={args.epochs}",
                f"seed={seed}",
                *data_overrides(args, per_device),
            ]
            labels = {"config": name, "devices": devices, "per_device_batch": per_device, "seed": seed}
            plan.append((labels, overrides, args.output / "runs" / "ddp" / f"{devices}x{per_device}" / f"seed{seed}"))
    return plan


def ddp_table(args: argparse.Namespace, env: dict[str, str], runs: list[dict]) -> tuple[list[dict], str]:
    def select(name: str) -> list[dict]:
        return [r for r in runs if r["config"] == name]

    base_metric, base_sd = mean_sd([r["metric"] for r in select("1 GPU")])
    base_rate, _ = mean_sd([r["samples_per_s"] for r in select("1 GPU")])
    title = f"dcnlab DDP check: {PRESETS[args.ddp_preset]} ({args.ddp_preset}), {args.ddp_precision}"
    lines = header(title, env, args, f"global batch {args.batch_size} on 1 GPU")[:-1]
    lines += [
        "- within noise: |Δ| ≤ 2 × the pooled seed standard deviation of the two set-ups (needs ≥ 2 seeds); "
        "the same-global-batch set-up is the one that should match (same batch, same number of steps)",
        "- scaling efficiency = samples/s(N GPUs) / (N × samples/s(1 GPU))",
        "",
        f"| set-up | GPUs | per-GPU batch | global batch | {metric_header(runs)} | Δ vs 1 GPU | within noise | "
        "samples/s | scaling efficiency | peak GPU memory (GiB) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for name, devices, per_device in ddp_configs(args):
        selected = select(name)
        if not selected:
            continue
        metric, metric_sd = mean_sd([r["metric"] for r in selected])
        rate, rate_sd = mean_sd([r["samples_per_s"] for r in selected])
        memory, _ = mean_sd([r["peak_memory_gib"] for r in selected])
        delta = metric - base_metric if devices > 1 and metric is not None and base_metric is not None else None
        efficiency = rate / (devices * base_rate) if devices > 1 and rate and base_rate else None
        within = None
        if delta is not None and metric_sd is not None and base_sd is not None:
            within = abs(delta) <= 2 * math.sqrt((metric_sd**2 + base_sd**2) / 2)
        verdict = "-" if devices == 1 else ("n/a" if within is None else ("yes" if within else "NO"))
        lines.append(
            f"| {name}{failures(selected)} | {devices} | {per_device} | {devices * per_device} | "
            f"{fmt(metric, metric_sd)} | {fmt(delta) if devices > 1 else '-'} | {verdict} | {fmt(rate, rate_sd, 0)} | "
            f"{fmt(efficiency, digits=2) if devices > 1 else '-'} | {fmt(memory, digits=2)} | "
            f"{statistics.mean(r['wall_s'] for r in selected):.0f} |"
        )
        summary.append(
            {
                "config": name,
                "devices": devices,
                "per_device_batch": per_device,
                "metric": metric,
                "metric_sd": metric_sd,
                "delta": delta,
                "within_noise": within,
                "samples_per_s": rate,
                "samples_per_s_sd": rate_sd,
                "scaling_efficiency": efficiency,
                "peak_memory_gib": memory,
            }
        )
    return summary, "\n".join(lines)


def main() -> int:
    args = parse_args()
    env = environment(args)
    args.output.mkdir(parents=True, exist_ok=True)
    print(f"gpu_e2e: {env['card']} | torch {env['torch']} | output {args.output}", flush=True)
    plan, table, stem = (ddp_plan, ddp_table, "ddp") if args.ddp else (matrix_plan, matrix_table, "e2e")
    runs: list[dict] = []
    for labels, overrides, run_dir in plan(args):
        result = {**labels, **train_run(overrides, run_dir, args)}
        runs.append(result)
        print(
            " ".join(str(v) for v in labels.values())
            + f": {result['metric_name']} {fmt(result['metric'])}, {fmt(result['samples_per_s'], digits=0)} samples/s, "
            f"{result['wall_s']} s",
            flush=True,
        )
        # Written after every run, so a run cut short still leaves a report of what finished.
        summary, markdown = table(args, env, runs)
        report = {
            "environment": env,
            "args": vars(args) | {"output": str(args.output)},
            "summary": summary,
            "runs": runs,
        }
        (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.output / f"{stem}.md").write_text(markdown + "\n")
    print("\n" + markdown, flush=True)
    failed = [r for r in runs if r["returncode"] != 0 or not r["metrics"]]
    if failed:
        print(f"\ngpu_e2e: {len(failed)} run(s) failed; logs: " + ", ".join(r["run_dir"] for r in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
