"""Inserting modules into a transformer block: after its attention and MLP sublayers (before the
block's residual add), and finding its normalisation layers.

A block computes ``h = h + attention(norm(h))`` and ``h = h + mlp(norm(h))`` (GPT-2 and Llama
alike). :func:`insert_after` makes a sublayer's output pass through a module before that
addition, which is where Houlsby's and Lin's bottleneck adapters sit. The inserted module becomes a
child of the sublayer (``…self_attn.adapter.down.weight``), so base parameter names never change.
"""

from __future__ import annotations

from torch import nn

from peftlab.plugin.adapter import transformer_blocks
from peftlab.plugin.errors import ValidationError

#: attribute names of the attention and MLP sublayers across architectures (GPT-2, Llama, Qwen2,
#: Mistral, OPT-like, NeoX)
SUBLAYER_NAMES = {"attention": ("self_attn", "attn", "attention", "self_attention"),
                  "mlp": ("mlp", "feed_forward", "ffn")}


def block_sublayers(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """Every block's ``kind`` sublayer (``"attention"`` or ``"mlp"``) as (full name, module). An
    architecture without one is a :class:`ValidationError` naming it and the modules found."""
    if kind not in SUBLAYER_NAMES:
        raise ValidationError("sublayer", kind, f"one of {', '.join(SUBLAYER_NAMES)}")
    stack, blocks = transformer_blocks(model)
    found = []
    for i, block in enumerate(blocks):
        attr = next((a for a in SUBLAYER_NAMES[kind] if isinstance(getattr(block, a, None), nn.Module)), None)
        if attr is None:
            arch = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
            children = ", ".join(n for n, _ in block.named_children()) or "(none)"
            raise ValidationError("insertion point", f"{kind} sublayer of {stack}.{i}",
                                  f"a block with one of {', '.join(SUBLAYER_NAMES[kind])}; architecture {arch!r} "
                                  f"has {type(block).__name__} with: {children}")
        found.append((f"{stack}.{i}.{attr}", getattr(block, attr)))
    return found


def _after(name: str):
    def hook(sublayer: nn.Module, args, output):
        inserted = getattr(sublayer, name)
        if isinstance(output, tuple):  # attention returns (hidden, weights, ...)
            return (inserted(output[0]), *output[1:])
        return inserted(output)
    return hook


def insert_after(sublayer: nn.Module, name: str, module: nn.Module) -> None:
    """Make ``sublayer``'s output (its first element, when it returns a tuple) pass through
    ``module``, registered as the child ``name`` of ``sublayer``."""
    if hasattr(sublayer, name):
        raise ValidationError("insert_after name", name, f"a name {type(sublayer).__name__} does not already use")
    sublayer.add_module(name, module)
    handles = sublayer.__dict__.setdefault("_peftlab_inserted", {})
    handles[name] = sublayer.register_forward_hook(_after(name))


def norm_layers(model: nn.Module, within: str | None = None) -> dict[str, nn.Module]:
    """The normalisation layers (LayerNorm, RMSNorm, ... by class name) of ``model``, or of the
    submodule named ``within``; their parameters are what "trainable LayerNorms" train."""
    root = model.get_submodule(within) if within else model
    prefix = f"{within}." if within else ""
    return {prefix + n: m for n, m in root.named_modules()
            if n and type(m).__name__.endswith("Norm") and any(True for _ in m.parameters(recurse=False))}
