"""The typed settings schema: values checked against declarations, listed by the CLI, recorded."""

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from peftlab import Adapter, ComponentSpec, ValidationError, load_host, option


class Toy(Adapter):
    size_setting = "width"

    @dataclass
    class Settings:
        width: int = option(4, "how wide", gt=0, le=64)
        rate: float = option(0.5, "a share", ge=0, lt=1)
        mode: Literal["a", "b"] = option("a", "which way")
        names: list[str] | None = option(None, "globs")
        flag: bool = option(False, "on or off")

    def _attach(self, model):
        return []


def test_values_are_checked_converted_and_recorded():
    toy = Toy(width=8, rate=0, names=("x", "y"))
    assert toy.settings() == {"width": 8, "rate": 0.0, "mode": "a", "names": ["x", "y"], "flag": False}
    assert isinstance(toy.rate, float) and toy.size == 8
    json.dumps(toy.settings())


@pytest.mark.parametrize("bad,message", [
    ({"width": 0}, "width=0 is not allowed: an integer > 0, <= 64"),
    ({"width": 65}, "width=65"),
    ({"width": 2.5}, "an integer"),
    ({"width": True}, "an integer"),
    ({"rate": 1.0}, "rate=1.0 is not allowed: a finite number >= 0, < 1"),
    ({"rate": float("nan")}, "rate=nan is not allowed: a finite number"),
    ({"mode": "c"}, "one of 'a', 'b'"),
    ({"names": [1]}, "a list of strings or None"),
    ({"flag": "yes"}, "true or false"),
    ({"wdith": 3}, "one of its settings: width, rate, mode, names, flag"),
])
def test_bad_values_name_the_setting_the_value_and_what_is_allowed(bad, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Toy(**bad)


def test_a_real_adapter_refuses_an_infinite_setting_by_name():
    from peftlab import load_host

    with pytest.raises(ValidationError, match="alpha=inf is not allowed: a finite number"):
        load_host().adapters.build("lora", alpha=float("inf"))


def test_the_spec_sees_the_schema_as_a_signature():
    spec = ComponentSpec("adapter", "toy", Toy, {"width": 2})
    assert spec.accepts("rate") and not spec.accepts("nope") and spec.takes_list("names")
    assert spec.build(mode="b").settings()["width"] == 2
    with pytest.raises(ValidationError, match="nope"):
        spec.build(nope=1)


def test_a_setting_may_not_hide_an_adapter_attribute():
    class Bad(Adapter):
        @dataclass
        class Settings:
            size: int = option(1, "clashes")

        def _attach(self, model):
            return []

    assert Bad.settings_error == "setting 'size' would hide the base class's attribute of that name; rename it"
    with pytest.raises(ValidationError, match="would hide"):
        Bad()


def test_every_builtin_adapter_declares_a_schema_with_help_for_each_option():
    host = load_host()
    for spec in host.adapters:
        if not spec.factory.__module__.startswith("peftlab_plugins."):
            continue  # a third party may keep its hand-written __init__
        schema = getattr(spec.factory, "Settings", None)
        if spec.name == "full":
            assert schema is None
            continue
        from peftlab.toolkit import describe_schema

        assert schema is not None, spec.name
        assert all(o.help for o in describe_schema(schema)), spec.name


def test_cli_lists_one_adapters_options_with_the_presets_defaults():
    out = subprocess.run([sys.executable, "-m", "peftlab.cli", "adapters", "prefix-mlp", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    options = {o["name"]: o for o in data["options"]}
    assert options["reparameterize"]["default"] is True  # the preset's value, not the class default
    assert options["length"]["type"] == "an integer" and options["length"]["bounds"] == "> 0"
    assert data["peft_type"] == "PREFIX_TUNING" and data["grad_checkpointing"] is False
