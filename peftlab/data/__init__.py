"""Instruction data: sources (local files, the hub, the synthetic E2E-style default), column presets,
prompts and label masking, padded or packed micro-batches."""
