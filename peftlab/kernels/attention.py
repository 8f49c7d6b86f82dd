"""A CPU attention for training and inference: plain matmuls with flash attention's memory,
registered with transformers as ``peftlab-cpu``.

On CPU, torch's fused attention (SDPA's flash kernel for CPU) is slow at the short sequences of a
cell: forward and backward of SmolLM2-135M's 30 attention layers on 8 x 128 tokens in bf16 took
555 ms per step here, a fifth of the LoRA step. The same attention as three batched matmuls and a
softmax took 214 ms, but autograd then keeps the softmax output of every layer for backward,
O(sequence²) memory per layer. This function keeps what flash attention keeps (q, k, v and the
output) and recomputes the probabilities in backward from them. The scores are taken in fp32, as
eager attention does.

Without gradients (evaluation, generation) it runs the same forward and keeps nothing. There it
is also batch-invariant, which SDPA's CPU kernel is not: a row's output does not depend on the
other rows of its batch. SDPA's decoding step (one query, grouped heads packed as three queries)
gave some rows other roundings at batch 32 than at batch 16, so an input's greedy output changed
with its batch-mates (``peftlab.evaluate.decode`` relies on invariance).

Grouped key/value heads are used as they are, never repeated. The function runs only where it
is built for: CPU tensors, no dropout, no soft cap, no position bias, no paged cache, a mask shared
by all heads. Any other call (CUDA, say) goes to transformers' SDPA attention, and the masks are
SDPA's, so the same model and batch mean the same attention either way.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "peftlab-cpu"
ATTENTION_SETTINGS = ("auto", "model", NAME)


class _Attention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v for q (B, H, S, D), k and v (B, KV, T, D) with H a multiple of
    KV; ``bias`` is fp32, broadcastable to (B, KV, H/KV, S, T). Returns (B, H, S, D)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out = _attend(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, out, bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, bias = ctx.saved_tensors
        b, h, s, d = q.shape
        kv, t = k.shape[1], k.shape[2]
        probs = _probs(q, k, bias, ctx.scale)  # fp32 (B, KV, G, S, T), as in forward
        g = grad_out.reshape(b, kv, -1, d)
        grad_v = torch.matmul(probs.to(q.dtype).view(b, kv, -1, t).transpose(-1, -2), g)
        grad_p = torch.matmul(g, v.transpose(-1, -2)).view(probs.shape).float()
        row = (grad_out.float() * out.float()).sum(-1).view(b, kv, h // kv, s, 1)
        grad_s = probs.mul_(grad_p.sub_(row)).mul_(ctx.scale).to(q.dtype).view(b, kv, -1, t)
        grad_q = torch.matmul(grad_s, k).view(b, h, s, d)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q.reshape(b, kv, -1, d))
        return grad_q, grad_k, grad_v, None, None


def _attend(q, k, v, bias, scale):
    """The forward: (B, H, S, D) from q (B, H, S, D), k and v (B, KV, T, D)."""
    b, h, s, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    probs = _probs(q, k, bias, scale)
    return torch.matmul(probs.to(q.dtype).view(b, kv, -1, t), v).view(b, h, s, d)


def _probs(q, k, bias, scale):
    """The attention probabilities in fp32. ``torch.softmax``, not ``exp`` of scores minus their
    log-sum-exp: torch's ``exp`` on CPU took 13x as long on inputs below about -87 (masked
    scores), where softmax stays fast."""
    b, h, s, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(b, kv, -1, d), k.transpose(-1, -2)).view(b, kv, h // kv, s, -1).float()
    scores.mul_(scale)
    return torch.softmax(scores if bias is None else scores.add_(bias), -1)


def _bias(mask: torch.Tensor | None, causal: bool, s: int, t: int, device) -> torch.Tensor | None:
    """SDPA's mask (boolean: True attends; or additive) or causal flag as an fp32 additive bias
    of shape (B or 1, 1, 1, S, T). Masked scores get fp32's lowest value, not -inf, so a row with
    nothing to attend to (a padding position) stays finite, as in eager attention."""
    low = torch.finfo(torch.float32).min
    if mask is None:
        if not causal:
            return None
        keep = torch.ones(s, t, dtype=torch.bool, device=device).tril()
        return torch.zeros(s, t, device=device).masked_fill_(~keep, low).view(1, 1, 1, s, t)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=device).masked_fill_(~mask, low)
    else:
        bias = mask.float().clamp(min=low)
    return bias.unsqueeze(1)  # (B, 1, S, T): a mask shared by all heads (per-head masks go to SDPA)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature (as ``sdpa_attention_forward``); returns the
    output as (B, S, H, D) and no attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = (dropout or query.device.type != "cpu"
                   or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                   or kwargs.get("cache") is not None or kwargs.get("output_attentions")
                   or (attention_mask is not None and attention_mask.shape[1] != 1))
    if unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    s = query.shape[2]
    causal = s > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and key.shape[2] > s:  # an empty static cache's prefill: SDPA crops the same way
        key, value = key[:, :, :s], value[:, :, :s]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = _bias(attention_mask, causal, s, key.shape[2], query.device)
    # one dtype for q, k and v, as SDPA under autocast (rotary embeddings leave q and k in fp32)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    out = _Attention.apply(q, k, v, bias, scale) if torch.is_grad_enabled() else _attend(q, k, v, bias, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``peftlab-cpu`` an attention implementation transformers knows, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def resolve(setting: str, device: torch.device) -> str | None:
    """The attention implementation ``train.attention`` asks for on ``device``, or ``None`` for
    the model's own: ``auto`` is ``peftlab-cpu`` on CPU and the model's own elsewhere."""
    if setting == "auto":
        return NAME if device.type == "cpu" else None
    return None if setting == "model" else setting


@contextlib.contextmanager
def attention(model, implementation: str | None):
    """Run ``model`` with ``implementation`` (``None``: unchanged) for the block, then restore its
    own; yields the implementation in use. Only a model on transformers' SDPA attention is switched
    (``peftlab-cpu`` shares its masks); any other (eager, a kernel, no transformers config) is left
    as it is."""
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    if implementation is None or own != "sdpa":
        yield own
        return
    register()
    config._attn_implementation = implementation
    try:
        yield implementation
    finally:
        config._attn_implementation = own
