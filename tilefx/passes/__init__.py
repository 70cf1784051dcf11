"""Analysis and rewrite passes over ATen-level fx graphs. Pure torch: never imports tvm."""
