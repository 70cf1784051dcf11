"""Read-only analyses (shapes, channel groups, importance, block occupancy), cached by the AnalysisManager."""

# DCP and VR-PGE register themselves as the channel criteria "dcp" and "vrpge" of ``importance``;
# importing them here makes the registry complete whenever an analysis can be asked for a criterion.
from ..training import dcp as _dcp  # noqa: F401
from ..training import vrpge as _vrpge  # noqa: F401
