"""Greedy decoding (``peftlab.evaluate.decode``): the same tokens as ``transformers.generate``
under the same attention, rows leaving the batch at their end without changing anyone's output
(the lone last row included), and a cache that grows past the room it was given."""

import pytest
import torch
from bf16_models import bf16_lora

from peftlab import load_host
from peftlab.adapt.attach import attach
from peftlab.cell.models import ModelConfig, load
from peftlab.data.prompts import prompt_ids
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits
from peftlab.evaluate.decode import decoding_cache, greedy, rows_round_alike
from peftlab.evaluate.generate import left_padded, padded_width
from peftlab.kernels.attention import NAME, attention
from peftlab.kernels.precision import autocast

HOST = load_host()
CPU = torch.device("cpu")


def prompts_of(tok, n):
    _, items, _ = load_splits(DataConfig(eval_limit=n))
    return [prompt_ids(tok, it.instruction, it.context) for it in items]


def until_eos(row, eos):
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("attn", ["model", NAME])
def test_the_same_tokens_as_generate(name, attn, seed):
    """fp32, one batch of different prompt lengths (left-padded), an end token that some rows reach
    early: each row's tokens up to its end equal generate's."""
    loaded = load(ModelConfig(name), seed=seed % 1000)
    model, tok = loaded.model, loaded.tokenizer
    prompts = prompts_of(tok, 6)
    width = max(map(len, prompts))
    ids, mask = left_padded(prompts, width, tok.pad_token_id)
    with torch.inference_mode(), attention(model, NAME if attn == NAME else None):
        model.generation_config.eos_token_id = None  # three tokens even where every row emits the model's own end token first
        probe = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
        eos = int(probe[0, width + 2])  # a token row 0 emits: it stops there, the others need not
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id)[:, width:].tolist()
        got = greedy(model, ids, mask, 20, eos)
    assert got == [until_eos(w, eos) for w in want]
    assert len(got[0]) == probe[0, width:].tolist().index(eos) + 1 <= 3


def spread_end_token(outputs: list[list[int]]) -> int:
    """The token that, taken as the end token, ends the rows at the most different steps, with as
    few rows as possible running to the end (ideally one: the lone-row phase)."""
    def ends(t):
        return [o.index(t) + 1 if t in o else len(o) + 1 for o in outputs]

    tokens = {t for o in outputs for t in o}
    return max(tokens, key=lambda t: (len(set(ends(t))), -ends(t).count(len(outputs[0]) + 1), -t))


def test_rows_leaving_change_no_output(seed):
    """llama-512x6 in bf16 (its down projection, K=1376, rounds a lone row differently from a row
    among others on the CPUs this was written on): where ``rows_round_alike`` finds every linear
    layer row-invariant, the batch's decoding with finished rows leaving (the last ones with a
    companion) equals its decoding with every row kept to the end; where it does not, no row
    leaves."""
    model, tok = bf16_lora("llama-512x6", seed)
    prompts = prompts_of(tok, 6)
    ids, mask = left_padded(prompts, padded_width(max(map(len, prompts)), 32), tok.pad_token_id)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.inference_mode(), autocast("bf16", CPU), attention(model, NAME):
        alike = rows_round_alike(model, len(prompts))
        eos = spread_end_token(greedy(model, ids, mask, 16, None, store_dtype=torch.bfloat16))
        rows.clear()
        batch = greedy(model, ids, mask, 16, eos, store_dtype=torch.bfloat16)
        shrank = rows[:]
        kept = greedy(model, ids, mask, 16, eos, store_dtype=torch.bfloat16, drop_finished=False)
    assert batch == kept
    assert len({len(o) for o in batch}) >= 2, batch  # rows ended at different steps ...
    if not alike:
        print("this CPU's linear kernels round a row by its batch's row count: no row left")
        assert set(shrank) == {len(prompts)}
        return
    assert shrank[0] == len(prompts) and 2 <= min(shrank) < len(prompts)  # ... their work went, never a lone row


def test_a_layer_that_rounds_by_row_count_keeps_every_row(seed):
    """A head whose rows depend on how many rows it gets (as oneDNN's kernel choice makes them on
    AMX CPUs): ``rows_round_alike`` says so and no finished row leaves its batch."""
    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    model, tok = loaded.model, loaded.tokenizer
    head = model.lm_head
    head.forward = lambda x: torch.nn.functional.linear(x, head.weight) * (1 + x.shape[0] * 2.0**-10)
    prompts = prompts_of(tok, 5)
    ids, mask = left_padded(prompts, max(map(len, prompts)), tok.pad_token_id)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.inference_mode():
        assert not rows_round_alike(model, len(prompts))
        assert rows_round_alike(model, 2)  # nothing to shrink through
        first = greedy(model, ids, mask, 6, None)
        eos = spread_end_token(first)
        rows.clear()
        out = greedy(model, ids, mask, 12, eos)
    assert set(rows) == {len(prompts)}
    assert any(eos in o and len(o) < 12 for o in out)  # a row ended early, yet stayed


def test_the_cache_grows_past_its_room(gen):
    from transformers import LlamaConfig

    cache = decoding_cache(type("M", (), {"config": LlamaConfig(num_hidden_layers=1)})(), room=2, store_dtype=torch.bfloat16)
    keys = [torch.randn(2, 3, n, 4, generator=gen) for n in (5, 1, 1, 1, 4)]
    for k in keys:
        got, _ = cache.update(k, k * 2, 0)
    want = torch.cat(keys, dim=2).bfloat16()
    assert torch.equal(got, want) and got.dtype == torch.bfloat16 and cache.get_seq_length() == 12
    cache.batch_select_indices(torch.tensor([1]))
    got, vals = cache.update(keys[0][1:, :, :1], keys[0][1:, :, :1] * 2, 0)
    assert torch.equal(got[:, :, :12], want[1:]) and torch.equal(vals[:, :, -1:], (keys[0][1:, :, :1] * 2).bfloat16())


def test_a_prefix_decodes_as_generate_with_no_deprecated_cache_argument(seed):
    """A KV-prefix adapter under greedy decoding: the tokens of ``generate``, and no warning that a
    cache went by a name the installed transformers deprecates (5.24 renamed ``past_key_values`` to
    ``cache``, and ignores the old name where the new one is also passed)."""
    import warnings

    loaded = load(ModelConfig("tiny-llama"), seed=seed % 1000)
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(seed)
    attach(model, HOST.adapters.build("prefix", length=3))
    prompts = prompts_of(tok, 4)
    width = max(map(len, prompts))
    ids, mask = left_padded(prompts, width, tok.pad_token_id)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(past_key_values|cache_params).*")
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[:, width:].tolist()
        got = greedy(model, ids, mask, 8, None)
    assert got == want


def test_rows_leave_a_widened_batch_without_changing_an_output(seed):
    """LoRA on llama-512x6 in bf16 with every product widened (``peftlab.kernels.widened``, forced):
    decoding with finished rows leaving, where ``rows_round_alike`` lets them (on the CPU this was
    written on it does), equals decoding with every row kept."""
    from peftlab.kernels import widened

    model, tok = bf16_lora("llama-512x6", seed)
    prompts = prompts_of(tok, 6)
    ids, mask = left_padded(prompts, padded_width(max(map(len, prompts)), 32), tok.pad_token_id)
    with widened.widened_linears(model, torch.bfloat16, CPU, force=True), torch.inference_mode(), \
            torch.autocast("cpu", dtype=torch.bfloat16), attention(model, NAME):
        alike = rows_round_alike(model, len(prompts))
        eos = spread_end_token(greedy(model, ids, mask, 12, None, store_dtype=torch.bfloat16))
        batch = greedy(model, ids, mask, 12, eos, store_dtype=torch.bfloat16, drop_finished=alike)
        kept = greedy(model, ids, mask, 12, eos, store_dtype=torch.bfloat16, drop_finished=False)
    print(f"rows round alike under widened products: {alike}")
    assert batch == kept
