"""gpu implementations of the block-sparse kernels."""
