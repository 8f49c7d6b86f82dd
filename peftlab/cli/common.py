"""What every command shares: the plugin host it runs with."""

from __future__ import annotations

import argparse

from peftlab.host import HostSettings, PluginHost, load_host


def host_for(args: argparse.Namespace) -> PluginHost:
    """The plugin host for one command: ``--strict-plugins`` or the environment's settings."""
    return load_host(HostSettings.from_env(strict=args.strict_plugins))
