"""RMSNorm for training that keeps half the memory for backward and gives the same numbers.

transformers' RMSNorm (Llama, Mistral, Qwen2, SmolLM2...) computes
``weight * (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype)``, and autograd keeps the fp32
copy of ``x`` for backward: 4 bytes per element for every norm of the model, two per layer. With
bf16 activations the bf16 ``x`` (2 bytes) and the per-row ``rsqrt`` are enough, and backward
recomputes the rest. On the benchmark Llama (``llama-512x6``, 13 norms, 8 x 128 tokens) that is
13.6 MB less kept per step, and the LoRA step's peak no longer reads above peft's (see
``results/bench/``). With fp32 activations (float weights under autocast) nothing is saved:
``x.float()`` is ``x`` itself there, and both keep it.

:func:`lean_norms` swaps the forward of such modules for the block. A module qualifies only when
its class is named ``*RMSNorm``, holds ``weight`` and ``variance_epsilon``, and its own forward
gives the same bits as this one on random inputs, in its weight's dtype and in fp32: a norm with
another formula (Gemma's ``1 + weight``, say) fails the check and keeps its forward. Backward
gives the same values up to the order of fp32 sums (in bf16 the same bits, but for a rare input-gradient
element one rounding step apart: 9 of 300 random cases, at most 0.04% of their elements).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peftlab.kernels.swap import swapped_forwards

NORM_SETTINGS = ("auto", "model")
CHECK_SHAPE = (3, 5)  # rows of random input each check runs on (times the hidden size)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype)``, keeping ``x`` and
    the per-row ``rsqrt`` for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * r if xf is x else xf.mul_(r)).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            normed = (x.float() * r).to(x.dtype)
            grad_w = (grad * normed).sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()
            xf = x.float()
            # d/dx of x * r(x): g * r - x * r³ * mean(g * x)
            coef = torch.linalg.vecdot(g, xf, dim=-1).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])
            grad_x = g.mul_(r).addcmul_(xf, coef).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def _candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _same_forward(module: nn.Module) -> bool:
    """The module's own forward and :func:`rms_norm` give the same bits on random inputs in its
    weight's dtype and in fp32 (seeded by the hidden size, so the check repeats)."""
    weight = module.weight
    gen = torch.Generator().manual_seed(weight.shape[0])
    with torch.no_grad():
        for dtype in dict.fromkeys((weight.dtype, torch.float32)):
            x = torch.randn(*CHECK_SHAPE, weight.shape[0], generator=gen).to(weight.device, dtype)
            if not torch.equal(type(module).forward(module, x), rms_norm(x, weight, module.variance_epsilon)):
                return False
    return True


def _forward(module: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


@contextlib.contextmanager
def lean_norms(model: nn.Module, on: bool = True) -> Iterator[int]:
    """Run ``model``'s qualifying RMSNorm modules with :func:`rms_norm` for the block (``on``), then
    restore their own forward; yields how many were swapped. The check runs once per class, weight
    dtype, device and width."""
    verdicts: dict[tuple, bool] = {}

    def lean(module: nn.Module):
        if not on or not _candidate(module):
            return None
        key = (type(module), module.weight.dtype, module.weight.device, module.weight.shape[0])
        if key not in verdicts:  # either forward gives the same bits, checked here
            verdicts[key] = _same_forward(module)
        return _forward(module) if verdicts[key] else None

    with swapped_forwards(model, lean) as n:
        yield n


def resolve(setting: str, device: torch.device) -> bool:
    """Whether ``train.norm`` asks for :func:`lean_norms` on ``device``: ``auto`` on CPU (where it
    is tested), the model's own elsewhere and with ``model``."""
    return setting == "auto" and device.type == "cpu"
