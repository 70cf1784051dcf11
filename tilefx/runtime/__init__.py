"""Load and run compiled artifacts; weight packing; the torch wrapper (DLPack, zero-copy).

Dependencies run one way: ``tilefx.lowering`` builds these modules and imports them; the runtime
imports neither the lowering package nor TVM (the kernels it calls arrive as plain callables).
What both sides need about the token-major layout is ``runtime.layout``.

The runtime raises ``LoweringError``, taken from ``tilefx.errors`` (the one error
hierarchy, which imports nothing of tilefx), not from the lowering package. Everything it
rejects is a case of the lowering contract: a weight that cannot be packed as its
``BlockSparsity`` record says, or an input of a dtype or shape the layer was not lowered for.
So a user catches the same type around ``tilefx.compile`` and around calls of what it returned.
"""

from .artifact import Artifact, load

__all__ = ["Artifact", "load"]
