"""Summarise Nsight Compute per-instruction source counters of one kernel.

Input: the CSV that `ncu --import REPORT.ncu-rep --page source --csv --print-source sass` writes
for a report collected with `--section SourceCounters --section WarpStateStats` (one kernel
launch). Prints the kernel's instructions executed and stall samples, the stall reasons' shares,
the opcode mix, and, with --regions, the share of instructions and samples of each range of SASS
lines (line numbers as listed by --list); --list prints every executed instruction with its count,
samples and top two stall reasons, which is how the ranges are found (loop bodies share a count).

    ncu --kernel-name regex:forward_kernel --launch-skip 2 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o /tmp/rep python3 scripts/ncu_case.py ...
    ncu --import /tmp/rep.ncu-rep --page source --csv --print-source sass > /tmp/src.csv
    python scripts/ncu_source_summary.py /tmp/src.csv --list --min-count 100000
    python scripts/ncu_source_summary.py /tmp/src.csv --regions 0,386,1017,1144,1691,2237,2576

docs/perf-notes.md (session 12) has what it found in the fused kernels.
"""

import argparse
import collections
import csv

SOURCE = "Source"
EXECUTED = "Instructions Executed"
SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    # The first row names the kernel, the second holds the column names.
    start = next(i for i, row in enumerate(rows) if SOURCE in row and EXECUTED in row)
    return rows[start], rows[start + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--regions", help="comma-separated SASS line numbers bounding the regions")
    parser.add_argument("--list", action="store_true", help="print the executed instructions")
    parser.add_argument("--min-count", type=float, default=1, help="with --list: at least this many executions")
    args = parser.parse_args()

    header, rows = read(args.csv)
    column = {name: i for i, name in enumerate(header)}

    def value(row: list[str], name: str) -> float:
        try:
            return float(row[column[name]].replace(",", ""))
        except (ValueError, IndexError):
            return 0.0

    executed = [value(row, EXECUTED) for row in rows]
    samples = [value(row, SAMPLES) for row in rows]
    total, total_samples = sum(executed), sum(samples) or 1.0
    print(f"{args.csv}: {total / 1e6:.2f} M warp instructions executed, {total_samples:.0f} stall samples")

    stalls = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    shares = {name[6:]: sum(value(row, name) for row in rows) / total_samples for name in stalls}
    print(
        "stall reasons:",
        ", ".join(f"{k} {v:.1%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.01),
    )

    mix: collections.Counter = collections.Counter()
    for row, count in zip(rows, executed, strict=True):
        words = [w for w in row[column[SOURCE]].split() if not w.startswith("@")]
        if words:
            mix[words[0].split(".")[0]] += count
    print("opcode mix:", ", ".join(f"{op} {count / total:.1%}" for op, count in mix.most_common(16)))

    if args.regions:
        bounds = [int(x) for x in args.regions.split(",")]
        for first, end in zip(bounds[:-1], bounds[1:], strict=False):
            part, part_samples = sum(executed[first:end]), sum(samples[first:end])
            print(
                f"lines {first:5d}-{end:5d}: {part / 1e6:8.2f} M instructions ({part / total:5.1%}), "
                f"samples {part_samples / total_samples:5.1%}"
            )

    if args.list:
        for line, (row, count, sampled) in enumerate(zip(rows, executed, samples, strict=True)):
            if count < args.min_count:
                continue
            top = sorted(((value(row, name), name[6:]) for name in stalls), reverse=True)[:2]
            reasons = " ".join(f"{name}:{n:.0f}" for n, name in top if n)
            print(f"{line:5d} {count:10.0f} {sampled:6.0f} {row[column[SOURCE]].strip()[:72]:72s} {reasons}")


if __name__ == "__main__":
    main()
