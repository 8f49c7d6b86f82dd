"""The contract, checked when a plugin loads: one plugin offering a good component next to one with
each authoring mistake gets one line per mistake, naming the plugin, the component and what is
wrong; only that component is refused, and its siblings work."""

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from peftlab import (
    Adapter,
    ComponentSpec,
    Metric,
    PluginError,
    QuantizedWeight,
    Quantizer,
    hookimpl,
    option,
)
from peftlab.host import PluginHost
from peftlab.probe import probe


class Scale(Quantizer):
    """A correct quantizer: one fp32 scale, int8 codes."""

    @dataclass
    class Settings:
        levels: int = option(127, "positive integer levels", gt=0)

    def _quantize(self, w):
        s = w.abs().max().float() / self.levels
        return QuantizedWeight("scale", tuple(w.shape), w.dtype,
                               {"codes": torch.round(w.float() / s).to(torch.int8), "scale": s.reshape(1)})

    def dequantize(self, q, dtype=torch.float32):
        return (q.tensors["codes"].float() * q.tensors["scale"]).to(dtype)

    def nominal_bits(self):
        return 8.0


class Flat(Scale):
    def dequantize(self, q, dtype=torch.float32):
        return super().dequantize(q, dtype).reshape(-1)


class Transposed(Scale):
    def dequantize(self, q, dtype=torch.float32):
        return super().dequantize(q, dtype).t().reshape(q.shape)


class KeepsBf16(Scale):
    def _quantize(self, w):
        q = super()._quantize(w)
        return QuantizedWeight("scale", q.shape, q.dtype, {**q.tensors, "scale": q.tensors["scale"].bfloat16()})


class IgnoresDtype(Scale):
    def dequantize(self, q, dtype=torch.float32):
        return super().dequantize(q, torch.float32)


class BadBound(Scale):
    @dataclass
    class Settings:
        levels: int = option(0, "levels", gt=0)


class BadType(Scale):
    @dataclass
    class Settings:
        levels: int = option("127", "levels")


class BadAnnotation(Scale):
    @dataclass
    class Settings:
        levels: int = option(127, "levels")
        dtype: torch.dtype = option(torch.float32, "a type no setting can take")


class NoDataclass(Scale):
    class Settings:
        levels: int = option(127, "levels")


class Toy(Adapter):
    def _attach(self, model):
        return []


class Words(Metric):
    def _compute(self, predictions, references):
        return {"words": 1.0}


class Unstorable(Words):
    def settings(self):
        return {"tokenizer": object()}


GOOD = {"quantizer": [("scale", Scale)], "adapter": [("toy", Toy)], "metric": [("words", Words)]}
MISTAKES = {
    "flat": (Flat, "dequantize(q, float32) returned shape (4096,) for a (32, 128) weight; it must return q.shape"),
    "transposed": (Transposed, "worse than zeros"),
    "keeps-bf16": (KeepsBf16, "quantize() stored 'scale' as bfloat16; stored float tensors are fp32"),
    "ignores-dtype": (IgnoresDtype, "dequantize(q, bfloat16) returned float32; it must return the dtype asked for"),
    "bad-bound": (BadBound, "setting 'levels' has default 0, outside its own bounds (> 0)"),
    "bad-type": (BadType, "setting 'levels' has default '127', which is not an integer"),
    "bad-annotation": (BadAnnotation, "setting 'dtype' is annotated dtype; settings take int, float"),
    "no-dataclass": (NoDataclass, "Settings is not a dataclass (decorate it with @dataclass)"),
}


class Author:
    """One out-of-tree plugin: the good components, every mistake, a metric that cannot be
    stored, and a metric whose name a built-in already has."""

    @hookimpl
    def peftlab_quantizers(self):
        return [ComponentSpec("quantizer", n, c) for n, c in GOOD["quantizer"]] + \
            [ComponentSpec("quantizer", n, c) for n, (c, _) in MISTAKES.items()]

    @hookimpl
    def peftlab_adapters(self):
        return [ComponentSpec("adapter", n, c) for n, c in GOOD["adapter"]]

    @hookimpl
    def peftlab_metrics(self):
        return [ComponentSpec("metric", n, c) for n, c in GOOD["metric"]] + \
            [ComponentSpec("metric", "unstorable", Unstorable), ComponentSpec("metric", "bleu-e2e", Words)]


def test_each_mistake_is_one_line_naming_plugin_component_and_problem_and_siblings_work(capsys):
    h = PluginHost(strict=False, disabled=set())
    h.load_entry_points()
    capsys.readouterr()
    rec = h.register(Author(), "author")
    err = capsys.readouterr().err.splitlines()
    assert rec.status == "ok"
    assert rec.components == {"quantizer": ["scale"], "adapter": ["toy"], "metric": ["words"]}
    for name, (_, why) in MISTAKES.items():
        assert why in rec.refused[f"quantizer {name}"], (name, rec.refused[f"quantizer {name}"])
        line = [e for e in err if f"quantizer {name!r} refused" in e]
        assert len(line) == 1 and "plugin 'author'" in line[0] and why in line[0], line
    assert "a value a record cannot store" in rec.refused["metric unstorable"]
    assert rec.refused["metric bleu-e2e"] == "the name is taken by plugin 'bleu'"
    assert len(err) == len(rec.refused) == len(MISTAKES) + 2  # one line each, nothing else
    assert h.quantizers.build("scale").quantize(torch.ones(2, 3)).shape == (2, 3)
    assert h.metrics.provider("bleu-e2e") == "bleu" and "bleu-e2e" in h.metrics


def test_strict_mode_makes_a_refusal_fatal_with_the_same_line():
    class One:
        @hookimpl
        def peftlab_quantizers(self):
            return [ComponentSpec("quantizer", "flat", Flat)]

    h = PluginHost(strict=True, disabled=set())
    with pytest.raises(PluginError, match=r"plugin 'one': quantizer 'flat' refused: dequantize\(q, float32\)"):
        h.register(One(), "one")


def test_a_plugin_whose_every_component_is_refused_is_an_error():
    class Only:
        @hookimpl
        def peftlab_quantizers(self):
            return [ComponentSpec("quantizer", "flat", Flat)]

    rec = PluginHost(strict=False, disabled=set()).register(Only(), "only")
    assert rec.status == "error" and "quantizer flat" in rec.error


def test_a_required_setting_is_checked_when_built_not_at_load():
    class NeedsPath(Words):
        def __init__(self, path: str | None = None):
            if path is None:
                from peftlab import ValidationError

                raise ValidationError("path", path, "a file")
            self.path = path

    assert probe(ComponentSpec("metric", "needs-path", NeedsPath)) is None


def test_every_installed_component_passes_its_load_time_check(host):
    for registry in host.registries.values():
        for spec in registry:
            assert probe(spec) is None, spec.name


def test_the_probe_catches_a_factory_that_builds_the_wrong_kind():
    def factory(**_: Any):
        return Words()

    assert probe(ComponentSpec("quantizer", "wrong", factory)) == \
        "it builds a Words, not a peftlab.plugin.quantizer.Quantizer"


def test_a_missing_program_is_not_an_authoring_mistake():
    from peftlab.toolkit import MissingDependency

    class NeedsJava(Words):
        def __init__(self):
            raise MissingDependency("metric 'needs-java' runs a Java program: install a Java runtime")

    class Plugin:
        @hookimpl
        def peftlab_metrics(self):
            return [ComponentSpec("metric", "needs-java", NeedsJava)]

    class NeedsPackage(Words):
        def __init__(self):
            import peftlab_no_such_package  # noqa: F401

    class Plugin2:
        @hookimpl
        def peftlab_metrics(self):
            return [ComponentSpec("metric", "needs-package", NeedsPackage)]

    h = PluginHost(strict=True, disabled=set())
    assert h.register(Plugin2(), "pkgplugin").refused == {}
    with pytest.raises(ModuleNotFoundError):
        h.metrics.build("needs-package")
    rec = h.register(Plugin(), "javaplugin")  # strict, and still no refusal
    assert rec.status == "ok" and rec.refused == {} and "needs-java" in h.metrics
    with pytest.raises(PluginError, match="install a Java runtime"):
        h.metrics.build("needs-java")


def test_a_passed_probe_is_remembered_until_its_source_changes(tmp_path, monkeypatch):
    """The second load skips the probe (nothing is built); editing the component's file, or turning
    the cache off, probes again."""
    import importlib
    import sys

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    module = tmp_path / "probe_cache_demo.py"
    source = ("from peftlab import Metric\nBUILT = []\nclass Counting(Metric):\n"
              "    def __init__(self):\n        BUILT.append(1)\n"
              "    def _compute(self, predictions, references):\n        return {'n': 1.0}\n")
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    demo = importlib.import_module("probe_cache_demo")
    spec = ComponentSpec("metric", "counting", demo.Counting)
    assert probe(spec) is None and demo.BUILT == [1]
    assert probe(spec) is None and demo.BUILT == [1]  # remembered
    module.write_text(source + "# edited\n")
    assert probe(spec) is None and demo.BUILT == [1, 1]  # its file changed
    monkeypatch.setenv("PEFTLAB_CACHE", "off")
    assert probe(spec) is None and demo.BUILT == [1, 1, 1]
    sys.modules.pop("probe_cache_demo")
