"""The calibration pass a calibrated quantizer (GPTQ) needs: what it records of each layer's
inputs, and a cell that runs it before packing."""

import pytest
import torch

from peftlab import ValidationError, load_host, quantize_
from peftlab.quantize.calibrate import calibrate

transformers = pytest.importorskip("transformers")
HOST = load_host()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_each_layer_gets_the_gram_matrix_and_mean_magnitudes_of_its_inputs_over_real_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_llama()
    ids = torch.randint(1, 100, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding, as training's batches: left out
    mask[2, 4:] = 0
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    got = calibrate(model, names, [{"input_ids": ids, "attention_mask": mask}])
    assert got.batches == 1 and got.tokens == int(mask.sum()) == 21
    for n in names:
        x = seen[n].reshape(-1, seen[n].shape[-1])[mask.reshape(-1).bool()].double()
        want = 2 * x.t() @ x / x.shape[0]
        assert got.layers[n].tokens == 21
        torch.testing.assert_close(got.layers[n].hessian.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.layers[n].abs_mean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-7)  # AWQ's


def test_quantize_refuses_a_calibrated_quantizer_without_every_layers_calibration():
    model = tiny_llama()
    with pytest.raises(ValidationError, match="missing"):
        quantize_(model, HOST.quantizers.build("gptq"))


def test_a_cell_calibrates_on_training_batches_then_packs_and_a_loftq_start_sees_the_same_calibration():
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import run_cell

    def cell(**over):
        return CellConfig.from_dict({"model": {"name": "tiny-llama"}, "data": {"train_limit": 8, "eval_limit": 1},
                                     "train": {"steps": 1, "batch_size": 2}, "eval": {"metrics": ["bleu-e2e"],
                                     "max_new_tokens": 2}, "quantizer": "gptq",
                                     "quantizer_params": {"batches": 3, "group_size": 32}, **over})

    plain = run_cell(cell(adapter="lora"), HOST, progress=False)
    assert plain["status"] == "ok", plain.get("reason")
    assert plain["quant.calibration.batches"] == 3 and plain["quant.calibration.tokens"] > 0
    assert plain["quant.calibration.layers"] == plain["quant.layers"] and plain["quant.while_loading"] is False
    assert plain["quant.calibration.form"] == "sequential"  # a decoder: each block on the packed blocks before it
    started = run_cell(cell(adapter="lora", adapter_params={"init": "loftq"}), HOST, progress=False)
    assert started["status"] == "ok", started.get("reason")
    assert started["quant.calibration.tokens"] == plain["quant.calibration.tokens"]  # the same seeded batches
    assert started["start.error"] < plain["start.error"]
