"""TensorIR builders for block-sparse kernels."""
