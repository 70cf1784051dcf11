"""Load and run compiled artifacts; weight packing; the torch wrapper (DLPack, zero-copy)."""
