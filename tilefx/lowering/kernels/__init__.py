"""TensorIR templates for block-sparse kernels, one per module, and what they share.

``spec`` says what a kernel computes; ``bsr_dense`` (CPU, lanes along the block's rows),
``bsr_token_panels`` (CPU linear layers, lanes along tokens), ``bsr_tokens`` (CPU convs, lanes
along pixels) and ``bsr_dense_cuda`` are the templates; ``conv_layouts`` lays a conv's input out
for ``bsr_tokens``; ``epilogue`` holds
the fused activations. ``int8_dense``, ``int8_bsr_rows``, ``int8_bsr_tokens`` (AVX512-VNNI, with
``int8_common``) and ``bf16_dense``, ``bf16_bsr_tokens`` (AVX512-BF16, with ``bf16_common``) are
the narrow-format templates. Which template runs, with which tiles, is ``lowering.schedules``' choice.
"""
