"""Side-by-side reading of Nsight Compute exports from ``scripts/profiling/profile_kernels_ncu.sh``.

    python -m scripts.profiling.ncu_compare DIR TARGET:KERNEL_SUBSTRING
        [TARGET:KERNEL_SUBSTRING ...] [--top 20]

For each target, reads ``DIR/TARGET.raw.csv`` (``--page raw --csv``) and, when present,
``DIR/TARGET.sass.csv`` (``--page source --csv --print-source sass``; either may be gzipped), picks the kernel whose
name contains the substring, and prints: duration, SM active cycles (mean, min, max over SMs),
tensor-pipe activity, issued instructions, warps resident, stall reasons per issued
instruction; then, from the SASS export, the stall-sample shares by reason and by opcode and
the instructions with the most samples. No GPU needed.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
from pathlib import Path

METRICS = [  # (label, raw metric name)
    ("duration ms", "gpu__time_duration.sum"),
    ("SM active cycles, mean", "sm__cycles_active.avg"),
    ("SM active cycles, min", "sm__cycles_active.min"),
    ("SM active cycles, max", "sm__cycles_active.max"),
    ("tensor pipe active, % of active cycles",
     "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("issued warp instructions", "smsp__inst_executed.sum"),
    ("issue slots busy, %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("warps resident per SM", "sm__warps_active.avg.per_cycle_active"),
    ("MUFU (xu) pipe, % of active", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
    ("DRAM read, % of peak", "dram__bytes_read.sum.pct_of_peak_sustained_elapsed"),
]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def _open(path: Path):
    """The CSV, or its gzipped copy (``benchmarks/results`` keeps them compressed)."""
    return path.open() if path.exists() else gzip.open(f"{path}.gz", "rt")


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return float("nan")


def raw_row(path: Path, kernel: str) -> dict:
    """The metrics of the first kernel whose name contains ``kernel`` (raw page CSV)."""
    rows = list(csv.reader(_open(path)))
    hi = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    hdr = rows[hi]
    name = hdr.index("Kernel Name")
    for r in rows[hi + 2:]:
        if len(r) == len(hdr) and kernel in r[name]:
            return dict(zip(hdr, r))
    raise SystemExit(f"{path}: no kernel named like {kernel!r}")


def sass_rows(path: Path, kernel: str) -> list[dict]:
    """Per-instruction rows of one kernel from the source page CSV (one block per kernel)."""
    rows, out, hdr = list(csv.reader(_open(path))), None, None
    for i, r in enumerate(rows):
        if r and r[0] == "Kernel Name":
            if out is not None:
                break
            if kernel in r[1]:
                hdr, out = rows[i + 1], []
        elif out is not None and r and r[0] != "Address":
            out.append(dict(zip(hdr, r)))
    if not out:
        raise SystemExit(f"{path}: no kernel named like {kernel!r}")
    return out


def print_sass(rows: list[dict], top: int) -> None:
    samples = "Warp Stall Sampling (All Samples)"
    total = sum(_num(r[samples]) for r in rows) or 1.0
    executed = sum(_num(r["Instructions Executed"]) for r in rows)
    stalls = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    by_reason = collections.Counter({k: sum(_num(r[k]) for r in rows) for k in stalls})
    by_op, op_exec = collections.Counter(), collections.Counter()
    for r in rows:
        words = [w for w in r["Source"].split() if not w.startswith("@")]
        op = words[0].split(".")[0] if words else "?"
        by_op[op] += _num(r[samples])
        op_exec[op] += _num(r["Instructions Executed"])
    print(f"  {len(rows)} SASS instructions, {total:.0f} stall samples")
    print("  samples by reason: " + ", ".join(f"{k[6:]} {v / total:.1%}"
                                              for k, v in by_reason.most_common(8)))
    print("  samples by opcode: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_op.most_common(10)))
    print("  executed by opcode: " + ", ".join(f"{k} {v / executed:.1%}"
                                               for k, v in op_exec.most_common(12)))
    for r in sorted(rows, key=lambda r: -_num(r[samples]))[:top]:
        s = _num(r[samples])
        why = sorted(((_num(r[k]), k[6:]) for k in stalls), reverse=True)[0]
        print(f"  {s / total:6.1%}  x{_num(r['Instructions Executed']):9.3g}  "
              f"{r['Source'][:64]:64s} {why[1]} {why[0] / max(s, 1):.0%}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("targets", nargs="+", help="TARGET:KERNEL_SUBSTRING")
    ap.add_argument("--top", type=int, default=12, help="instructions with most samples")
    args = ap.parse_args()
    pairs = [t.split(":", 1) for t in args.targets]
    raws = [raw_row(args.dir / f"{t}.raw.csv", k) for t, k in pairs]
    print(f"{'':44s}" + "".join(f"{t:>16s}" for t, _ in pairs))
    for label, key in METRICS:
        print(f"{label:44s}" + "".join(f"{_num(r.get(key, 'nan')):16.4g}" for r in raws))
    stall_keys = sorted({k for r in raws for k in r if k.startswith(STALL_PREFIX)
                         and k.endswith("_per_issue_active.ratio")})
    for key in stall_keys:
        vals = [_num(r.get(key, "nan")) for r in raws]
        if max(vals) >= 0.05:
            label = "stall " + key[len(STALL_PREFIX):].replace("_per_issue_active.ratio", "")
            print(f"{label:44s}" + "".join(f"{v:16.3f}" for v in vals))
    for t, k in pairs:
        sass = args.dir / f"{t}.sass.csv"
        if sass.exists() or Path(f"{sass}.gz").exists():
            print(f"\n{t} ({k}):")
            print_sass(sass_rows(sass, k), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
