"""xla implementations of the block-sparse kernels."""
