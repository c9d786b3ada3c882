"""Does deformable help? Trains the DCN model and its plain-conv twin on each modality's synthetic
deformation task with the same budget (data, epochs, optimiser) over several seeds, on the CPU,
and writes a markdown table and JSON.

    python scripts/compare.py --seeds 0 1 2 --epochs 5 --md docs/results.md
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcnlab.runner import train  # noqa: E402

PRESETS = {"signals1d": "1D warped signals", "shapes2d": "2D warped shapes", "volumes3d": "3D warped volumes"}


def run(preset: str, deformable: bool, seed: int, args: argparse.Namespace, output_dir: Path) -> dict[str, float]:
    """One training run; returns its test metrics plus wall time and parameter count."""
    overrides = [
        f"experiment={preset}",
        f"seed={seed}",
        f"model.deformable={str(deformable).lower()}",
        f"trainer.max_epochs={args.epochs}",
        f"data.train_samples={args.train_samples}",
        f"data.val_samples={args.eval_samples}",
        f"data.test_samples={args.eval_samples}",
        "callbacks.progress_bar=null",
        "logger=csv",
    ]
    with initialize_config_module(version_base="1.3", config_module="dcnlab.conf"):
        config = compose("train", overrides=overrides)
    with open_dict(config):
        config.paths.output_dir = str(output_dir)
        config.trainer.enable_progress_bar = False
        config.trainer.enable_model_summary = False
    start = time.perf_counter()
    metrics = train(config)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default: print only)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for preset in args.presets:
        for name, deformable in (("DCN", True), ("plain twin", False)):
            for seed in args.seeds:
                output_dir = args.output / preset / ("dcn" if deformable else "plain") / f"seed{seed}"
                metrics = run(preset, deformable, seed, args, output_dir)
                results.setdefault(preset, {}).setdefault(name, []).append(metrics)
                print(f"{preset} {name} seed {seed}: test accuracy {metrics['test/accuracy']:.4f}", flush=True)

    def cell(runs: list[dict[str, float]], key: str) -> str:
        values = [r[key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    lines = [
        "| task | model | test accuracy | test macro-F1 | seconds per run |",
        "|---|---|---|---|---|",
    ]
    for preset, by_model in results.items():
        for name, runs in by_model.items():
            seconds = statistics.mean(r["seconds"] for r in runs)
            lines.append(
                f"| {PRESETS[preset]} | {name} | {cell(runs, 'test/accuracy')} | {cell(runs, 'test/macro_f1')} | "
                f"{seconds:.0f} |"
            )
    header = (
        f"Seeds {args.seeds}, {args.epochs} epochs, {args.train_samples} training and {args.eval_samples} "
        f"validation/test samples, CPU with {args.threads} threads; mean ± standard deviation over seeds.\n"
    )
    table = header + "\n" + "\n".join(lines) + "\n"
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
