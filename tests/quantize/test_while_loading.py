"""Quantize while loading (``load_quantized``): bit for bit what loading the float model and then
``quantize_`` gives, for every quantizer plugin, on sharded and single-file checkpoints (Llama, and
GPT-2 with Conv1D layers and tied embeddings); and a broken checkpoint or a refused layer named
before a usable model exists."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import QuantizedWeight, Quantizer, ValidationError, load_host, quantize_
from peftlab.cell.models import ModelConfig, load
from peftlab.plugin.layers import QuantizedLinear
from peftlab.quantize.while_loading import load_quantized

transformers = pytest.importorskip("transformers")
HOST = load_host()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = load(ModelConfig(request.param)).model
    # shard the Llama (several files and an index), keep GPT-2 in one file
    model.save_pretrained(folder, max_shard_size="100KB" if request.param == "tiny-llama" else "1GB")
    return folder


def reference(folder, quantizer, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dtype=dtype)
    report = quantize_(model, quantizer)
    return model, report


@pytest.mark.parametrize("name", HOST.quantizers.names())
def test_equal_to_loading_then_quantizing(saved, name):
    quantizer = HOST.quantizers.build(name)
    if quantizer.calibration_batches():  # GPTQ needs the float model's activations: refused before any read
        with pytest.raises(ValidationError, match="calibration pass"):
            load_quantized(saved, quantizer)
        return
    ours, report = load_quantized(saved, quantizer)
    want, want_report = reference(saved, quantizer, torch.float32)
    assert report.layers == want_report.layers and report.bytes_after == want_report.bytes_after
    got, expected = ours.state_dict(), want.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key
    assert dict(ours.named_buffers()).keys() == dict(want.named_buffers()).keys()
    for key, buf in want.named_buffers():  # non-persistent ones too (rotary tables)
        assert torch.equal(dict(ours.named_buffers())[key], buf), key
    ids = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)


def test_bf16_and_tied_embeddings(saved):
    quantizer = HOST.quantizers.build("nf4-dq")
    ours, _ = load_quantized(saved, quantizer, dtype=torch.bfloat16)
    want, _ = reference(saved, quantizer, torch.bfloat16)
    for key, t in want.state_dict().items():
        assert torch.equal(ours.state_dict()[key], t), key
    emb, head = ours.get_input_embeddings(), ours.get_output_embeddings()
    assert (emb.weight is head.weight) == (want.get_input_embeddings().weight is want.get_output_embeddings().weight)
    assert not any(t.device.type == "meta" for t in [*ours.parameters(), *ours.buffers()])


def test_a_folder_without_safetensors_gives_none(tmp_path):
    assert load_quantized(tmp_path, HOST.quantizers.build("nf4")) is None


def sharded_copy(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = tmp_path / "model.safetensors.index.json"
    if not index.exists():
        pytest.skip("single-file checkpoint")
    return tmp_path, json.loads(index.read_text())["weight_map"]


def test_a_missing_shard_is_named(saved, tmp_path):
    folder, weight_map = sharded_copy(saved, tmp_path)
    shard = sorted(set(weight_map.values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(ValidationError, match=rf"checkpoint shard .*{shard}=.*missing"):
        load_quantized(folder, HOST.quantizers.build("nf4"))


def test_a_tensor_of_the_wrong_shape_is_named_with_its_file(saved, tmp_path):
    folder, weight_map = sharded_copy(saved, tmp_path)
    name = next(k for k in weight_map if k.endswith("mlp.up_proj.weight"))
    shard = folder / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValidationError, match=rf"tensor {name} in .*{weight_map[name]}=.*shape"):
        load_quantized(folder, HOST.quantizers.build("nf4"))


def test_a_tensor_the_index_misplaces_is_named(saved, tmp_path):
    folder, weight_map = sharded_copy(saved, tmp_path)
    shards = sorted(set(weight_map.values()))
    name = next(k for k, v in weight_map.items() if v == shards[0])
    weight_map[name] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValidationError, match=rf"tensor {name}=.*not in .*{shards[1]}"):
        load_quantized(folder, HOST.quantizers.build("nf4"))


def test_a_truncated_file_is_named(saved, tmp_path):
    folder = tmp_path
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ValidationError, match=rf"in .*{victim.name}=.*inside the file's"):
        load_quantized(folder, HOST.quantizers.build("nf4"))


class KeepsItsInput(Quantizer):
    """A test quantizer that stores the weight it was given as is (no copy)."""

    family = "identity"

    def _quantize(self, w):
        return QuantizedWeight("identity", tuple(w.shape), w.dtype, {"w": w})

    def dequantize(self, q, dtype=torch.float32):
        return q.tensors["w"].to(dtype)

    def nominal_bits(self):
        return 32.0


def test_a_quantizer_keeping_its_input_does_not_see_the_next_layer_overwrite_it(saved):
    ours, _ = load_quantized(saved, KeepsItsInput())
    want, _ = reference(saved, KeepsItsInput(), torch.float32)
    for key, t in want.state_dict().items():
        assert torch.equal(ours.state_dict()[key], t), key


class RefusesWideRows(Quantizer):
    """A test quantizer that cannot take rows wider than 64 (as a real one might refuse a shape)."""

    family = "narrow"

    def _quantize(self, w):
        if w.shape[-1] > 64:
            raise ValidationError("weight.shape", tuple(w.shape), "rows of at most 64 values")
        return QuantizedWeight("narrow", tuple(w.shape), w.dtype, {"w": w.clone()})

    def dequantize(self, q, dtype=torch.float32):
        return q.tensors["w"].to(dtype)

    def nominal_bits(self):
        return 32.0


def test_a_layer_the_quantizer_refuses_is_named(saved):
    with pytest.raises(ValidationError, match=r"layer .*(down_proj|c_proj)=.*a shape .* can quantize .*at most 64"):
        load_quantized(saved, RefusesWideRows())


def test_the_quantized_model_trains_an_adapter(saved):
    from peftlab import attach

    model, _ = load_quantized(saved, HOST.quantizers.build("nf4-dq"))
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    attach(model, HOST.adapters.build("lora", r=2))
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_cell_on_a_local_folder_quantizes_while_loading(tmp_path, capsys):
    from peftlab.cli.main import main

    loaded = load(ModelConfig("tiny-llama"))
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    records = {}
    for name, model in [("folder", str(tmp_path / "m")), ("config", "tiny-llama")]:
        out = tmp_path / f"{name}.json"
        code = main(["run", "--model", model, "--quantizer", "nf4-dq", "--steps", "1", "--batch-size", "2",
                     "--eval-limit", "2", "--max-new-tokens", "2", "--metrics", "bleu", "--no-progress",
                     "--json", "--out", str(out)])
        assert code == 0
        records[name] = json.loads(out.read_text())
    assert records["folder"]["quant.while_loading"] is True  # safetensors: quantized as it loaded
    assert records["config"]["quant.while_loading"] is False  # a config-built model exists in float first
    for key in ("quant.layers", "quant.bytes_after", "params.trainable", "params.total"):
        assert records["folder"][key] == records["config"][key], key
