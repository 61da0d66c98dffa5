"""The Mosaic GPU kernel's tuning knobs from a sparse config (``kernel: {impl: mosaic_gpu, ...}``)
reach every kernel call a policy makes: the model's attend, PBS's own attend and the context
ring. On a CPU the Mosaic kernel cannot run, so a stand-in records the knobs it is called with
and answers with the XLA kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.parallel import ContextParallel, prompt_attention
from jaxprefill.sparse import Prefill
from pallas_kernels import attention as kernels
from pallas_kernels import block_sparse_attention
from pallas_kernels.gpu.block_sparse_mosaic import BlockSparseMosaicConfig

KNOBS = {"impl": "mosaic_gpu", "persistent": True, "num_stages": 3, "order": "heads"}
WANT = BlockSparseMosaicConfig(persistent=True, num_stages=3, order="heads")


@pytest.fixture
def mosaic_stand_in(monkeypatch):
    """Makes the resolver take mosaic_gpu on this CPU and records each call's config (the
    configs below name their estimation backend, which would otherwise follow the pretended
    platform)."""
    seen = []

    def stand_in(q, k, v, layout, *, config=BlockSparseMosaicConfig(), **kw):
        seen.append(config)
        return kernels.block_sparse_attention_xla(q, k, v, layout, **kw)

    monkeypatch.setattr(kernels.backends, "platform", lambda: "gpu")
    monkeypatch.setattr(kernels.mosaic_common, "is_hopper", lambda: True)
    monkeypatch.setitem(kernels._KERNELS, "mosaic_gpu", stand_in)
    # XAttention's key columns run on Triton after Mosaic GPU's blocks, continuing their
    # softmax (prior); here on XLA, merged
    def columns(*a, interpret=False, prior=None, **kw):
        out, lse = kernels.block_sparse_attention_xla(*a, **kw)
        return kernels.column_merge.merge(*prior, out, lse)

    monkeypatch.setitem(kernels._KERNELS, "triton", columns)
    return seen


def _qkv(s=512, hq=4, hkv=2, d=64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (1, s, h, d), jnp.bfloat16)
                 for kk, h in zip(ks, (hq, hkv, hkv)))


def test_kernel_knobs_parse_and_are_refused_in_one_line():
    cfg = sparse.SparseConfig.parse({"policy": "xattention", "kernel": KNOBS})
    assert cfg.kernel == "mosaic_gpu" and cfg.kernel_config == WANT
    hash(cfg)  # lives in the static AttentionSpec
    plain = sparse.SparseConfig.parse({"policy": "xattention", "kernel": "mosaic_gpu"})
    assert plain.kernel_config is None
    assert sparse.SparseConfig.parse(
        {"policy": "xattention", "kernel": {"impl": "mosaic_gpu"}}).kernel_config is None
    bad = [({"impl": "triton", "persistent": True}, r"knobs are for mosaic_gpu.*'triton'"),
           ({"persistent": True}, r"knobs are for mosaic_gpu.*'auto'"),
           ({"impl": "mosaic_gpu", "stages": 3}, r"^kernel: unknown key\(s\) \['stages'\]"),
           ({"impl": "mosaic_gpu", "num_stages": 4}, r"^kernel: num_stages must be 2 or 3"),
           ({"impl": "mosaic_gpu", "persistent": "yes"}, r"^kernel: persistent must be true"),
           ({"impl": "mosaic_gpu", "order": "rows"}, r"^kernel: order must be one of")]
    for kernel, message in bad:
        with pytest.raises(ValueError, match=message):
            sparse.SparseConfig.parse({"policy": "xattention", "kernel": kernel})


def test_knobs_reach_the_kernel_from_attend_and_pbs(mosaic_stand_in):
    q, k, v = _qkv()
    for policy in ("xattention", "pbs"):
        cfg = sparse.SparseConfig.parse({"policy": policy, "min_length": 128, "kernel": KNOBS,
                                         "estimation": "xla"})
        out = attend(q, k, v, spec=AttentionSpec(impl="xla", sparse=cfg), layer=0)
        assert mosaic_stand_in[-1] == WANT, policy
        assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    n = len(mosaic_stand_in)
    cfg = sparse.SparseConfig.parse({"policy": "xattention", "min_length": 128,
                                     "kernel": "mosaic_gpu", "estimation": "xla"})
    attend(q, k, v, spec=AttentionSpec(impl="xla", sparse=cfg), layer=0)
    assert mosaic_stand_in[n:] == [BlockSparseMosaicConfig()]  # no knobs: the defaults


def test_knobs_reach_the_ring_kernel(mosaic_stand_in):
    q, k, v = _qkv(s=256)
    policy = sparse.get("streaming", block_size=128, sink=128, local=128)
    call = Prefill("prompt", 0, 64 ** -0.5, 0, "mosaic_gpu", WANT)
    ctx = ContextParallel(jp.make_mesh(sequence=1, devices=jax.devices()[:1]), block=128)
    ring = jax.jit(lambda q, k, v, call: prompt_attention(ctx, q, k, v, policy=policy,
                                                          call=call), static_argnums=3)
    out = ring(q, k, v, call)
    assert mosaic_stand_in and set(mosaic_stand_in) == {WANT}
    want = block_sparse_attention(q, k, v, policy.build(q, k), impl="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)
    mosaic_stand_in.clear()
    ring(q, k, v, dataclasses.replace(call, kernel_config=None))
    assert set(mosaic_stand_in) == {BlockSparseMosaicConfig()}
