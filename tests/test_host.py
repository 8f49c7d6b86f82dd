"""Plugin machinery: entry-point loading, isolation of broken plugins, strict mode, disabling,
the registry's duplicate and unknown-name errors, and the `peftlab plugins` command."""

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
from peftlab_plugins.absmax import AbsmaxQuantizer

import peftlab.host as plugins_mod
from peftlab import ComponentSpec, PluginError, UnknownNameError, hookimpl
from peftlab.host import PluginHost

BUILTINS = {"absmax", "fourbit", "quantile"}


class GoodPlugin:
    @hookimpl
    def peftlab_quantizers(self):
        return [ComponentSpec("quantizer", "good-int8", AbsmaxQuantizer, {"bits": 8})]


class MisspelledPlugin:
    @hookimpl
    def peftlab_quantiser(self):  # misspelled: must be reported, not silently ignored
        return []


class DuplicatePlugin:
    @hookimpl
    def peftlab_quantizers(self):
        return [ComponentSpec("quantizer", "nf4", AbsmaxQuantizer, {})]


def test_builtins_load_ok(host):
    records = {r["name"]: r for r in host.table()}
    assert BUILTINS <= set(records)
    for name in BUILTINS:
        assert records[name]["status"] == "ok", records[name]
        assert records[name]["distribution"] == "peftlab"
    assert {"absmax-int8", "quantile", "nf4", "nf4-dq", "fp4", "int4"} <= set(host.quantizers.names())


def test_in_process_plugin_registers():
    h = PluginHost(strict=False, disabled=set())
    rec = h.register(GoodPlugin(), "good")
    assert rec.status == "ok" and rec.components == {"quantizer": ["good-int8"]}
    assert h.quantizers.build("good-int8").bits == 8


def test_misspelled_hook_is_an_error_and_others_still_work(capsys):
    h = PluginHost(strict=False, disabled=set())
    bad = h.register(MisspelledPlugin(), "bad")
    good = h.register(GoodPlugin(), "good")
    assert bad.status == "error" and "peftlab_quantiser" in bad.error
    assert good.status == "ok"
    err = capsys.readouterr().err
    assert "plugin 'bad'" in err and err.count("\n") == 1  # one line


def test_strict_mode_raises():
    h = PluginHost(strict=True, disabled=set())
    with pytest.raises(PluginError, match="peftlab_quantiser"):
        h.register(MisspelledPlugin(), "bad")


def test_duplicate_name_names_both_providers():
    h = PluginHost(strict=False, disabled=set())
    h.register(GoodPlugin(), "first")

    class Again(GoodPlugin):
        pass

    rec = h.register(Again(), "second")
    assert rec.status == "error" and rec.refused == {"quantizer good-int8": "the name is taken by plugin 'first'"}
    assert "good-int8" in rec.error and "'first'" in rec.error
    assert h.quantizers.provider("good-int8") == "first"


def test_duplicate_against_builtin(host):
    h = PluginHost(strict=False, disabled=set())
    h.load_entry_points()
    rec = h.register(DuplicatePlugin(), "dup")
    assert rec.status == "error" and rec.refused == {"quantizer nf4": "the name is taken by plugin 'fourbit'"}
    assert h.quantizers.provider("nf4") == "fourbit"


def test_unknown_name_lists_known(host):
    with pytest.raises(UnknownNameError) as info:
        host.quantizers.get("nf5")
    msg = str(info.value)
    assert "'nf5'" in msg and "nf4" in msg and "nf4-dq" in msg and "quantile" in msg


def test_broken_entry_point_is_isolated(monkeypatch, capsys):
    real = list(plugins_mod.entry_points(group="peftlab"))
    broken = EntryPoint(name="broken", value="peftlab_no_such_module_xyz", group="peftlab")
    monkeypatch.setattr(plugins_mod, "entry_points", lambda group: [*real, broken])
    h = PluginHost(strict=False, disabled=set())
    h.load_entry_points()
    records = {r["name"]: r for r in h.table()}
    assert records["broken"]["status"] == "error"
    assert "ModuleNotFoundError" in records["broken"]["error"]
    assert all(records[n]["status"] == "ok" for n in BUILTINS)
    assert "nf4" in h.quantizers
    strict = PluginHost(strict=True, disabled=set())
    with pytest.raises(PluginError, match="broken"):
        strict.load_entry_points()


def test_disable_by_env(monkeypatch):
    monkeypatch.setenv("PEFTLAB_DISABLE_PLUGINS", "quantile, fourbit")
    h = PluginHost()
    h.load_entry_points()
    records = {r["name"]: r for r in h.table()}
    assert records["quantile"]["status"] == "disabled" and records["fourbit"]["status"] == "disabled"
    assert "nf4" not in h.quantizers and "absmax-int8" in h.quantizers


def test_strict_env(monkeypatch):
    monkeypatch.setenv("PEFTLAB_STRICT_PLUGINS", "1")
    assert PluginHost().strict


# -- the command line, with a fake installed distribution whose entry point is broken ---------

def _fake_broken_dist(tmp_path):
    info = tmp_path / "peftlab_broken_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftlab-broken-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftlab]\nbrokendemo = peftlab_broken_demo_mod\n")
    (tmp_path / "peftlab_broken_demo_mod.py").write_text("raise RuntimeError('boom at import')\n")
    return tmp_path


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_plugins_json_lists_builtins():
    out = _cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    table = {r["name"]: r for r in json.loads(out.stdout)}
    for name in BUILTINS:
        assert table[name]["status"] == "ok"
        assert table[name]["version"]
    assert set(table["fourbit"]["components"]["quantizer"]) == {"nf4", "nf4-dq", "fp4"}


def test_cli_broken_third_party_plugin(tmp_path):
    path = _fake_broken_dist(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    out = _cli("plugins", "--json", env_extra=env)
    assert out.returncode == 0, out.stderr
    table = {r["name"]: r for r in json.loads(out.stdout)}
    assert table["brokendemo"]["status"] == "error"
    assert table["brokendemo"]["distribution"] == "peftlab-broken-demo"
    assert "boom at import" in table["brokendemo"]["error"]
    assert all(table[n]["status"] == "ok" for n in BUILTINS)
    assert "brokendemo" in out.stderr
    strict = _cli("--strict-plugins", "plugins", env_extra=env)
    assert strict.returncode != 0 and "boom at import" in strict.stderr
    strict_env = _cli("plugins", env_extra={**env, "PEFTLAB_STRICT_PLUGINS": "1"})
    assert strict_env.returncode != 0


@pytest.mark.skipif(os.environ.get("PEFTLAB_EXPECT_EXAMPLE_PLUGIN") != "1",
                    reason="the example plugin is installed by `nox -s tests`")
def test_example_third_party_plugin_is_installed():
    out = _cli("plugins", "--json")
    table = {r["name"]: r for r in json.loads(out.stdout)}
    assert table["example"]["status"] == "ok"
    assert table["example"]["distribution"] == "peftlab-example-plugin"
    assert table["example"]["components"] == {"quantizer": ["ternary"], "adapter": ["layernorm"],
                                              "metric": ["example-exact-match"]}


def test_wrong_base_class_is_refused_at_load_and_at_build():
    class NotAQuantizer:
        def __init__(self, **kw):
            pass

    class Wrong:
        @hookimpl
        def peftlab_quantizers(self):
            return [ComponentSpec("quantizer", "wrong", NotAQuantizer)]

    h = PluginHost(strict=False, disabled=set())
    rec = h.register(Wrong(), "wrongplugin")
    assert "it builds a NotAQuantizer" in rec.refused["quantizer wrong"] and "wrong" not in h.quantizers
    h.quantizers.register(ComponentSpec("quantizer", "wrong", NotAQuantizer), provider="wrongplugin")
    with pytest.raises(PluginError, match="'wrong' from plugin 'wrongplugin' built a NotAQuantizer"):
        h.quantizers.build("wrong")  # the registry checks again (a factory may build differently per setting)


def test_spec_validation():
    from peftlab import ValidationError

    with pytest.raises(ValidationError, match="ComponentSpec.kind='tokenizer'"):
        ComponentSpec("tokenizer", "x", AbsmaxQuantizer)
    with pytest.raises(ValidationError, match="ComponentSpec.name"):
        ComponentSpec("quantizer", " x", AbsmaxQuantizer)


def test_cli_check_reports_each_component_of_an_installed_plugin(tmp_path, monkeypatch, capsys):
    info = tmp_path / "peftlab_half_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftlab-half-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftlab]\nhalfdemo = peftlab_half_demo_mod\n")
    (tmp_path / "peftlab_half_demo_mod.py").write_text(
        "import torch\n"
        "from peftlab import ComponentSpec, hookimpl\n"
        "from peftlab_plugins.absmax import AbsmaxQuantizer\n"
        "class Flat(AbsmaxQuantizer):\n"
        "    def dequantize(self, q, dtype=torch.float32):\n"
        "        return super().dequantize(q, dtype).reshape(-1)\n"
        "@hookimpl\n"
        "def peftlab_quantizers():\n"
        "    return [ComponentSpec('quantizer', 'half-good', AbsmaxQuantizer, {'bits': 8}),\n"
        "            ComponentSpec('quantizer', 'half-flat', Flat, {'bits': 8})]\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # in this process: entry points are read from sys.path
    from peftlab.cli.main import main

    assert main(["check", "halfdemo"]) == 1
    out = capsys.readouterr().out
    assert "ok       quantizer half-good" in out
    assert "refused  quantizer half-flat: dequantize(q, float32) returned shape (4096,)" in out
    assert "peftlab check halfdemo --full" in out
    assert main(["quantizers"]) == 0  # the refused one is gone, every other quantizer works
    listed = capsys.readouterr().out
    assert "half-good" in listed and "half-flat" not in listed and "nf4-dq" in listed
    assert main(["check", "absmax"]) == 0
    capsys.readouterr()
    assert main(["check", "no-such-plugin"]) == 2
    assert "no plugin 'no-such-plugin' is installed" in capsys.readouterr().err
