"""Per-target schedules: which kernel template and which tile sizes, for cpu (llvm) and cuda."""
