"""TensorIR templates for block-sparse kernels, one per module, and what they share.

``spec`` says what a kernel computes; ``bsr_dense`` (CPU, lanes along the block's rows),
``bsr_tokens`` (CPU, lanes along tokens or pixels; convs and linears) and ``bsr_dense_cuda`` are
the templates; ``conv_layouts`` lays a conv's input out for ``bsr_tokens``; ``epilogue`` holds
the fused activations. Which template runs, with which tiles, is ``lowering.schedules``' choice.
"""
