"""Greedy decoding of one batch of left-padded prompts, with the work of finished rows dropped.

``transformers.generate`` keeps computing every row of a batch until the last one ends, grows
its key/value cache by concatenation (the whole cache is copied at every step, in fp32 under
autocast, since rotary embeddings leave keys in fp32), and runs its generic logits processors and
stopping criteria. This loop does what greedy decoding needs and no more:

- a row leaves the batch at its end-of-sequence token: its cache rows, mask and position go;
- the cache is allocated once per batch (room for the prompt and every new token) and written in
  place, in the dtype the attention computes in (``store_dtype``: under bf16 autocast the
  attention casts keys and values to bf16 anyway, so storing them in bf16 changes no bit);
- the prompt's forward computes the head at the last position only.

Dropping rows keeps outputs identical only where a row's result does not depend on the other rows
of its batch. ``peftlab-cpu`` attention is built so; the matrix products are so only on some CPUs.
A single row takes another kernel (matrix-vector) that rounds differently (seen on SmolLM2-135M's
down projection, K=1536: 2 of 32 rows), so a batch never shrinks below two rows: the last finished
row stays as a companion, and a batch of one prompt runs it twice. From two rows up, the 2-core AMD
EPYC (AVX512-BF16) this was written on computes every row alike; oneDNN on CPUs with AMX picks its
kernel and how it splits the sum by the number of rows (its source's small-shape dispatch and
blocking), and on a CI machine (its CPU unrecorded) a row's tokens changed when its companions
left. :func:`rows_round_alike` therefore checks, once per layer kind, that every linear layer
gives each row the same bits at every row count a batch can shrink through; where one does not,
finished rows stay in the batch (as in ``generate``) and only their outputs are ignored.
"""

from __future__ import annotations

import functools
import inspect

import torch

from peftlab.plugin.kv_prefix import cache_argument

MIN_ROWS = 2  # below this the matrix products take the matrix-vector kernel, which rounds otherwise
_ALIKE: dict[tuple, bool] = {}  # rows_round_alike's verdicts, per layer kind and the conditions it ran under


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer written in place into storage sized for the whole batch's
        sequence (grown, should a caller feed more than it said); ``keys``/``values`` are views of
        the filled part."""

        def __init__(self, room: int, store_dtype: torch.dtype | None):
            super().__init__()
            self.room, self.store_dtype, self.length = room, store_dtype, 0
            self._k = self._v = None

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = self.store_dtype or key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                self._k, self._v = (self._grown(old, new, end) for old, new in ((self._k, key_states), (self._v, value_states)))
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _grown(self, old, new, end):
            b, h, _, d = new.shape
            room = torch.empty(b, h, end + self.room, d, dtype=self.dtype, device=self.device)
            if old is not None:
                room[:, :, :self.length] = old[:, :, :self.length]
            return room

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._k is not None:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def reset(self) -> None:
            self._k = self._v = None
            self.length = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a decoding cache is not cropped")

    return PreallocatedLayer


def decoding_cache(model, room: int, store_dtype: torch.dtype | None):
    """A ``DynamicCache`` for ``model`` whose full-attention layers are written in place (room for
    ``room`` tokens beyond what the first call brings); other layer kinds (sliding windows) stay
    transformers' own."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    layer = _layer_class()
    cache.layers = [layer(room, store_dtype) if type(lay) is DynamicLayer else lay for lay in cache.layers]
    return cache


def _linear_layers(model) -> list[torch.nn.Module]:
    from peftlab.plugin.layers import QuantizedLinear, is_linear_like

    return [m for m in model.modules() if is_linear_like(m) or isinstance(m, QuantizedLinear)]


def _layer_kind(layer) -> tuple:
    """What decides a linear layer's kernels: class, (in, out) features, weight dtype, bias, and a
    forward set on the instance (packed.py's) by its qualified name."""
    from peftlab.plugin.layers import linear_dims

    weight = getattr(layer, "weight", None)
    own = vars(layer).get("forward")
    if own is not None:
        own = getattr(own, "func", own)  # a functools.partial
        own = f"{getattr(own, '__module__', '')}.{getattr(own, '__qualname__', type(own).__qualname__)}"
    return (type(layer).__qualname__, linear_dims(layer), weight.dtype if weight is not None else None,
            getattr(layer, "bias", None) is not None, own)


def rows_round_alike(model, rows: int) -> bool:
    """Whether every linear layer of ``model`` gives each row of a decoding step (one token a row)
    the same bits at every row count from ``MIN_ROWS`` to ``rows``, under the autocast in force.
    Checked on random inputs, once per layer kind (:func:`_layer_kind`) under the same thread
    count, autocast and device; the verdicts are kept for the process."""
    if rows <= MIN_ROWS:
        return True
    device = next(model.parameters()).device
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    conditions = (autocast_dtype, device.type, torch.get_num_threads(), rows)
    for layer in _linear_layers(model):
        kind = _layer_kind(layer)
        key = (*kind, *conditions)
        if key not in _ALIKE:
            _, (fan_in, _), weight_dtype, _, _ = kind
            dtype = weight_dtype if weight_dtype is not None and weight_dtype.is_floating_point else torch.float32
            x = torch.randn(rows, 1, fan_in, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            with torch.inference_mode():
                full = layer(x)
                _ALIKE[key] = all(torch.equal(layer(x[:m]), full[:m]) for m in range(MIN_ROWS, rows))
        if not _ALIKE[key]:
            return False
    return True


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int | None,
           store_dtype: torch.dtype | None = None, drop_finished: bool | None = None) -> list[list[int]]:
    """Each row's greedy continuation of ``ids`` (left-padded, ``mask`` 1 at real tokens), up to
    and including its ``eos`` token or ``max_new_tokens`` tokens. Run it under the autocast and
    attention the outputs are meant for. Finished rows leave the batch with ``drop_finished``;
    None: where :func:`rows_round_alike` finds that changes no output."""
    n = ids.shape[0]
    if drop_finished is None:
        drop_finished = rows_round_alike(model, max(n, MIN_ROWS))
    if n < MIN_ROWS:  # the lone row runs as two, so it takes the same kernels as in any batch
        ids, mask = ids.repeat(MIN_ROWS, 1), mask.repeat(MIN_ROWS, 1)
    cache = decoding_cache(model, max_new_tokens, store_dtype)
    positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as generate computes them
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    key = cache_argument(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache},
                   **extra).logits[:, -1]
    out: list[list[int]] = [[] for _ in range(n)]
    rows = torch.arange(ids.shape[0], device=ids.device)  # which input each batch row is (>= n: a duplicate)
    position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        live = []  # per batch row: its input goes on (a finished row here is a companion)
        for r, t in zip(rows.tolist(), token.tolist()):
            open_ = r < n and (not out[r] or out[r][-1] != eos)
            if open_:
                out[r].append(t)
            live.append(open_ and t != eos)
        if step == max_new_tokens - 1 or not any(live):
            break
        if drop_finished and not all(live):  # rows ended: keep the others (and companions up to MIN_ROWS)
            going = [j for j, alive in enumerate(live) if alive]
            ended = [j for j, alive in enumerate(live) if not alive]
            keep = torch.tensor(sorted(going + ended[: max(0, MIN_ROWS - len(going))]), device=ids.device)
            if len(keep) < len(live):
                rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
                cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       **{key: cache}).logits[:, -1]
        position = position + 1
    return out
