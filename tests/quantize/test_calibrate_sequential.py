"""The sequential calibration pass (the GPTQ authors' form): each block's layers are calibrated on
what the packed blocks before it hand them. Checked against its definition written the slow way
(a one-pass calibration of each block in turn through the whole model, the blocks before it
already packed), on Llama and on GPT-2 (Conv1D layers, blocks called with positional arguments),
on fresh seeds."""

import pytest
import torch

from peftlab import ValidationError, load_host, quantize_
from peftlab.quantize.apply import select_layers
from peftlab.quantize.calibrate import blocks_of, calibrate, sequential

transformers = pytest.importorskip("transformers")
HOST = load_host()


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=100)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def batches(seed: int, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # right padding, left out of the sums
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def block_prefix(model) -> str:
    return "model.layers" if hasattr(model, "model") else "transformer.h"


def packed_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.dequantized_weight(torch.float32) for n, m in model.named_modules() if hasattr(m, "dequantized_weight")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequential_packs_as_each_block_calibrated_after_the_blocks_before_it_are_packed(kind, seed):
    data = batches(seed)
    gptq = HOST.quantizers.build("gptq", group_size=32)
    ours = tiny(kind)
    names = [n for n, _ in select_layers(ours, None)]
    seq = sequential(ours, names, data)
    assert seq is not None and seq.form == "sequential"
    quantize_(ours, gptq, calibration=seq)

    slow = tiny(kind)  # the definition: block by block, a one-pass calibration through the whole model as it is now
    prefix = block_prefix(slow)
    for i in range(3):
        mine = [n for n in names if n.startswith(f"{prefix}.{i}.")]
        cal = calibrate(slow, mine, data)
        quantize_(slow, gptq, lambda n, m, mine=mine: n in mine, calibration=cal.layers)
    a, b = packed_weights(ours), packed_weights(slow)
    assert sorted(a) == sorted(b) == sorted(names)
    for n in names:  # the same operations on the same inputs: the block alone or inside the model's forward
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=f"{n} (seed {seed})")
    assert set(seq._sums) == {n for n in names if n.startswith(f"{prefix}.2.")}  # only the last block's sums remain


def test_the_first_block_sees_the_float_model_and_later_blocks_the_packed_ones(seed):
    data = batches(seed)
    model = tiny("llama")
    names = [n for n, _ in select_layers(model, None)]
    float_pass = calibrate(tiny("llama"), names, data)
    seq = sequential(model, names, data)
    quantize_(model, HOST.quantizers.build("gptq-3bit", group_size=32), calibration=seq)
    first, last = "model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"
    seq0 = sequential(tiny("llama"), names, data)
    torch.testing.assert_close(seq0[first].hessian, float_pass.layers[first].hessian)
    assert seq[last].tokens == float_pass.layers[last].tokens == sum(int(b["attention_mask"].sum()) for b in data)
    assert not torch.allclose(seq[last].hessian, float_pass.layers[last].hessian, rtol=1e-3, atol=1e-5)


def test_layers_outside_one_list_of_blocks_fall_back_to_one_pass():
    model = tiny("llama")
    assert blocks_of(model, ["model.layers.0.self_attn.q_proj", "lm_head"]) is None
    assert sequential(model, ["model.layers.0.self_attn.q_proj", "lm_head"], batches(0)) is None
    found = blocks_of(model, ["model.layers.2.mlp.up_proj", "model.layers.0.self_attn.v_proj"])
    assert found is not None and found[1] == {"model.layers.2.mlp.up_proj": 2, "model.layers.0.self_attn.v_proj": 0}


def test_a_sequential_pass_cannot_go_back_a_block():
    model = tiny("llama")
    names = [n for n, _ in select_layers(model, None)]
    seq = sequential(model, names, batches(0))
    seq["model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValidationError, match="cannot go back"):
        seq["model.layers.0.self_attn.q_proj"]
    with pytest.raises(KeyError):
        seq["lm_head"]


def test_the_blocks_run_without_dropout_whatever_mode_the_model_is_in(seed):
    """GPT-2 has dropout (0.1); a model in training mode still calibrates as in eval mode, as the one
    pass does, and is handed back in training mode."""
    data = batches(seed)
    gptq = HOST.quantizers.build("gptq", group_size=32)
    ours, slow = tiny("gpt2").train(), tiny("gpt2")
    names = [n for n, _ in select_layers(ours, None)]
    quantize_(ours, gptq, calibration=sequential(ours, names, data))
    assert ours.training
    for i in range(3):
        mine = [n for n in names if n.startswith(f"transformer.h.{i}.")]
        quantize_(slow, gptq, lambda n, m, mine=mine: n in mine, calibration=calibrate(slow, mine, data).layers)
    a, b = packed_weights(ours), packed_weights(slow)
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=f"{n} (seed {seed})")
