"""Tiny models shared by tests in several folders (importable from any test: pytest puts ``tests/``
on the path for its conftest)."""

import torch

from peftlab import load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.kernels.precision import frozen_to_compute

HOST = load_host()


def bf16_lora(name, seed):
    """``name`` with weights of std 1/sqrt(fan-in) (the default init's outputs barely depend on the
    prompt: every row repeats one token), a LoRA with B away from zero, frozen weights in bf16."""
    torch.manual_seed(seed)
    loaded = load(ModelConfig(name), seed=seed % 1000)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    attach(loaded.model, HOST.adapters.build("lora", r=4))
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    frozen_to_compute(loaded.model, "bf16")
    return loaded.model.eval(), loaded.tokenizer
