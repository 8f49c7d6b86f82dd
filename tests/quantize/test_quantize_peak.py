"""quantize_ releases each float weight as soon as its packed copy replaces it: memory in use
never grows by more than one layer's work while the model shrinks (read with the heap reading,
malloc's bytes in use, after every layer's quantization)."""

import pytest
import torch

from peftlab import Quantizer, load_host, quantize_
from peftlab.kernels.heap import heap_in_use

HOST = load_host()


class Watching(Quantizer):
    """Another quantizer's results, with malloc's bytes in use read as each layer's packed copy
    is made (the moment a kept float layer would show)."""

    def __init__(self, inner: Quantizer):
        self.inner, self.readings = inner, []

    def _quantize(self, w):
        q = self.inner._quantize(w)
        self.readings.append(heap_in_use())
        return q

    def dequantize(self, q, dtype=torch.float32):
        return self.inner.dequantize(q, dtype)

    def nominal_bits(self):
        return self.inner.nominal_bits()


@pytest.mark.skipif(heap_in_use() is None, reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("name", ["nf4-dq", "absmax-int8"])
def test_quantize_peak_is_one_layer_above_the_float_model(name, seed):
    torch.manual_seed(seed)
    layers, side = 24, 512
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(layers)])
    one = side * side * 4
    watch = Watching(HOST.quantizers.build(name))
    start = heap_in_use()
    report = quantize_(model, watch, filter=lambda n, m: True)
    growth = max(watch.readings) - start
    # kept float layers would grow it by every packed copy so far: 24 x 72 KiB (nf4-dq) or 24 x
    # 256 KiB (int8), 1.7 and 6 MiB, against one float layer of 1 MiB
    assert growth <= one, f"{name}: memory in use grew {growth / 2**20:.2f} MiB while quantizing (one layer: 1 MiB)"
    assert len(report.layers) == layers
    assert heap_in_use() - start < -0.5 * layers * one  # and the model shrank
