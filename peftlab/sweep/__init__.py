"""Sweeps: experiment files -> planned cells -> executors (one process per cell) -> records."""
