"""The cache of what every cell rebuilds: tokenized data and the dequantized embedded model.
A hit gives exactly what a miss computes; a changed input is a different entry; off means off."""

import pytest
import torch

from peftlab import cache
from peftlab.cell.models import ModelConfig, load
from peftlab.cli.main import main
from peftlab.data.prompts import encode
from peftlab.data.sources import DataConfig
from peftlab.data.splits import load_splits


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "c"))
    return tmp_path / "c"


def counting(calls):
    def enc(rows, tok, n):
        calls.append(n)
        return encode(rows, tok, n)
    return enc


def test_tokenized_data_is_encoded_once_per_tokenizer_rows_and_length(folder):
    tok = load(ModelConfig("tiny-llama")).tokenizer
    rows, _, _ = load_splits(DataConfig(train_limit=40, eval_limit=1))
    calls = []
    first = cache.encode_cached(rows, tok, 300, counting(calls))
    again = cache.encode_cached(rows, tok, 300, counting(calls))
    assert calls == [300]
    assert again.examples == first.examples and (again.dropped, again.truncated) == (first.dropped, first.truncated)
    assert first.examples != encode(rows, tok, 400).examples  # the length matters here
    cache.encode_cached(rows, tok, 400, counting(calls))
    cache.encode_cached(rows[:-1], tok, 300, counting(calls))
    tok.chat_template = "{{ messages[0]['content'] }}"
    cache.encode_cached(rows, tok, 300, counting(calls))
    assert calls == [300, 400, 300, 300]


def test_a_damaged_entry_is_rebuilt_and_off_means_off(folder, monkeypatch):
    tok = load(ModelConfig("tiny-llama")).tokenizer
    rows, _, _ = load_splits(DataConfig(train_limit=8, eval_limit=1))
    calls = []
    first = cache.encode_cached(rows, tok, 400, counting(calls))
    (entry,) = (folder / "tokens").iterdir()
    entry.write_bytes(b"not a tensor file")
    assert cache.encode_cached(rows, tok, 400, counting(calls)).examples == first.examples
    assert calls == [400, 400]
    monkeypatch.setenv("PEFTLAB_CACHE", "off")
    assert cache.cache_root() is None
    cache.encode_cached(rows, tok, 400, counting(calls))
    assert calls == [400, 400, 400]


@pytest.mark.slow  # dequantizes and trains the real 135M GGUF model (50-90 s); the cache's rules are tested above
def test_the_embedded_model_loads_from_its_cached_float_copy(folder, capsys, embedded_model):
    slow = load(ModelConfig(embedded_model))
    (entry,) = (folder / "models").iterdir()
    fast = load(ModelConfig(embedded_model))
    assert cache.cached_gguf_folder(fast.source, "float32") == entry and fast.source == slow.source
    a, b = slow.model.state_dict(), fast.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fast.model.lm_head.weight is fast.model.model.embed_tokens.weight  # still tied
    text = slow.tokenizer.apply_chat_template([{"role": "user", "content": "Name: Aromi. Food: Thai."}], tokenize=False,
                                              add_generation_prompt=True)
    assert fast.tokenizer.apply_chat_template([{"role": "user", "content": "Name: Aromi. Food: Thai."}], tokenize=False,
                                              add_generation_prompt=True) == text
    assert fast.tokenizer(text)["input_ids"] == slow.tokenizer(text)["input_ids"]
    assert (fast.tokenizer.eos_token_id, fast.tokenizer.pad_token_id) == (slow.tokenizer.eos_token_id, slow.tokenizer.pad_token_id)
    assert main(["cache"]) == 0 and "models: 1 entries" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0 and not folder.exists()


@pytest.mark.slow  # dequantizes and trains the real 135M GGUF model (50-90 s); the cache's rules are tested above
def test_a_miss_trains_on_the_stored_copy_which_holds_the_gguf_weights(folder, embedded_model):
    """On a miss the cell's model is read back from the copy just stored, as every later cell reads
    it (the model transformers loaded from the GGUF left about 430 MiB more in use through a full
    fine-tuning run), and it holds what transformers' GGUF reader gives."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    miss = load(ModelConfig(embedded_model))
    assert not miss.from_cache and cache.cached_gguf_folder(miss.source, "float32") is not None
    assert getattr(miss.model, "hf_quantizer", None) is None  # not the GGUF-loaded object
    where, name = os.path.dirname(miss.source), os.path.basename(miss.source)
    direct = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    a, b = direct.state_dict(), miss.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    text = "Name: Aromi. Food: Thai. Area: city centre."
    assert miss.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
