"""Rank versus trainable parameters: the lecture's table, and real architectures' counts.

The lecture treats a whole model of N parameters as one square matrix of side sqrt(N), so LoRA
at rank r trains r x (sqrt(N) + sqrt(N)) = 2 r sqrt(N) parameters. Real models adapt many
rectangular matrices; :func:`architecture_counts` instantiates their configurations on the meta
device (no weights, no download) and counts what LoRA adds for a set of target modules.
"""

from __future__ import annotations

import functools
import math
from typing import Any

LECTURE_MODELS = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}
LECTURE_RANKS = (1, 2, 8, 16, 512, 1024, 8192)


def lecture_count(rank: int, n_params: float) -> float:
    """2 r sqrt(N): LoRA's A (r x d) and B (d x r) for one d x d matrix with d^2 = N."""
    return 2 * rank * math.sqrt(n_params)


def human(n: float) -> str:
    """The lecture's style: whole K and M, one decimal for B without a trailing .0."""
    if n >= 1e9:
        text = f"{n / 1e9:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + "B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def lecture_table() -> list[dict[str, Any]]:
    rows = [{"rank": str(r), **{m: human(lecture_count(r, n)) for m, n in LECTURE_MODELS.items()}}
            for r in LECTURE_RANKS]
    rows.append({"rank": "Full", **{m: human(n) for m, n in LECTURE_MODELS.items()}})
    return rows


#: configurations of the lecture's model sizes (published config.json values)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama-2-7B": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}),
    "Llama-2-13B": ("llama", {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                              "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000}),
    "Llama-2-70B": ("llama", {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000}),
    "Falcon-180B": ("falcon", {"hidden_size": 14848, "num_hidden_layers": 80, "num_attention_heads": 232,
                               "num_kv_heads": 8, "new_decoder_architecture": True, "vocab_size": 65024,
                               "parallel_attn": True, "bias": False}),
    # the embedded default (SmolLM2-135M-Instruct); 134,515,008 parameters, as the GGUF file loads
    "SmolLM2-135M": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                               "tie_word_embeddings": True}),
    "GPT-2-Medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 50257}),
    "GPT-2-Large": ("gpt2", {"n_embd": 1280, "n_layer": 36, "n_head": 20, "vocab_size": 50257}),
}
#: peftlab's short model names with a configuration above
ALIASES = {"smollm2-135m": "SmolLM2-135M"}


def shape(name: str) -> tuple[int, int]:
    """(hidden size, number of blocks) of an architecture above, for the activation term."""
    _, kw = ARCHITECTURES[ALIASES.get(name, name)]
    return kw.get("hidden_size", kw.get("n_embd")), kw.get("num_hidden_layers", kw.get("n_layer"))


#: LoRA targets per architecture: "q/v" (the LoRA paper's choice) and every linear layer
TARGETS = {
    "llama": {"q/v": ["q_proj", "v_proj"], "all-linear": "all-linear"},
    # Falcon and GPT-2 fuse q, k and v into one layer: the closest to "q/v" is that fused layer
    "falcon": {"q/v": ["query_key_value"], "all-linear": "all-linear"},
    "gpt2": {"q/v": ["c_attn"], "all-linear": "all-linear"},
}


def meta_model(name: str):
    """The architecture with no weights (meta device): its shapes, for counting. Built once per
    name and deep-copied (a copy of meta tensors costs nothing; building a 180B one does)."""
    import copy

    return copy.deepcopy(_meta_model(name))


@functools.cache
def _meta_model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, kwargs = ARCHITECTURES[name]
    config = AutoConfig.for_model(arch, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def architecture_counts(name: str, rank: int, targets: str = "q/v") -> dict[str, Any]:
    from peftlab.adapters import attach

    model = meta_model(name)
    total_before = sum(p.numel() for p in model.parameters())
    arch = ARCHITECTURES[name][0]
    report = attach(model, "lora", r=rank, target_modules=TARGETS[arch][targets])
    return {"model": name, "rank": rank, "targets": targets, "layers": len(report.targets),
            "trainable": report.trainable, "base_params": total_before,
            "lecture_estimate": lecture_count(rank, total_before)}
