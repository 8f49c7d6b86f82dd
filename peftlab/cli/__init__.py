"""The ``peftlab`` command line: argument parsing only; each command calls one function of a stage."""

from peftlab.cli.main import main

__all__ = ["main"]
