"""Hooks for the training-time methods (DCP selection, Synaptic Strength, structure parameters, ...)."""
