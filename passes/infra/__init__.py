"""Pass infrastructure: PassBase/PassResult, PassManager, AnalysisManager, instruments, errors."""
