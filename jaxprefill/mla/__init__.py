"""MLA inference machinery beside the model (jaxprefill/models/deepseek.py): the engine's paged
latent cache (`latent_cache`) and TPLA, tensor-parallel latent attention decode (`tpla`: the
math and the sharded decode; `tpla_model`: a DeepSeek model over a contiguous cache;
`tpla_steps`: the engine's paged TPLA steps). Method: docs/methods/mla.md, docs/methods/tpla.md.
"""
