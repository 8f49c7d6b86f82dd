"""What a cell pays to compile its decoder layers, cold and warm (``train.compile``).

Each measurement is a fresh interpreter (this module run as a script) that trains 4 steps of
llama-512x6 LoRA with ``train.compile = "layers"`` through ``peftlab.cell.train.train`` and prints
the record's ``train.compile_s`` (the first, compiled step's time over the second's). Cold: an
empty ``$PEFTLAB_CACHE`` (so an empty ``$PEFTLAB_CACHE/inductor``); warm: a second interpreter on
the same cache, as a sweep's next cell or next sweep finds it. fp32 compute, so that on a CPU
without bf16 units the compiled step is not the slow bf16 path (``peftlab.kernels.compiled``).
"""

from __future__ import annotations

import json
import sys

import pytest
from stepping import probe


def test_compile_cold_then_warm(tmp_path, monkeypatch):
    import torch

    from peftlab.kernels.compiled import missing

    if missing(torch.device("cpu")):
        pytest.skip(missing(torch.device("cpu")))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cold = probe(__file__, key=None)
    warm = probe(__file__, key=None)
    assert (tmp_path / "cache" / "inductor").is_dir()
    print(f"\ncompiling llama-512x6's 6 decoder layers (LoRA, fp32, 8 x 128 tokens a step) in a fresh process: cold "
          f"{cold['compile_s']:.1f} s, warm {warm['compile_s']:.1f} s (inductor's artefacts in $PEFTLAB_CACHE); "
          f"a compiled step {warm['step_s']:.3f} s")


def _measure() -> None:
    import time

    import torch

    from peftlab import load_host
    from peftlab.adapt.attach import attach
    from peftlab.cell.models import ModelConfig, load
    from peftlab.cell.train import TrainConfig, train

    torch.manual_seed(0)
    loaded = load(ModelConfig("llama-512x6"))
    attach(loaded.model, load_host().adapters.build("lora", r=8, alpha=16))
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(64):  # one length: every step one shape, so only the first compiles
        n = 128
        ids = torch.randint(3, 250, (n,), generator=gen).tolist()
        examples.append((ids, [-100] * (n // 2) + ids[n // 2:]))
    start = time.perf_counter()
    result = train(loaded.model, examples, TrainConfig(steps=4, batch_size=8, precision="fp32", compile="layers",
                                                       packing="off"),
                   pad_id=0, device=torch.device("cpu"), progress=False)
    print(json.dumps({"compile_s": result.compile_s, "step_s": (result.seconds - result.first_step_s) / 3,
                      "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    _measure()
    sys.exit(0)
