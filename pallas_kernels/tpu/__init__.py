"""tpu implementations of the block-sparse kernels."""
