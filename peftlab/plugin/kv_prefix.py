"""Per-layer key/value prefixes: what prefix tuning changes in what the backbone sees.

:func:`install_kv_prefix` puts ``P`` extra key/value positions in front of every attention layer's
keys and values, in training, in a plain forward and in ``generate`` with the KV cache, with left
padding and attention masks, on any model whose attention reads its past from a transformers
``DynamicCache`` (Llama, GPT-2, Qwen2, Mistral, ...). It follows peft's prefix tuning exactly, so
given the same prefix the outputs are peft's:

- the prefix enters as the first ``P`` entries of the cache (keys as given: no rotary embedding);
- the attention mask gets ``P`` ones in front; the real tokens' positions start at ``P``
  (cache positions count the prefix; explicit ``position_ids`` are shifted by ``P``).

The hook sits on the backbone (``model.model``, ``model.transformer``), which both the model's own
forward and peftlab's training loss call. Activation checkpointing drops the cache inside
checkpointed layers (transformers does), so an adapter using this declares
``supports_grad_checkpointing = False``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from peftlab.plugin.errors import ValidationError

#: (batch size, dtype, device) -> one (key, value) per layer, each (batch, kv heads, P, head dim)
PrefixFn = Callable[[int, torch.dtype, torch.device], list[tuple[torch.Tensor, torch.Tensor]]]


def attention_geometry(model: nn.Module) -> dict[str, int]:
    """Layers, KV heads, head size and context room of a transformers model, from its config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValidationError("model", type(model).__name__, "a transformers model with a config")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
    layers, heads, hidden = get("num_hidden_layers", "n_layer"), get("num_attention_heads", "n_head"), \
        get("hidden_size", "n_embd")
    if not (layers and heads and hidden):
        raise ValidationError("model config", type(cfg).__name__, "a config naming its layers, heads and hidden size")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    context = get("max_position_embeddings", "n_positions", "n_ctx") or 0
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "kv_dim": kv_heads * head_dim,
            "hidden": hidden, "context": context}


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under a causal-LM head (``model.model``, ``model.transformer``), by its
    ``base_model_prefix``; a model without one is a :class:`ValidationError`."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if not isinstance(backbone, nn.Module):
        raise ValidationError("model", type(model).__name__, "a transformers causal LM with a backbone "
                              "(base_model_prefix naming e.g. model.model or model.transformer)")
    return backbone


def cache_argument(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its key/value cache by: ``cache`` from transformers 5.24
    on, ``past_key_values`` before. 5.24 still accepts the old name with a warning, but ignores it
    where the caller also passes ``cache`` (as a causal LM passes ``cache=None`` to its backbone)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_field(output) -> str:
    """The field a transformers model output holds its returned cache in (``cache`` or, before
    transformers 5.24, ``past_key_values``)."""
    return "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"


def returned_cache(output):
    """The key/value cache a transformers forward returned (None where it returned none)."""
    return getattr(output, cache_field(output), None)


def _prefix_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def install_kv_prefix(model: nn.Module, length: int, prefix_fn: PrefixFn):
    """Give every layer of ``model`` the ``length`` key/value positions ``prefix_fn`` computes
    (called once per forward that starts a sequence). Returns the handle that removes it."""
    from transformers import Cache, DynamicCache

    backbone = backbone_of(model)
    key = cache_argument(backbone)
    injected = [False]  # whether this call's cache was made here (then it must not outlive a no-cache call)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch, n = ref.shape[0], ref.shape[1]
        cache = kwargs.get(key)
        if cache is not None and not isinstance(cache, DynamicCache):
            kind = type(cache).__name__
            if not isinstance(cache, Cache) or cache.get_seq_length() == 0:
                raise ValidationError(key, kind, "None or a DynamicCache (a KV prefix lives in the "
                                      "cache; use generate's default dynamic cache)")
        injected[0] = cache is None
        if cache is None or cache.get_seq_length() == 0:
            cache = cache if cache is not None else DynamicCache(config=model.config)
            device = ref.device
            for i, (k, v) in enumerate(prefix_fn(batch, _prefix_dtype(model, device), device)):
                cache.update(k, v, i)
            kwargs[key] = cache
        past = cache.get_seq_length()  # the prefix included
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == past + n - length:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, length), mask], dim=1)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(past, past + n, device=ref.device)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + length
        return args, kwargs

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
        # a caller that asked for no cache gets none back (generate would otherwise feed it to the next step)
        if injected[0] and kwargs.get("use_cache") is False and returned_cache(output) is not None:
            setattr(output, cache_field(output), None)
        return output

    pre = backbone.register_forward_pre_hook(pre_hook, with_kwargs=True)
    post = backbone.register_forward_hook(post_hook, with_kwargs=True)
    return _Handles(pre, post)


class _Handles:
    """Both hooks, removed together."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
