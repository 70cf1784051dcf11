"""Read-only analyses (shapes, channel groups, importance, block occupancy), cached by the AnalysisManager."""
