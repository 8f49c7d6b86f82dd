"""Published model configurations by name, built on the meta device: shapes without weights.

Counting what an adapter adds, or estimating memory, needs only a model's shapes. These are the
configurations of the lecture's model sizes and the papers' models (their published ``config.json``
values); :func:`meta_model` instantiates one with no weights and no download.
"""

from __future__ import annotations

import functools
from typing import Any

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
