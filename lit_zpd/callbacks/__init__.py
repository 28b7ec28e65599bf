"""Callbacks of lit-zpd runs; each module documents its own."""

from lit_zpd.callbacks.progress import StepProgressBar

__all__ = ["StepProgressBar"]
