"""The cases of tests/test_context_parallel_grad.py, run in a subprocess on 4 fake CPU devices
(``python -m tests.context_parallel_grad_cases``; the device count is fixed when JAX starts).
Prints one ``RESULT`` line of JSON: relative errors of ring gradients against one device's.

A one-layer tiny Llama in float32, batch 2, 200 tokens (rows of 200 and 150 valid tokens, or
packed rows; the ring pads to 256 = 2 x 4 devices x 32-token blocks, so 200 is not a multiple
of its granule)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.attention import AttentionSpec
from jaxprefill.parallel import ContextParallel, prompt_attention, zigzag
from tests import context_parallel_cases as cases

S, LENGTHS, N, BLOCK = cases.S, cases.LENGTHS, 4, 32
# streaming: sink + local window, a layout with listed and unlisted blocks on every shard pair
STREAMING = {"policy": "streaming", "params": dict(block_size=16, sink=16, local=32),
             "min_length": 0}


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(graphdef, state, inputs):
    """Mean next-token cross-entropy over the targets ``inputs["targets"]`` (bool [B, S - 1])
    and its gradient w.r.t. the parameters."""
    tokens = inputs["tokens"]

    def loss_fn(state):
        model = nnx.merge(graphdef, state)
        hidden, _ = model.forward(tokens, inputs.get("positions"), inputs.get("segment_ids"),
                                  lengths=inputs.get("lengths"))
        logp = jax.nn.log_softmax(model.logits(hidden)[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * inputs["targets"]) / jnp.sum(inputs["targets"])

    return jax.value_and_grad(loss_fn)(state)


def rel_errs(got, ref) -> float:
    """Largest over parameters of max |got - ref| / max |ref|."""
    errs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), got, ref)
    return max(jax.tree.leaves(errs))


def prompt_inputs(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(2, S)), jnp.int32)
    targets = np.arange(1, S)[None, :] < np.asarray(LENGTHS)[:, None]
    return dict(tokens=tokens, lengths=jnp.asarray(LENGTHS, jnp.int32),
                targets=jnp.asarray(targets))


def packed_inputs(vocab: int) -> dict:
    """The forward cases' packed rows (row 0: three documents and padding; row 1: one
    document); a token's target is the next token of the same document."""
    rows = cases.packed_inputs(vocab)
    seg = np.asarray(rows["segment_ids"])
    targets = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return dict(tokens=rows["tokens"], positions=rows["positions"],
                segment_ids=rows["segment_ids"], targets=jnp.asarray(targets))


def model_cases() -> dict:
    cfg = dataclasses.replace(jp.ModelConfig.from_yaml("configs/models/tiny-llama.yaml"),
                              num_layers=1)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    prompt, packed = prompt_inputs(cfg.vocab_size), packed_inputs(cfg.vocab_size)
    mesh = jp.make_mesh(sequence=N, devices=jax.devices()[:N])
    # One device: dense runs XLA attention; the sparse policy runs its layout on the reference
    # kernel (differentiable). The ring runs both on the "xla" kernel with its backward rule.
    streaming_one = sparse.SparseConfig.from_dict({**STREAMING, "kernel": "reference"})
    streaming_ring = sparse.SparseConfig.from_dict(STREAMING)
    dense_ring = AttentionSpec(differentiable=True, context=ContextParallel(mesh, block=BLOCK))
    cases = {
        "dense": (prompt, AttentionSpec(differentiable=True), dense_ring),
        "packed_dense": (packed, AttentionSpec(differentiable=True), dense_ring),
        "streaming": (prompt, AttentionSpec(differentiable=True, sparse=streaming_one),
                      AttentionSpec(differentiable=True, sparse=streaming_ring,
                                    context=ContextParallel(mesh, block=BLOCK, kernel="xla"))),
    }
    out, grads = {}, {}
    for label, (inputs, one, ring) in cases.items():
        results = []
        for spec in (one, ring):
            model.attention = spec
            graphdef, state = nnx.split(model)
            results.append(loss_and_grad(graphdef, state, inputs))
        (loss1, g1), (loss_r, g_r) = results
        out[label] = {"loss": abs(float(loss_r) - float(loss1)) / abs(float(loss1)),
                      "grad": rel_errs(g_r, g1),
                      "grad_norm": float(jnp.sqrt(sum(jnp.sum(x ** 2)
                                                      for x in jax.tree.leaves(g1))))}
        grads[label] = g1
    # the sparse case's gradient is not the dense one (the layout really drops blocks)
    out["streaming_vs_dense"] = rel_errs(grads["streaming"], grads["dense"])
    return out


def qkv_case() -> dict:
    """jax.grad w.r.t. q, k, v of `prompt_attention` (in ring order) against the unsplit XLA
    attention, 256 tokens, GQA 4 / 2 heads."""
    b, s, hq, hkv, d = 2, 256, 4, 2, 16
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(keys[0], (b, s, hq, d)),
               jax.random.normal(keys[1], (b, s, hkv, d)),
               jax.random.normal(keys[2], (b, s, hkv, d)))
    w = jax.random.normal(keys[3], (b, s, hq, d))  # a loss that weighs every output
    ctx = ContextParallel(jp.make_mesh(sequence=N, devices=jax.devices()[:N]), block=BLOCK)
    ring = lambda x: zigzag.to_ring(x, N, True)  # noqa: E731

    def ring_loss(q, k, v):
        out = zigzag.from_ring(prompt_attention(ctx, ring(q), ring(k), ring(v),
                                                differentiable=True), N, True)
        return jnp.sum(jnp.sin(out) * w)

    def one_loss(q, k, v):
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True)) * w)

    got = jax.jit(jax.grad(ring_loss, argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(one_loss, argnums=(0, 1, 2)))(q, k, v)
    return {"qkv": rel_errs(got, ref)}


def main() -> None:
    res = {**model_cases(), **qkv_case()}
    print("RESULT" + json.dumps(res))


if __name__ == "__main__":
    main()
