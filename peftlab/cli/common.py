"""What every command shares: the plugin host it runs with."""

from __future__ import annotations

import argparse
import math
from typing import Any

from peftlab.host import HostSettings, PluginHost, load_host


def host_for(args: argparse.Namespace) -> PluginHost:
    """The plugin host for one command: ``--strict-plugins`` or the environment's settings."""
    return load_host(HostSettings.from_env(strict=args.strict_plugins))


def metric_names(text: str) -> list[str]:
    """``--metrics a,b`` -> ["a", "b"]; a text that names no metric (``,``) is refused."""
    from peftlab.plugin.errors import ValidationError

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValidationError("--metrics", text, "comma-separated metric names, at least one (peftlab metrics lists them)")
    return names


def metric_settings(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--mset METRIC:KEY=VALUE`` (repeated) -> {metric: {key: value}}."""
    from peftlab.cell.config import parse_sets
    from peftlab.plugin.errors import ValidationError

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        metric, colon, setting = item.partition(":")
        if not colon or not metric:
            raise ValidationError("--mset", item, "METRIC:KEY=VALUE, e.g. evaluate:path=./my_metric.py")
        out.setdefault(metric, {}).update(parse_sets([setting], "--mset"))
    return out


def positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_number(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def _checked(text: str, kind, ok, allowed: str):
    """argparse types: a bad value exits 2 with the value and what is allowed."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {allowed}")
    return value
