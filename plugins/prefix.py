"""Prefix tuning (Li & Liang 2021), the LoRA paper's PreLayer row: ``length`` trainable key/value
positions in front of every attention layer; the base stays frozen.

The prefix is one matrix of shape (length, layers·2·kv_dim), each row holding layer 0's key and
value, then layer 1's, and so on (peft's layout). With ``reparameterize`` it is computed, as Li &
Liang train it, by an MLP from a smaller embedding: ``E (length, kv_dim) -> Linear(kv_dim, hidden)
-> tanh -> Linear(hidden, layers·2·kv_dim)``; the MLP is dropped after training and the prefix it
computes is what is saved. Trainable parameters: ``length·layers·2·kv_dim`` plain (peft's count).

The start: peft's N(0, 1) entries (``init = "normal"``), which at every layer swamp the model's own
keys and values, so the first steps undo the damage; or ``init = "tokens"``, Li & Liang's start from
real words: the frozen model's own keys and values for random vocabulary tokens, so the untrained
prefix changes the model only as much as a few words written in front of the input would.

The prefix reaches the model through :func:`peftlab.install_kv_prefix` (training, forward and cached
generation alike); given the same prefix, outputs equal peft's ``PREFIX_TUNING``, in whose format it
is saved. Activation checkpointing is refused: transformers drops the cache inside checkpointed layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftlab import Adapter, ComponentSpec, ValidationError, hookimpl, option
from peftlab.toolkit import attention_geometry, install_kv_prefix, returned_cache

MODULE = "peftlab_prefix"  # the prefix's parameters live in model.peftlab_prefix


class PrefixEncoder(nn.Module):
    """The prefix as parameters: a plain matrix, or an embedding and the reparameterisation MLP."""

    def __init__(self, length: int, layers: int, kv_dim: int, reparameterize: bool, hidden: int, init: str, device=None):
        super().__init__()
        width = layers * 2 * kv_dim
        self.length, self.layers, self.kv_dim = length, layers, kv_dim
        self.embedding = nn.Embedding(length, kv_dim if reparameterize else width, device=device)
        self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, device=device), nn.Tanh(),
                                       nn.Linear(hidden, width, device=device)) if reparameterize else None
        if init == "zero":
            with torch.no_grad():
                (self.transform[-1].weight if self.transform is not None else self.embedding.weight).zero_()
                if self.transform is not None:
                    self.transform[-1].bias.zero_()

    def forward(self) -> torch.Tensor:
        """The prefix, (length, layers·2·kv_dim)."""
        e = self.embedding.weight
        return self.transform(e) if self.transform is not None else e


def token_prefix(model: nn.Module, length: int, geo: dict[str, int]) -> torch.Tensor:
    """The keys and values the frozen model computes for ``length`` random vocabulary tokens (drawn
    from torch's generator, so the run's seed picks them), in the prefix's (length, layers·2·kv_dim)
    layout. Keys are cached after the rotary embedding at positions 0..length-1, and the prefix moves
    the real tokens to positions from ``length`` on, so the model starts as if those tokens came first."""
    embeddings = model.get_input_embeddings()
    ids = torch.randint(embeddings.num_embeddings, (1, length), device=embeddings.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = returned_cache(model(input_ids=ids, use_cache=True))
    finally:
        model.train(was_training)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if len(layers) != geo["layers"]:
        raise ValidationError("model", type(model).__name__, f"a cache with one entry per layer ({geo['layers']}), "
                              f"found {len(layers)}")
    kv = torch.cat([torch.stack(pair) for pair in layers])[:, 0]  # (layers·2, kv_heads, length, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(length, -1).float()


class Prefix(Adapter):
    """Trainable key/value prefixes at every layer."""

    size_setting = "length"
    supports_grad_checkpointing = False
    supports_packing = False  # the prefix enters through the cache, and with a cache transformers builds no packed mask
    peft_type = "PREFIX_TUNING"
    peft_key_prefix = ""  # peft saves the prefix as the top-level tensor "prompt_embeddings"

    @dataclass
    class Settings:
        length: int = option(10, "prefix positions per layer (peft's num_virtual_tokens)", gt=0)
        reparameterize: bool = option(False, "compute the prefix with Li & Liang's MLP while training")
        hidden: int = option(512, "the reparameterisation MLP's hidden width", gt=0)
        init: Literal["normal", "zero", "tokens"] = option(
            "normal", "start: N(0, 1) entries as peft; zeros (the MLP's last layer); or tokens: the frozen "
            "model's keys and values for `length` random vocabulary tokens, as if they preceded every input "
            "(Li & Liang's start from real words' activations)")

    def _attach(self, model: nn.Module) -> list[str]:
        geo = attention_geometry(model)
        if geo["context"] and self.length >= geo["context"]:
            raise ValidationError("length", self.length, f"a prefix shorter than the model's context room of "
                                  f"{geo['context']} positions (the prefix takes positions from it)")
        if hasattr(model, MODULE):
            raise ValidationError("adapter", self.family, "a model without a prefix already attached")
        if self.init == "tokens" and self.reparameterize:
            raise ValidationError("init", self.init, "'normal' or 'zero' with reparameterize = true (a token "
                                  "start sets the prefix itself, which the MLP computes)")
        device = model.get_input_embeddings().weight.device
        start = token_prefix(model, self.length, geo) if self.init == "tokens" else None  # the first draw
        encoder = PrefixEncoder(self.length, geo["layers"], geo["kv_dim"], self.reparameterize, self.hidden,
                                self.init, device=device)
        if start is not None:
            with torch.no_grad():
                encoder.embedding.weight.copy_(start)
        model.add_module(MODULE, encoder)
        kv_heads, head_dim, layers = geo["kv_heads"], geo["head_dim"], geo["layers"]

        def prefix_fn(batch: int, dtype: torch.dtype, device: torch.device):
            flat = encoder().to(device=device, dtype=dtype)  # (P, layers·2·kv_dim)
            kv = flat.view(self.length, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
            kv = kv.unsqueeze(1).expand(layers * 2, batch, kv_heads, self.length, head_dim)
            return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

        encoder._hook = install_kv_prefix(model, self.length, prefix_fn)
        return [MODULE]

    # the saved state is the prefix itself, in peft's layout (the MLP, if any, folded in)
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": getattr(model, MODULE)().detach()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        encoder = getattr(model, MODULE)
        if set(state) != {"prompt_embeddings"}:
            raise ValidationError("adapter state", sorted(state)[:3], "exactly one tensor, 'prompt_embeddings'")
        if encoder.transform is not None:
            raise ValidationError("reparameterize", True, "false to load a saved prefix (the MLP is not saved)")
        want = tuple(encoder.embedding.weight.shape)
        if tuple(state["prompt_embeddings"].shape) != want:
            raise ValidationError("adapter state prompt_embeddings", tuple(state["prompt_embeddings"].shape), f"shape {want}")
        with torch.no_grad():
            encoder.embedding.weight.copy_(state["prompt_embeddings"])

    def saved_settings(self) -> dict[str, Any]:
        return {**self.settings(), "reparameterize": False}

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        geo = attention_geometry(model)
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.length,
                "token_dim": geo["kv_dim"], "num_layers": geo["layers"], "num_attention_heads": geo["kv_heads"],
                "num_transformer_submodules": 1, "encoder_hidden_size": self.hidden,
                "prefix_projection": self.reparameterize, "inference_mode": True}

    @classmethod
    def settings_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        geo = attention_geometry(model)
        for key in ("token_dim", "num_layers"):
            want = geo["kv_dim"] if key == "token_dim" else geo["layers"]
            if config.get(key) not in (None, want):
                raise ValidationError(f"adapter_config.{key}", config[key], f"{want}, this model's")
        return {"length": int(config["num_virtual_tokens"]), "reparameterize": False,
                "hidden": int(config.get("encoder_hidden_size") or 512)}


@hookimpl
def peftlab_adapters() -> list[ComponentSpec]:
    return [
        ComponentSpec("adapter", "prefix", Prefix, {"length": 10},
                      "prefix tuning (PreLayer): 10 trainable key/value positions at every layer"),
        ComponentSpec("adapter", "prefix-mlp", Prefix, {"length": 10, "reparameterize": True},
                      "prefix tuning trained through Li & Liang's reparameterisation MLP"),
    ]
