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

Packed rows (:mod:`peftlab.data.packing`: several examples in one row, their positions restarting)
come with transformers' block-diagonal causal mask. Such a mask is recognised (exactly: anything
else takes the ordinary path) and attention runs per example, the examples gathered into a batch
of their own squares: a row of 8 examples of 125 tokens costs an eighth of its 1000 x 1000 square.

Grouped key/value heads are used as they are, never repeated. The function runs only where it
is built for: CPU tensors, no dropout, no soft cap, no position bias, no paged cache, a mask shared
by all heads. Any other call (CUDA, say) goes to transformers' SDPA attention, and the masks are
SDPA's, so the same model and batch mean the same attention either way.
"""

from __future__ import annotations

import contextlib

import torch

from peftlab.kernels.widened import product

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
    return product(probs.to(q.dtype).view(b, kv, -1, t), v).view(b, h, s, d)


def _probs(q, k, bias, scale):
    """The attention probabilities in fp32. ``torch.softmax``, not ``exp`` of scores minus their
    log-sum-exp: torch's ``exp`` on CPU took 13x as long on inputs below about -87 (masked
    scores), where softmax stays fast."""
    b, h, s, d = q.shape
    kv = k.shape[1]
    scores = product(q.reshape(b, kv, -1, d), k.transpose(-1, -2)).view(b, kv, h // kv, s, -1).float()
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
    # one dtype for q, k and v, as SDPA under autocast (rotary embeddings leave q and k in fp32)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    packed = _packed(attention_mask) if s > 1 and key.shape[2] == s else None
    if packed is not None:
        return _attend_packed(q, k, v, packed, scale), None
    bias = _bias(attention_mask, causal, s, key.shape[2], query.device)
    out = _Attention.apply(q, k, v, bias, scale) if torch.is_grad_enabled() else _attend(q, k, v, bias, scale)
    return out.transpose(1, 2).contiguous(), None


class _Packed:
    """Where a packed row's examples lie: ``index`` (segments x longest) holds each segment's
    positions in the flattened (``total`` = rows x S) tokens, padded with ``total``, the index of an
    extra zero row; ``valid`` the same shape, True at real positions; ``bias`` the segments' causal
    mask with their padding keys masked, (segments, 1, 1, L, L)."""

    def __init__(self, starts: list[tuple[int, int, int]], total: int, device) -> None:
        longest = max(n for _, _, n in starts)
        self.index = torch.full((len(starts), longest), total, dtype=torch.long)
        self.valid = torch.zeros(len(starts), longest, dtype=torch.bool)
        for i, (row_offset, start, n) in enumerate(starts):
            self.index[i, :n] = torch.arange(row_offset + start, row_offset + start + n)
            self.valid[i, :n] = True
        self.index, self.valid = self.index.to(device), self.valid.to(device)
        keep = torch.ones(longest, longest, dtype=torch.bool, device=device).tril() & self.valid[:, None, :]
        self.bias = torch.zeros(keep.shape, device=device).masked_fill_(~keep, torch.finfo(torch.float32).min)
        self.bias = self.bias.view(len(starts), 1, 1, longest, longest)


_LAST: list = [None, None]  # (weak reference to the last mask examined, what it held): one look per forward


def _packed(mask: torch.Tensor | None) -> _Packed | None:
    """The examples of packed rows, where ``mask`` is exactly block-diagonal causal (transformers'
    mask for rows whose ``position_ids`` restart: :mod:`peftlab.data.packing`); ``None`` for any
    other mask. A forward's layers share one mask tensor, so it is examined once (a weak reference
    to it: a later mask is another object, whatever memory it reuses)."""
    import weakref

    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    if _LAST[0] is not None and _LAST[0]() is mask:
        return _LAST[1]
    found = _segments(mask)
    _LAST[0], _LAST[1] = weakref.ref(mask), found
    return found


def _segments(mask: torch.Tensor) -> _Packed | None:
    rows, _, s, _ = mask.shape
    m = mask[:, 0]
    # a segment starts where a position does not see the one before it
    breaks = ~m.diagonal(offset=-1, dim1=1, dim2=2)  # (rows, S - 1)
    starts = []
    for r in range(rows):
        cuts = [0, *(breaks[r].nonzero().flatten() + 1).tolist(), s]
        starts += [(r * s, a, b - a) for a, b in zip(cuts, cuts[1:])]
    if len(starts) == rows:  # one example a row: the ordinary causal path serves it
        return None
    seg = torch.zeros(rows, s, dtype=torch.long, device=mask.device)
    for i, (offset, a, n) in enumerate(starts):
        seg[offset // s, a: a + n] = i
    expected = (seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(expected, m):
        return None
    return _Packed(starts, rows * s, mask.device)


def _attend_packed(q, k, v, packed: _Packed, scale) -> torch.Tensor:
    """Attention within each example of packed rows, as a batch of examples: q, k and v
    (rows, heads, S, D) are gathered into (examples, heads, longest, D), attended under each
    example's causal mask, and the outputs scattered back to (rows, S, heads, D). The products
    cover each example's own square, not the rows' (a packed row of 8 examples of 125 tokens: an
    eighth of the row's)."""
    rows, h, s, d = q.shape

    def gather(t):
        flat = t.transpose(1, 2).reshape(rows * s, t.shape[1], d)
        flat = torch.cat([flat, flat.new_zeros(1, t.shape[1], d)])  # the padding's index: rows * s
        return flat[packed.index].transpose(1, 2)  # (examples, heads, longest, D)

    qs, ks, vs = gather(q), gather(k), gather(v)
    out = _Attention.apply(qs, ks, vs, packed.bias, scale) if torch.is_grad_enabled() else _attend(qs, ks, vs, packed.bias, scale)
    # every position is in one segment, and segments run in row order: their real positions, in order, are the rows'
    return out.transpose(1, 2)[packed.valid].view(rows, s, h, d)


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
