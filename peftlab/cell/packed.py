"""Whether training may pack examples into shared rows (``train.packing``), decided by what the
model and adapter do, not by their names.

Packed rows (:mod:`peftlab.data.packing`) are only right where no example sees another: the model
must build its attention mask from where ``position_ids`` restart, and an adapter must add nothing
that crosses examples. An adapter that cannot take packed rows says so (``supports_packing =
False``: a key/value prefix goes into the cache, and transformers builds no packed mask when a
cache is given). For the model, :func:`leak` measures: one packed row of two random examples, the
gradient of the second one's outputs with respect to the first one's input embeddings. Confined
attention gives exactly zero there (masked probabilities are exact zeros, in any dtype); any leak
gives a nonzero gradient. It runs inside training's own attention, norms and precision, with the
adapter attached, so it checks what training will run.
"""

from __future__ import annotations

import contextlib
import logging

import torch

PACKING_SETTINGS = ("auto", "off")


class _PaddingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask` since your input_ids may be padded" not in record.getMessage()


@contextlib.contextmanager
def quiet_padding_warning():
    """Without transformers' warning that input ids ending in the pad token (an example's
    end-of-sequence token, where the two are one token) want an attention mask: packed rows give
    ``position_ids`` instead, on purpose."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _PaddingWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def leak(model, device: torch.device) -> str | None:
    """``None`` where a packed row keeps its examples apart in ``model``'s backbone; otherwise why
    not. Call it where training's contexts (attention, autocast, bf16 products) are entered. It
    leaves no gradient behind (``torch.autograd.grad``, not ``backward``) and draws no random
    numbers (the model runs in eval mode: no dropout), so training runs as it would without it."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if backbone is None or embed is None:
        return "the model has no separable backbone and input embedding to check packed rows with"
    first, second = 6, 5
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embed.num_embeddings, (1, first + second), generator=gen).to(device)
    positions = torch.cat([torch.arange(first), torch.arange(second)]).view(1, -1).to(device)
    seen: list[torch.Tensor] = []

    def keep(module, args, out):
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        seen.append(out)
        return out

    hook = embed.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with quiet_padding_warning():
            hidden = backbone(input_ids=ids, position_ids=positions).last_hidden_state
    except TypeError as exc:
        return f"the model's forward does not take position_ids ({exc})"
    finally:
        hook.remove()
        model.train(was_training)
    if not seen or not hidden.requires_grad:
        return "the input embedding's output does not reach the backbone's output"
    (grad,) = torch.autograd.grad(hidden[:, first:].float().sum(), seen[0])
    spill = grad[0, :first].abs().max().item()
    if spill != 0:
        return (f"attention crosses examples in a packed row (the second example's outputs move with the first "
                f"one's inputs: gradient {spill:.3g}, not 0); the model does not build its attention mask from where "
                "position_ids restart")
    return None
