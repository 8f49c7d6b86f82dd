"""Quantize a model's linear layers in place: ``quantize_(model, quantizer, filter)``."""
