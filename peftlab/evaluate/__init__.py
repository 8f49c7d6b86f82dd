"""Evaluation: batched generation on the evaluation inputs, and scoring with metric plugins."""
