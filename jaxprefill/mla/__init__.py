"""MLA inference machinery beside the model (jaxprefill/models/deepseek.py): the engine's paged
latent cache (`latent_cache`) and TPLA, tensor-parallel latent attention decode (`tpla`: the
math and the sharded decode; `tpla_model`: a DeepSeek model over a contiguous cache;
`tpla_steps`: the engine's paged TPLA steps), and DeepSeek-V3.2's paged latent + index-key cache
(`dsa_cache`) and its TPLA steps (`dsa_tpla_steps`). Method: docs/methods/mla.md,
docs/methods/tpla.md, docs/methods/dsa.md.
"""
