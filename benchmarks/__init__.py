"""Measurements of the project: one script per question, each runnable as ``python benchmarks/NAME.py`` or
``python -m benchmarks.NAME``; what they share is in :mod:`benchmarks.common`. Results live in ``docs/``."""
