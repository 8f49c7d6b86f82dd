"""The chunked head loss (``peftlab.kernels.head_loss``) gives the plain path's loss and gradients
(``cross_entropy(head(hidden).float(), targets)``) on fresh random inputs: in fp32 to rounding,
under bf16 autocast as close to the fp32 result as the plain bf16 path, for a frozen head, a
trained one and one with a bias, with row counts that are not a multiple of the chunk."""

import pytest
import torch
import torch.nn.functional as F

from peftlab.kernels.head_loss import head_loss
from peftlab.kernels.precision import autocast

CPU = torch.device("cpu")


def case(gen, rows, train_weight, with_bias):
    vocab, d = 300, 24
    head = torch.nn.Linear(d, vocab, bias=with_bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=gen))
        if with_bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    head.weight.requires_grad_(train_weight)
    hidden = torch.randn(rows, d, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return head, hidden, targets


def loss_and_grads(head, hidden, targets, precision, chunked):
    for p in head.parameters():
        p.grad = None
    h = hidden.clone().requires_grad_()
    with autocast(precision, CPU):
        loss = head_loss(head, h, targets, chunk=7) if chunked else F.cross_entropy(head(h).float(), targets)
    loss.backward()
    grads = [h.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    return loss.detach().double(), [g.double() for g in grads]


@pytest.mark.parametrize("rows", [1, 7, 30])
@pytest.mark.parametrize("train_weight,with_bias", [(False, False), (True, False), (True, True)])
def test_equals_the_plain_path(rows, train_weight, with_bias, gen):
    head, hidden, targets = case(gen, rows, train_weight, with_bias)
    exact_loss, exact = loss_and_grads(head, hidden, targets, "fp32", chunked=False)
    loss, grads = loss_and_grads(head, hidden, targets, "fp32", chunked=True)
    assert len(grads) == len(exact) == 1 + train_weight + with_bias
    torch.testing.assert_close(loss, exact_loss, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    peer_loss, peer = loss_and_grads(head, hidden, targets, "bf16", chunked=False)
    ours_loss, ours = loss_and_grads(head, hidden, targets, "bf16", chunked=True)
    assert abs(float(ours_loss - exact_loss)) <= 1.5 * abs(float(peer_loss - exact_loss)) + 1e-5
    for o, p, e in zip(ours, peer, exact):
        assert float((o - e).norm()) <= 1.5 * float((p - e).norm()) + 1e-6


def test_other_heads_take_the_plain_path(gen):
    head = torch.nn.Sequential(torch.nn.Linear(8, 20))
    hidden, targets = torch.randn(5, 8, generator=gen), torch.randint(0, 20, (5,), generator=gen)
    assert torch.equal(head_loss(head, hidden, targets), F.cross_entropy(head(hidden).float(), targets))


@pytest.mark.parametrize("train_weight", [False, True])
def test_widening_the_weight_once_gives_the_routed_products_bits(train_weight, gen, monkeypatch):
    """Where bf16 products run as fp32 GEMMs (forced here with the routing mode itself, whatever the
    CPU), the head's weight is widened once per pass instead of per chunk: the same loss and
    gradients, bit for bit."""
    from peftlab.kernels import head_loss as module
    from peftlab.kernels.precision import _Bf16ViaFp32

    head, hidden, targets = case(gen, 30, train_weight, with_bias=False)
    head.to(torch.bfloat16)  # a frozen head as a cell stores it
    widened = []
    real = module._widened_once
    monkeypatch.setattr(module, "_widened_once", lambda w, b: widened.append(real(w, b)) or widened[-1])
    with _Bf16ViaFp32():
        once = loss_and_grads(head, hidden, targets, "bf16", chunked=True)
        monkeypatch.setattr(module, "routes_bf16_via_fp32", lambda: False)
        monkeypatch.setattr(module, "_widened_once", lambda w, b: None)
        per_chunk = loss_and_grads(head, hidden, targets, "bf16", chunked=True)
    assert widened and widened[0] is not None  # the first pass did widen once
    assert torch.equal(once[0], per_chunk[0])
    for a, b in zip(once[1], per_chunk[1]):
        assert torch.equal(a, b)
