"""Model FLOPs per token and the peak dense bf16 rate of the accelerator, for MFU.

MFU = tokens/s * training FLOPs per token / (devices * peak FLOP/s). Training FLOPs are 3x the
forward (backward = 2x forward); remat recomputation is NOT counted (that is "model" FLOPs, as
in the PaLM paper and MaxText).

Forward FLOPs per token = 2 * (matmul parameters) + causal attention
  matmul parameters: q, k, v, o, gate, up, down of every layer, plus the output projection
  (lm_head, or the tied embedding used as one). The embedding lookup is a gather: 0 FLOPs.
  attention: QK^T and PV, 2 * 2 * S * Hq * D per token per layer without a mask; causal halves
  it (a token attends to (S+1)/2 keys on average): 2 * (S + 1) * Hq * D per layer.
With frozen weights (LoRA) the backward pass computes no weight gradients: the matmuls cost 2x
their forward (forward + input gradients), attention still 3x; the small LoRA matmuls are not
counted.
"""

from __future__ import annotations

import jax

from jaxprefill.config import MLAConfig, ModelConfig

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' datasheets. Matched by substring of
# `device.device_kind`, first hit wins (so "H100 PCIe" is listed before "H100").
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),       # SXM / HBM3
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("TPU v6", 918e12),     # v6e (Trillium)
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def mla_matmul_params(cfg: MLAConfig) -> int:
    """Matmul parameters one token goes through in a DeepSeek model: MLA projections (the
    training / prefill form: kv_b decompresses every token), the dense MLP or the shared + top-k
    routed experts + router of a MoE layer, and the output projection."""
    e, h = cfg.hidden_size, cfg.num_heads
    q = (e * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim if cfg.q_lora_rank
         else e * h * cfg.qk_head_dim)
    attn = (q + e * cfg.latent_dim + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            + h * cfg.v_head_dim * e)
    total = 0
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            experts = cfg.num_experts_per_tok + cfg.n_shared_experts
            mlp = 3 * e * cfg.moe_intermediate_size * experts + e * cfg.n_routed_experts
        else:
            mlp = 3 * e * cfg.intermediate_size
        total += attn + mlp
    return total + e * cfg.vocab_size


def matmul_params(cfg: ModelConfig | MLAConfig) -> int:
    if isinstance(cfg, MLAConfig):
        return mla_matmul_params(cfg)
    e, hq, hkv, d, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = e * hq * d * 2 + e * hkv * d * 2 + 3 * e * f  # q, o; k, v; gate, up, down
    return cfg.num_layers * per_layer + e * cfg.vocab_size  # + output projection


def flops_per_token(cfg: ModelConfig | MLAConfig, seq_len: int, *, training: bool = True,
                    frozen_weights: bool = False) -> float:
    """Model FLOPs to process one token of a row of `seq_len` tokens (x3 when training; the
    matmuls x2 with `frozen_weights`)."""
    if isinstance(cfg, MLAConfig):  # QK^T over d_n + d_r, PV over d_v
        attn = (seq_len + 1) * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        attn = 2 * (seq_len + 1) * cfg.num_heads * cfg.head_dim
    matmuls, attention = 2 * matmul_params(cfg), cfg.num_layers * attn
    if not training:
        return float(matmuls + attention)
    return (2.0 if frozen_weights else 3.0) * matmuls + 3.0 * attention


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Datasheet dense bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16:
        if name.lower() in kind.lower():
            return flops
    return None


def mfu(tokens_per_s: float, cfg: ModelConfig | MLAConfig, seq_len: int, n_devices: int,
        peak: float | None, *, frozen_weights: bool = False) -> float | None:
    """Model FLOPs utilization in [0, 1], or None without a peak."""
    if not peak:
        return None
    flops = flops_per_token(cfg, seq_len, frozen_weights=frozen_weights)
    return tokens_per_s * flops / (n_devices * peak)
