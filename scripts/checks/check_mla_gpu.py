"""GPU equivalence check of the MLA decode Pallas kernels (run on the H100).

    python -m scripts.checks.check_mla_gpu [--out DIR] [--impls triton mosaic_gpu] [--only TEXT ...]

``--impls``: ``triton`` (the Pallas Triton kernel, its tiling knobs per case) and ``mosaic_gpu``
(the Pallas Mosaic GPU kernel, Hopper; ``mosaic`` and ``pallas_mosaic`` are accepted for it,
``pallas_gpu`` for ``triton``), whose cases set fields of ``MLADecodeMosaicConfig``.

Each case draws fresh random inputs (ragged lengths incl. 0, 1 and non-multiples of 64, pages
out of order, unused page-table slots = -1), runs the kernel with poisoned outputs, and compares
with the float32 reference run on the GPU (`mla_decode_reference`, itself checked against
float64 NumPy in tests/test_mla_decode.py). Prints one line per case; writes check_mla_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gpu.mla_decode_mosaic import MLADecodeMosaicConfig, mla_decode_mosaic
from pallas_kernels.gpu.mla_decode_triton import mla_decode_triton
from pallas_kernels.mla_reference import mla_decode_reference
from scripts.common.impl_names import canonical

PAGE = 64
TAU = 192 ** -0.5 * (0.1 * np.log(40.0) + 1) ** 2  # DeepSeek-V3's softmax scale

CASES = [  # name, B, H, Dc, Dr, lengths (None: random up to max_len), max_len, dtype, kwargs
    ("ragged_h16_bf16", 4, 16, 512, 64, (0, 1, 63, 1000), 1024, jnp.bfloat16, {}),
    ("ragged_h16_f32", 4, 16, 512, 64, (1, 64, 65, 777), 1024, jnp.float32, {}),
    ("h128_bf16_bh32", 3, 128, 512, 64, (5000, 1, 4097), 8192, jnp.bfloat16, dict(block_h=32)),
    ("h128_bf16_bh64", 3, 128, 512, 64, (5000, 1, 4097), 8192, jnp.bfloat16, dict(block_h=64)),
    ("h128_bf16_default", 5, 128, 512, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16, {}),
    ("h128_bf16_bn128", 3, 128, 512, 64, (5000, 65, 4097), 8192, jnp.bfloat16,
     dict(block_h=64, block_n=128, num_stages=1)),
    ("h128_bf16_bn32", 3, 128, 512, 64, (5000, 33, 4097), 8192, jnp.bfloat16,
     dict(block_h=64, block_n=32, num_stages=3)),
    ("h64_bf16_default", 3, 64, 512, 64, (77, 4096, 1), 4096, jnp.bfloat16, {}),
    ("h16_bf16_bn32", 4, 16, 512, 64, (1, 31, 1000, 97), 1024, jnp.bfloat16,
     dict(block_n=32, num_stages=4)),
    ("h5_bf16_split7", 5, 5, 512, 64, None, 3000, jnp.bfloat16, dict(num_splits=7)),
    ("b64_h16_32k_bf16", 64, 16, 512, 64, None, 32768, jnp.bfloat16, {}),
]
# The Mosaic GPU kernel (bf16/f16 only; the dicts are MLADecodeMosaicConfig fields): DeepSeek
# dims, TPLA shard dims (Dc 256), padded test dims, forced split counts and deeper rings.
MOSAIC_CASES = [
    ("mosaic_h128_ragged", 5, 128, 512, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16, {}),
    ("mosaic_h128_split5", 3, 128, 512, 64, (5000, 65, 4097), 8192, jnp.bfloat16,
     dict(num_splits=5)),
    ("mosaic_h64_ragged", 3, 64, 512, 64, (77, 4096, 1), 4096, jnp.bfloat16, {}),
    ("mosaic_h16_pad_heads", 4, 16, 512, 64, (0, 1, 1000, 97), 1024, jnp.bfloat16, {}),
    ("mosaic_h5_dims_pad", 5, 5, 100, 8, None, 3000, jnp.bfloat16, dict(num_splits=7)),
    ("mosaic_tpla_dc256_s4", 4, 128, 256, 64, (1, 64, 3000, 8191), 8192, jnp.bfloat16,
     dict(num_stages=4)),
    ("mosaic_h128_f16", 3, 128, 512, 64, (5000, 2, 129), 8192, jnp.float16, {}),
    ("mosaic_b64_h128_32k", 64, 128, 512, 64, None, 32768, jnp.bfloat16, {}),
    ("seesaw_h128_ragged", 5, 128, 512, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16,
     dict(schedule="seesaw")),
    ("cols128_h128_ragged", 5, 128, 512, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16,
     dict(split_cols=128)),
    ("cols192_h128_split3", 3, 128, 512, 64, (5000, 65, 4097), 8192, jnp.bfloat16,
     dict(split_cols=192, num_splits=3)),
    # the Dc = 512 default before 2026-11-24 (now split_cols=192 without automatic barriers)
    ("cols256_auto_barriers_h128_ragged", 5, 128, 512, 64, (0, 1, 63, 4097, 8192), 8192,
     jnp.bfloat16, dict(split_cols=256, no_auto_barriers=False)),
    ("seesaw_h128_split5", 3, 128, 512, 64, (5000, 65, 4097), 8192, jnp.bfloat16,
     dict(num_splits=5, schedule="seesaw")),
    ("seesaw_h16_pad_heads", 4, 16, 512, 64, (0, 1, 1000, 128), 1024, jnp.bfloat16,
     dict(schedule="seesaw")),
    ("seesaw_h5_dims_pad", 5, 5, 100, 8, None, 3000, jnp.bfloat16,
     dict(num_splits=7, schedule="seesaw")),
    ("seesaw_tpla_dc256_s4", 4, 128, 256, 64, (1, 64, 3000, 8191), 8192, jnp.bfloat16,
     dict(num_stages=4, schedule="seesaw")),
    ("seesaw_b64_h128_32k", 64, 128, 512, 64, None, 32768, jnp.bfloat16,
     dict(schedule="seesaw")),
    # 256 heads: four 64-head blocks per sequence
    ("mosaic_h256_split3", 3, 256, 512, 64, (5000, 65, 1), 8192, jnp.bfloat16,
     dict(num_splits=3)),
    # TPLA shard widths without Mosaic's automatic barriers (candidates measured 2026-11-24)
    ("nab_split_tpla_h128", 5, 128, 256, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16,
     dict(schedule="split", no_auto_barriers=True)),
    ("nab_cols64_tpla_h128", 3, 128, 256, 64, (5000, 65, 4097), 8192, jnp.bfloat16,
     dict(schedule="split", split_cols=64, no_auto_barriers=True, num_splits=3)),
    ("nab_pps2_tpla_h128", 5, 128, 256, 64, (1, 64, 65, 3000, 8191), 8192, jnp.bfloat16,
     dict(pages_per_step=2, no_auto_barriers=True)),
    ("nab_pps2_tpla_h16_pad", 4, 16, 256, 64, (0, 1, 1000, 129), 1024, jnp.bfloat16,
     dict(pages_per_step=2, no_auto_barriers=True, num_splits=2)),
    ("nab_pps2_h5_dims_pad", 3, 5, 100, 8, (1, 127, 2000), 3000, jnp.bfloat16,
     dict(pages_per_step=2, no_auto_barriers=True)),
    ("nab_seesaw_tpla_h128", 5, 128, 256, 64, (0, 1, 63, 4097, 8192), 8192, jnp.bfloat16,
     dict(schedule="seesaw", no_auto_barriers=True)),
    # two pages per step (odd page counts: the second page of the last step is masked)
    ("pps2_tpla_h128", 5, 128, 256, 64, (1, 64, 65, 3000, 8191), 8192, jnp.bfloat16,
     dict(pages_per_step=2)),
    ("pps2_tpla_h32_split3", 4, 32, 256, 64, (0, 129, 3000, 8191), 8192, jnp.bfloat16,
     dict(pages_per_step=2, num_splits=3)),
    ("pps2_seesaw_h64", 3, 64, 256, 64, (63, 193, 5000), 8192, jnp.bfloat16,
     dict(pages_per_step=2, schedule="seesaw")),
    ("pps2_h16_dims_pad", 3, 16, 100, 8, (1, 127, 2000), 3000, jnp.bfloat16,
     dict(pages_per_step=2)),
]


def run_mosaic(*inputs, sm_scale: float, poison_output: bool, **knobs):
    """The Mosaic GPU kernel with a case's knobs as its ``MLADecodeMosaicConfig``."""
    return mla_decode_mosaic(*inputs, sm_scale=sm_scale, poison_output=poison_output,
                             config=MLADecodeMosaicConfig(**knobs))


KERNELS = {"triton": (mla_decode_triton, CASES), "mosaic_gpu": (run_mosaic, MOSAIC_CASES)}


def make(seed, b, h, dc, dr, lengths, max_len, dtype):
    rng = np.random.default_rng(seed)
    p_max = -(-max_len // PAGE)
    lengths = np.asarray(lengths if lengths is not None else rng.integers(1, max_len + 1, b), np.int32)
    need = -(-lengths // PAGE)
    n_pages = int(need.sum()) + 5
    perm = rng.permutation(n_pages)
    table = np.full((b, p_max), -1, np.int32)
    k = 0
    for i in range(b):
        table[i, :need[i]] = perm[k:k + need[i]]
        k += need[i]
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    cache = jax.random.normal(k1, (n_pages, PAGE, dc + dr), jnp.float32).astype(dtype)
    q_lat = jax.random.normal(k2, (b, h, dc), jnp.float32).astype(dtype)
    q_pe = jax.random.normal(k3, (b, h, dr), jnp.float32).astype(dtype)
    return q_lat, q_pe, cache, jnp.asarray(table), jnp.asarray(lengths)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--impls", nargs="+", default=["triton"], choices=sorted(KERNELS),
                    type=canonical,
                    help="triton and/or mosaic_gpu (also spelled mosaic)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only cases whose name has one of these texts")
    args = ap.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    results, ok_all = [], True
    todo = [(kernel, case) for impl in args.impls for kernel, cases in [KERNELS[impl]]
            for case in cases if args.only is None or any(t in case[0] for t in args.only)]
    if not todo:
        ap.error(f"--only {args.only!r} matches no case of {args.impls}")
    for i, (kernel, (name, b, h, dc, dr, lengths, max_len, dtype, kw)) in enumerate(todo):
        try:
            inputs = make(100 + i, b, h, dc, dr, lengths, max_len, dtype)
            out, lse = kernel(*inputs, sm_scale=float(TAU), poison_output=True, **kw)
            up = [x.astype(jnp.float32) if x.dtype != jnp.int32 else x for x in inputs]
            ref_out, ref_lse = mla_decode_reference(*up, float(TAU))
            out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
            finite = bool(np.all(np.isfinite(out)))
            err = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
            fin = np.isfinite(ref_lse)
            lse_ok = bool(np.array_equal(np.isfinite(lse), fin))
            lse_err = float(np.max(np.abs(lse[fin] - ref_lse[fin])))
            tol = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}.get(dtype, 1e-3)
            ok = finite and lse_ok and err < tol and lse_err < 10 * tol
        except Exception:  # noqa: BLE001 - report and continue with the other cases
            traceback.print_exc()
            ok, err, lse_err, finite = False, float("nan"), float("nan"), False
        ok_all &= ok
        results.append(dict(case=name, ok=ok, rel_err=err, lse_max_abs_err=lse_err, finite=finite))
        print(f"{'PASS' if ok else 'FAIL'} {name:22s} rel_err={err:.2e} lse_err={lse_err:.2e}",
              flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_mla_gpu.json").write_text(json.dumps(results, indent=1))
    print("ALL PASS" if ok_all else "SOME FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
