"""Per-target schedules for the kernels: cpu (llvm) and cuda."""
