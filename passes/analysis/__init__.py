"""Read-only analyses (shapes, channel groups, importance, block occupancy), cached by the AnalysisManager."""

# DCP registers itself as the channel criterion "dcp" of ``importance``; importing it here makes
# the registry complete whenever an analysis can be asked for a criterion.
from ..training import dcp as _dcp  # noqa: F401
