"""Per-op knowledge keyed by ATen op: how channels flow through, and how to slice or permute them."""
