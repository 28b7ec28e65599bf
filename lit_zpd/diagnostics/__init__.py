"""Measurements made without training: what a teacher context gives a student, before a run."""
