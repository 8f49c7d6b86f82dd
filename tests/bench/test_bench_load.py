"""Quantize while loading: a ~1.1B Llama (TinyLlama's shape, random weights, bf16, sharded
safetensors written in the setup) loaded with NF4 + double quantization by peftlab
(``load_quantized``) and by transformers + bitsandbytes (``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True))``), each in a fresh interpreter (this file is also the probe).

One round = one load in a fresh process (the benchmark's time includes starting Python and the
imports, the same for both; the probe's own load seconds are in extra_info). Memory: VmHWM minus
VmRSS after the imports, i.e. what the load itself took. Targets (issue 13): peak at most 1.2x the
quantized model plus the largest tensor, no worse than the peer, load at least as fast; packed
weights equal to the peer's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

LAYERS = 22  # TinyLlama-1.1B: hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000
CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": LAYERS, "num_attention_heads": 32,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
COMPARED = ["model.layers.0.self_attn.q_proj", f"model.layers.{LAYERS - 1}.mlp.down_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def probe(variant: str, folder: str, out: str) -> None:
    """Load once; print seconds, memory and sizes as JSON; save the compared layers' packed bytes."""
    import bitsandbytes  # noqa: F401
    import transformers

    from peftlab import load_host
    from peftlab.plugin.layers import QuantizedLinear
    from peftlab.quantize.while_loading import load_quantized

    quantizer = load_host().quantizers.build("nf4-dq")  # plugin discovery is not the load,
    _ = transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.BitsAndBytesConfig  # nor lazy imports
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    if variant == "peftlab":
        model, _ = load_quantized(folder, quantizer, dtype=torch.bfloat16)
    else:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, dtype=torch.bfloat16,
                                                                  device_map="cpu")
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) * 1024
    seen, size = set(), 0  # (bitsandbytes keeps its absmax in quant_state, not a buffer: its figure omits them)
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            size += t.numel() * t.element_size()
    packed = {}
    for name in COMPARED:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantizedLinear):
            q = layer.qweight.tensors
            packed[name] = {"packed": q["packed"], "codes": q["absmax_codes"], "absmax2": q["absmax_absmax"],
                            "offset": q["absmax_offset"].reshape(())}
        else:
            state = layer.weight.quant_state
            packed[name] = {"packed": layer.weight.data.reshape(-1), "codes": state.absmax,
                            "absmax2": state.state2.absmax, "offset": state.offset.reshape(())}
    torch.save(packed, out)
    print(json.dumps({"seconds": seconds, "peak_rss_delta": peak, "model_bytes": size}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The sharded bf16 checkpoint and its largest tensor's bytes."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("llama-1b")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="500MB")
    del model
    return str(folder), largest


RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("variant", ["peftlab", "peer"])
def test_load_nf4_dq(benchmark, checkpoint, variant, tmp_path):
    folder, largest = checkpoint
    out = str(tmp_path / "packed.pt")
    runs = []

    def once():
        done = subprocess.run([sys.executable, __file__, variant, folder, out], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))

    benchmark.group = "load 1.1B Llama, nf4-dq (fresh process)"
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=0)
    peak = max(r["peak_rss_delta"] for r in runs)
    benchmark.extra_info.update(impl=variant if variant == "peftlab" else "transformers+bnb", peak_rss=peak,
                                load_seconds=min(r["seconds"] for r in runs), model_bytes=runs[-1]["model_bytes"],
                                largest_tensor=largest)
    RESULTS[variant] = {"peak": peak, "packed": torch.load(out), "model_bytes": runs[-1]["model_bytes"]}
    print(f"\n{variant}: load {min(r['seconds'] for r in runs):.1f} s (best of 3), peak RSS growth "
          f"{peak / 2**20:.0f} MiB, model {runs[-1]['model_bytes'] / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
    if variant == "peftlab":
        bound = 1.2 * (runs[-1]["model_bytes"] + largest)
        assert peak <= bound, f"peak RSS growth {peak / 2**20:.0f} MiB > 1.2 x (model + largest tensor) = {bound / 2**20:.0f} MiB"
    if len(RESULTS) == 2:
        ours, peer = RESULTS["peftlab"], RESULTS["peer"]
        for name in COMPARED:
            for key, t in peer["packed"][name].items():
                assert torch.equal(ours["packed"][name][key], t), f"{name} {key} differs from bitsandbytes'"


if __name__ == "__main__":
    probe(*sys.argv[1:4])
