"""The output head and its cross-entropy, in chunks of rows.

With a 49k vocabulary the plain path (``cross_entropy(head(hidden).float(), targets)``) makes five
or six tensors of rows x vocabulary per step (bf16 logits, their fp32 copy, log-softmax, its
gradient, the gradient's bf16 copy), each about 100 MB for 512 rows. glibc serves allocations
above 32 MB with fresh ``mmap`` pages and returns them on free, so each step touched about 550 MB of
new pages: 140,000 page faults, a fifth of a SmolLM2-135M LoRA step on this machine's 2 cores.
Here the head runs on ``CHUNK`` rows at a time (6 MB of bf16 logits for SmolLM2), which the
allocator reuses, and the only full-size thing kept for backward is those bf16 logits (the
plain path keeps an fp32 log-softmax, twice the size). The numbers are the plain path's: the same
bf16 matmul under autocast, log-sum-exp and softmax in fp32, the gradient rounded to the logits'
dtype before it meets the head's weight.

Where bf16 products run as fp32 GEMMs (:func:`peftlab.kernels.precision.bf16_matmuls` on a CPU
without bf16 units), each chunk's product would widen the whole head weight again (SmolLM2: 28M
values, 113 MB of fresh fp32 per chunk, forward and backward; 1.1 s of a 12.5 s LoRA step on the
2-core EPYC). There the weight is widened once per pass and every chunk multiplies with it: the
same GEMMs on the same values, so the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.data.prompts import IGNORE
from peftlab.kernels.precision import routes_bf16_via_fp32

#: rows of logits per chunk: 64 x 49,152 bf16 is 6 MB, far below glibc's 32 MB mmap threshold
CHUNK = 64


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` (+ ``bias``) against ``targets``, the logits
    computed by ``matmul`` (the caller's autocast applies to it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        logits, total = [], hidden.new_zeros((), dtype=torch.float32)
        product = _widened_once(weight, bias)
        for rows in range(0, hidden.shape[0], chunk):
            z = product(hidden[rows: rows + chunk]) if product else F.linear(hidden[rows: rows + chunk], weight, bias)
            t = targets[rows: rows + chunk]
            zf = z.float()
            total += (torch.logsumexp(zf, -1) - zf.gather(1, t[:, None]).squeeze(1)).sum()
            logits.append(z)
        ctx.save_for_backward(hidden, weight, bias, targets, *logits)
        ctx.chunk = chunk
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, *logits = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype = logits[0].dtype  # the matmul's (autocast's) dtype
        w = weight.to(dtype)
        wide = w.float() if dtype == torch.bfloat16 and routes_bf16_via_fp32() else None
        grad_h = torch.empty_like(hidden) if want_h else None
        grads = []  # of the logits, per chunk (kept only for the weight's and bias's gradients)
        scale = grad.float() / n
        for i, z in enumerate(logits):
            rows = slice(i * chunk, i * chunk + z.shape[0])
            g = torch.softmax(z.float(), -1)
            g[torch.arange(z.shape[0], device=z.device), targets[rows]] -= 1
            g = g.mul_(scale).to(dtype)
            if want_h:
                grad_h[rows] = (g.float() @ wide).to(dtype) if wide is not None else g @ w
            if want_w or want_b:
                grads.append(g)
        grad_w = grad_b = None
        if grads:  # one matmul over all rows, as the plain path's
            g = torch.cat(grads)
            grad_w = (g.t() @ hidden.to(dtype)).to(weight.dtype) if want_w else None
            grad_b = g.float().sum(0).to(bias.dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None


def _widened_once(weight: torch.Tensor, bias: torch.Tensor | None):
    """Where autocast's bf16 product of a chunk with ``weight`` would run as an fp32 GEMM, a function
    computing exactly that with ``weight`` widened once: rows rounded to bf16 and widened, one fp32
    GEMM, the result rounded to bf16. ``None`` elsewhere (and with a bias: the plain path)."""
    if bias is not None or not torch.is_autocast_enabled("cpu") or weight.device.type != "cpu":
        return None
    if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not routes_bf16_via_fp32():
        return None
    wide = weight.to(torch.bfloat16).float().t()

    def product(rows: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return torch.mm(rows.to(torch.bfloat16).float(), wide).to(torch.bfloat16)

    return product


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``targets`` (rows of ``hidden``,
    one target each). ``head`` is a plain ``nn.Linear`` (tied or not); anything else (a quantized
    or adapted head) runs whole through the plain path."""
    if type(head) is not torch.nn.Linear:
        return F.cross_entropy(head(hidden).float(), targets)
    return _HeadLoss.apply(hidden, head.weight, head.bias, targets, chunk)


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) positions; the output head
    runs only there. ``batch`` is padded (``attention_mask``) or packed (``position_ids``, no
    mask: :mod:`peftlab.data.packing`). Models without a separable backbone fall back to their own loss."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        return model(**batch).loss
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = backbone(**inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return head_loss(head, hidden[:, :-1][keep], targets[keep])
