"""The cases of tests/test_context_parallel_mesh.py, run in a subprocess on 8 fake CPU devices
(``python -m tests.context_parallel_cases``; the device count is fixed when JAX starts). Prints
one ``RESULT`` line of JSON: errors against one device, compiled-program facts, memory sizes.
Models have one layer and policies 16-token blocks, so each case compiles in seconds."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.decoding import Sampling, context_graphdef, decode_step
from jaxprefill.generate import cache_sharding
from jaxprefill.parallel import ContextParallel, prompt_attention, zigzag
from jaxprefill.sharding import state_shardings
from jaxprefill.sparse import Prefill

# n_last 0: the methods' own layouts (at 200 tokens a 128-query dense tail covers most rows);
# xattention without key columns: its row-local path (the columns case is its own entry).
POLICIES = {
    "streaming": {"policy": "streaming", "params": dict(block_size=16, sink=16, local=32)},
    "xattention": {"policy": "xattention", "params": dict(block_size=16, stride=4,
                                                          threshold=0.8, n_last=0,
                                                          key_columns=0)},
    # key columns rank keys by the prompt's last queries, which one device's rows do not hold
    "xattention_columns": {"policy": "xattention", "params": dict(
        block_size=16, stride=4, threshold=0.8, n_last=0, key_columns=8)},
    # tau 1: every head query-aware, whose blocks pass a threshold over all rows (global)
    "flexprefill": {"policy": "flexprefill", "params": dict(block_size=16, min_budget=16,
                                                            gamma=0.7, tau=1.0, n_last=0)},
}
S, LENGTHS = 200, (200, 150)  # not multiples of 2n x 16 for n = 4 or 8


def mesh_of(**axes) -> jax.sharding.Mesh:
    n = int(np.prod(list(axes.values())))
    return jp.make_mesh(**axes, devices=jax.devices()[:n])


def sparse_cfg(name: str | None):
    return None if name is None else sparse.SparseConfig.from_dict({**POLICIES[name],
                                                                    "min_length": 0})


@functools.partial(jax.jit, static_argnums=0)
def logits_fn(graphdef, state, tokens, positions, segment_ids, lengths):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(tokens, positions, segment_ids, lengths=lengths)
    return model.logits(hidden)


def run(model, spec: AttentionSpec, inputs: dict) -> tuple[np.ndarray, str]:
    """Logits of one compiled forward and the compiled program's text."""
    model.attention = spec
    graphdef, state = nnx.split(model)
    args = (graphdef, state, inputs["tokens"], inputs.get("positions"),
            inputs.get("segment_ids"), inputs.get("lengths"))
    compiled = logits_fn.lower(*args).compile()
    return np.asarray(compiled(*args[1:])), compiled.as_text()


def rel_err(out: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
    """max |out - ref| / max |ref| over valid tokens (valid bool [B, S])."""
    d = np.abs(out - ref)[valid]
    return float(d.max() / np.abs(ref[valid]).max())


def prompt_inputs(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(2, S)).astype(np.int32)
    valid = np.arange(S)[None, :] < np.asarray(LENGTHS)[:, None]
    return dict(tokens=jnp.asarray(tokens), lengths=jnp.asarray(LENGTHS, jnp.int32),
                valid=valid)


def packed_inputs(vocab: int) -> dict:
    """Row 0: three documents and padding; row 1: one document (the policy's layout)."""
    rng = np.random.default_rng(1)
    seg = np.zeros((2, S), np.int32)
    seg[0, :70], seg[0, 70:150], seg[0, 150:180] = 1, 2, 3
    seg[1, :170] = 1
    pos = np.zeros((2, S), np.int32)
    for b in range(2):
        for s_id in np.unique(seg[b][seg[b] > 0]):
            idx = np.nonzero(seg[b] == s_id)[0]
            pos[b, idx] = np.arange(len(idx))
    tokens = rng.integers(0, vocab, size=(2, S)).astype(np.int32)
    return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(pos),
                segment_ids=jnp.asarray(seg), valid=seg > 0)


def model_cases(model, cases) -> dict:
    """cases: (label, policy name | None, inputs, mesh axes) -> {label: relative error against
    one device, label + ":collectives": the compiled ring program's collectives}."""
    out, refs = {}, {}
    for label, policy, inputs, axes in cases:
        key = (policy, id(inputs))
        if key not in refs:
            refs[key] = run(model, AttentionSpec(sparse=sparse_cfg(policy)), inputs)[0]
        ctx = ContextParallel(mesh_of(**axes), block=16)
        got, text = run(model, AttentionSpec(sparse=sparse_cfg(policy), context=ctx), inputs)
        out[label] = rel_err(got, refs[key], inputs["valid"])
        out[label + ":collectives"] = collectives(text)
    model.attention = AttentionSpec()
    return out


def llama_cases() -> dict:
    cfg = dataclasses.replace(jp.ModelConfig.from_yaml("configs/models/tiny-llama.yaml"),
                              num_layers=1)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    prompt, packed = prompt_inputs(cfg.vocab_size), packed_inputs(cfg.vocab_size)
    cases = [("dense/8", None, prompt, {"sequence": 8}),
             ("dense/data2_seq4", None, prompt, {"data": 2, "sequence": 4}),
             ("packed_dense/tensor2_seq4", None, packed, {"tensor": 2, "sequence": 4}),
             ("packed_streaming/8", "streaming", packed, {"sequence": 8}),
             ("streaming/4", "streaming", prompt, {"sequence": 4}),
             ("xattention/8", "xattention", prompt, {"sequence": 8}),
             ("flexprefill/4", "flexprefill", prompt, {"sequence": 4}),
             ("xattention_columns/4", "xattention_columns", prompt, {"sequence": 4})]
    errors = model_cases(model, cases)
    # How far each policy is from dense here: the sparse cases must not be dense in disguise.
    dense = run(model, AttentionSpec(), prompt)[0]
    away = {p: rel_err(run(model, AttentionSpec(sparse=sparse_cfg(p)), prompt)[0], dense,
                       prompt["valid"]) for p in POLICIES}
    return {"errors": errors, "sparse_vs_dense": away,
            "kv_shape": [2, 256, cfg.num_kv_heads, cfg.head_dim]}


def deepseek_cases() -> dict:
    cfg = dataclasses.replace(jp.MLAConfig.from_yaml("configs/models/deepseek-tiny.yaml"),
                              num_layers=1)
    model = jp.DeepSeek(cfg, rngs=nnx.Rngs(0))
    prompt = prompt_inputs(cfg.vocab_size)
    cases = [("dense/4", None, prompt, {"sequence": 4}),
             ("xattention/8", "xattention", prompt, {"sequence": 8})]
    return {"errors": model_cases(model, cases)}


def columns_case() -> dict:
    """MInference's key columns across shards: q and k built so that three key columns draw
    every query's attention (vertical lines outside the listed blocks), 4 devices."""
    b, s, hq, hkv, d = 2, 256, 4, 2, 32
    keys = jax.random.split(jax.random.key(5), 3)
    u = jnp.ones((d,)) / np.sqrt(d)
    q = 0.3 * jax.random.normal(keys[0], (b, s, hq, d)) + 3 * u
    k = jax.random.normal(keys[1], (b, s, hkv, d))
    for col in (37, 90, 150):
        k = k.at[:, col].set(6 * u)
    v = jax.random.normal(keys[2], (b, s, hkv, d))
    policy = sparse.get("minference", block_size=16, vertical=6, slash=0, last_q=16,
                        force_vertical=1, force_slash=1)
    lengths = jnp.array([256, 200], jnp.int32)
    call = Prefill("prompt", 0, d ** -0.5, 0, "auto", lengths=lengths)
    layout = jax.jit(lambda q, k, l: policy.build(q, k, lengths=l))(q, k, lengths)
    ref = jax.jit(lambda q, k, v, l: policy.attend(q, k, v, dataclasses.replace(
        call, lengths=l)))(q, k, v, lengths)
    n = 4
    ctx = ContextParallel(mesh_of(sequence=n), block=16)
    fn = jax.jit(lambda q, k, v, l: prompt_attention(
        ctx, q, k, v, policy=policy, call=dataclasses.replace(call, lengths=l)))
    ring = lambda x: zigzag.to_ring(x, n, True)  # noqa: E731
    out = zigzag.from_ring(fn(ring(q), ring(k), ring(v), lengths), n, True)
    err = max(float(jnp.abs(out[r, :L] - ref[r, :L]).max()) for r, L in enumerate([256, 200]))
    return {"error": err, "columns": int(jnp.sum(layout.col_cnt)),
            "density": float(layout.density())}


def collectives(text: str) -> dict:
    """Collective ops of a compiled program: {op: [result shapes]}."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        m = re.search(r"= \(?(\w+)\[([\d,]*)\][^=]*? (all-gather|collective-permute|all-to-all|"
                      r"all-reduce)(?:-start)?\(", line)
        if m:
            shape = [int(x) for x in m.group(2).split(",") if x]
            out.setdefault(m.group(3), []).append(shape)
    return out


def memory_case() -> dict:
    """Per-device temporary memory of ring attention alone (one prompt of 2048) at 2, 4 and 8
    devices, with two steps per merge pass ("2") and with the default ("default"), and of the
    unsplit block-sparse attention on one device ("1")."""
    b, s, hq, hkv, d = 1, 2048, 4, 2, 32
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.float32)
    temp: dict = {"2": {}, "default": {}}
    for n in (2, 4, 8):
        mesh = mesh_of(sequence=n)
        sh = NamedSharding(mesh, P(None, "sequence", None, None))
        for label, ctx in (("2", ContextParallel(mesh, block=32, merge_every=2)),
                           ("default", ContextParallel(mesh, block=32))):
            fn = jax.jit(lambda q, k, v, ctx=ctx: prompt_attention(ctx, q, k, v),
                         in_shardings=(sh, sh, sh), out_shardings=sh)
            temp[label][n] = fn.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    one = jax.jit(lambda q, k, v: attend(q, k, v, spec=AttentionSpec(impl="block_sparse")))
    temp["1"] = one.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    return temp


def tpu_interpret_case() -> dict:
    """The Pallas TPU kernel (interpret mode) under the mesh: the logits, and every kernel call
    of the traced program with its operand shapes and whether it sits inside shard_map."""
    cfg = dataclasses.replace(jp.ModelConfig.from_yaml("configs/models/tiny-llama.yaml"),
                              num_layers=1)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 100)),
                         jnp.int32)
    ref = np.asarray(jax.jit(lambda t: model(t))(tokens))
    ctx = ContextParallel(mesh_of(sequence=4), block=16, kernel="mosaic_tpu", interpret=True)
    model.attention = AttentionSpec(context=ctx)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    got = np.asarray(fn(state, tokens))
    calls = []

    def walk(jaxpr, inside):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                calls.append({"inside_shard_map": inside,
                              "shapes": [list(v.aval.shape) for v in eqn.invars
                                         if len(v.aval.shape) == 4]})
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, inside or eqn.primitive.name == "shard_map")

    walk(jax.make_jaxpr(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens).jaxpr, False)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    return {"error": err, "calls": calls, "local_length": ctx.padded_length(100) // 4}


def generate_case() -> dict:
    """jp.generate with a sequence mesh: the same tokens as one device (sampled, so they depend
    on the logits), and the decode step's collectives (the cache stays split)."""
    cfg = dataclasses.replace(jp.ModelConfig.from_yaml("configs/models/tiny-llama.yaml"),
                              num_layers=1)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (70, 33)]
    kw = dict(max_new_tokens=5, temperature=1.0, seed=7)
    ref = [r.tokens for r in jp.generate(model, None, prompts, **kw)]
    mesh = mesh_of(sequence=4)
    got = [r.tokens for r in jp.generate(model, None, prompts, mesh=mesh, **kw)]
    # The decode step as generate runs it, compiled on its own to read its collectives.
    ring = ContextParallel(mesh)
    length = ring.padded_length(128)
    graphdef = context_graphdef(model, mesh)
    state = jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh))
    cache = jp.KVCache.zeros(cfg, 2, length)
    cache = jax.device_put(cache, cache_sharding(cache, mesh, ring, cfg))
    sampling = Sampling.make(2)
    args = (graphdef, state, jnp.zeros((2, 1), jnp.int32), jnp.array([70, 33], jnp.int32),
            cache, sampling, 1)
    text = decode_step.lower(*args).compile().as_text()
    return {"ref": ref, "got": got, "decode_collectives": collectives(text)}


def chunk_cases() -> dict:
    """Queries at an offset against a split cache: pass-KV, pass-Q, flash-decoding."""
    b, sk, hq, hkv, d = 2, 256, 4, 2, 32
    keys = jax.random.split(jax.random.key(0), 4)
    k = jax.random.normal(keys[0], (b, sk, hkv, d))
    v = jax.random.normal(keys[1], (b, sk, hkv, d))
    off = jnp.array([150, 37], jnp.int32)
    mesh = mesh_of(sequence=4)
    res = {}
    for sq, schedule in ((64, "pass_kv"), (64, "pass_q"), (1, "auto")):
        q = jax.random.normal(keys[2], (b, sq, hq, d))
        ref = attend(q, k, v, q_offset=off, spec=AttentionSpec(impl="reference"))
        spec = AttentionSpec(context=ContextParallel(mesh, block=16, schedule=schedule))
        fn = jax.jit(lambda q, k, v, o: attend(q, k, v, q_offset=o, spec=spec))
        compiled = fn.lower(q, k, v, off).compile()
        out = compiled(q, k, v, off)
        res[f"{schedule}/{sq}"] = {"error": float(jnp.abs(out - ref).max()),
                                   "collectives": sorted(collectives(compiled.as_text()))}
    return res


GROUPS = {"models": ("llama",),  # two groups of about equal compile time
          "programs": ("deepseek", "columns", "memory", "tpu", "generate", "chunks")}
CASES = {"llama": llama_cases, "deepseek": deepseek_cases, "columns": columns_case,
         "memory": memory_case, "tpu": tpu_interpret_case, "generate": generate_case,
         "chunks": chunk_cases}


def main(argv: list[str]) -> None:
    """argv: group names (GROUPS); prints RESULT {case: result} for their cases."""
    assert jax.device_count() == 8, jax.devices()
    names = [c for g in argv for c in GROUPS[g]]
    print("RESULT" + json.dumps({name: CASES[name]() for name in names}))


if __name__ == "__main__":
    main(sys.argv[1:])
