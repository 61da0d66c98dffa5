#!/usr/bin/env bash
# Nsight Compute profiles of the block-sparse attention kernels
# (docs/performance.md#block-sparse-attention-kernel) and MLA decode (docs/methods/mla.md) on the
# GPU machine: one call of each target, full section set, clocks left alone.
#   bash scripts/profiling/profile_kernels_ncu.sh OUT_DIR [TARGET ...]
# Default targets: mosaic16k tokamax16k cudnn16k mla128 mla16 (see profile_kernels_ncu.py).
# Writes OUT_DIR/TARGET.txt (the details page) and OUT_DIR/TARGET.raw.csv (every metric of
# every profiled kernel); SOURCE=1 adds OUT_DIR/TARGET.sass.csv (per-instruction SASS counters
# and stall samples); the reports and logs go to ${NCU_REPORTS:-/tmp/ncu_reports}.
# QUICK=1: only cycle, time, tensor-pipe and instruction counters (one or two replay passes; for
# A/B comparisons in cycles, which clock changes do not move), details page only.
# Rarely the profiled python crashes at start under ncu (rc=139 before any kernel): rerun it.
set -uo pipefail
out=${1:?usage: profile_kernels_ncu.sh OUT_DIR [TARGET ...]}
shift
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(mosaic16k tokamax16k cudnn16k mla128 mla16)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu not found"; exit 1; }
reports=${NCU_REPORTS:-/tmp/ncu_reports}
mkdir -p "$out" "$reports"
out=$(cd "$out" && pwd)            # absolute: the targets run from the repository root
reports=$(cd "$reports" && pwd)
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # ncu's replay saves and restores device memory
cd "$(dirname "$0")/../.." || exit 1  # the repository root: python -m scripts.profiling...
for t in "${targets[@]}"; do
  echo "== $t"
  if [ "${QUICK:-0}" = 1 ]; then
    sections=(--metrics "sm__cycles_active.avg,sm__cycles_active.min,sm__cycles_active.max,sm__cycles_elapsed.max,gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum")
  else
    sections=(--set full --metrics sm__cycles_active.min,sm__cycles_active.max,sm__cycles_active.avg)
  fi
  timeout 240 "$ncu" --profile-from-start off --clock-control none "${sections[@]}" \
    -f -o "$reports/$t" python3 -m scripts.profiling.profile_kernels_ncu "$t" > "$reports/$t.log" 2>&1
  echo "rc=$? $(tail -2 "$reports/$t.log" | tr '\n' ' ')"
  "$ncu" -i "$reports/$t.ncu-rep" --page details > "$out/$t.txt" 2>&1
  [ "${QUICK:-0}" = 1 ] || "$ncu" -i "$reports/$t.ncu-rep" --page raw --csv > "$out/$t.raw.csv" 2>&1
  if [ "${SOURCE:-0}" = 1 ]; then
    "$ncu" -i "$reports/$t.ncu-rep" --page source --csv --print-source sass > "$out/$t.sass.csv" 2>&1
  fi
  grep -E "^  [a-zA-Z_].*\(|Duration|Elapsed Cycles|SM Active Cycles|Compute \(SM\) Throughput|Memory Throughput|Registers Per|sm__|smsp__|gpu__" "$out/$t.txt" | grep -A8 -E "mosaic_gpu_kernel|flash|sdpa" | head -40
done
