"""Lowering to Apache TVM: the only package of tilefx that imports tvm."""
