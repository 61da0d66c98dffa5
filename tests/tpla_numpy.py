"""Float64 NumPy TPLA decode over a contiguous cache: the test oracle of `jaxprefill.mla.tpla`."""

from __future__ import annotations

import numpy as np

from jaxprefill.mla.tpla import TPLAConfig, rope_pair_order


def tpla_decode_numpy(q_latent, q_pe, c_rot, k_pe, lengths, w_uv, *, g: int, tcfg: TPLAConfig,
                      sm_scale: float, eps: float, mask=None) -> np.ndarray:
    """Float64 NumPy TPLA over a contiguous cache: c_rot [B, T, d_c] (raw rotated latent),
    k_pe [B, T, d_r]; the same math as `pack_latent` + `tpla_decode` written out per shard.
    mask bool [B, T] (None: all): the keys each query may attend to besides the length limit
    (DSA's selected rows: every shard's softmax runs over these keys only)."""
    q_latent, q_pe, c_rot, k_pe, w_uv = (np.asarray(x, np.float64)
                                         for x in (q_latent, q_pe, c_rot, k_pe, w_uv))
    b, h, dc = q_latent.shape
    dr, sl = k_pe.shape[-1], dc // g
    tau = sm_scale * (g if tcfg.logit_scale == "g" else 1)
    out = np.zeros((b, h, w_uv.shape[-1]))
    for bi in range(b):
        n = int(lengths[bi])
        c = c_rot[bi, :n]
        for i in range(g):
            s_i = slice(i * sl, (i + 1) * sl)
            if tcfg.norm == "global":
                u = c[:, s_i] / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps)
            else:
                u = c[:, s_i] / np.sqrt(np.mean(c[:, s_i] ** 2, -1, keepdims=True) + eps)
            if tcfg.rope == "replicated":
                rope = q_pe[bi] @ k_pe[bi, :n].T
            else:
                idx = rope_pair_order(dr, g)[i * dr // g:(i + 1) * dr // g]
                rope = q_pe[bi][:, idx] @ k_pe[bi, :n][:, idx].T
            s = tau * (q_latent[bi][:, s_i] @ u.T + rope)
            if mask is not None:
                s = np.where(np.asarray(mask[bi][:n], bool)[None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi] += np.einsum("hc,chv->hv", p @ u, w_uv[s_i])
    return out


