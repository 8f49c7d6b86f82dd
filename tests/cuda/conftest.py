"""The CUDA tests skip without a CUDA device, except where the run asks for one
(``PEFTLAB_REQUIRE_CUDA=1``, as ``nox -s gpu`` and the offline bundle's script set on a machine
with an NVIDIA driver): there a torch that sees no GPU stops the run with an error instead of
passing it as skipped."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    if os.environ.get("PEFTLAB_REQUIRE_CUDA") == "1":
        raise pytest.UsageError(f"PEFTLAB_REQUIRE_CUDA=1, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                                "sees no CUDA device: the CUDA checks cannot run")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
