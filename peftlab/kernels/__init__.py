"""Compute that training and generation both run: attention, norms, the chunked head loss, packed
linears, compiled decoder layers, the allocator policy, and the precision frozen weights are kept in.
No orchestration lives here: the cell and generation decide when each one is used."""


def __getattr__(name: str):
    """``peftlab.kernels`` was the plugin API's quantization kernels before they became
    :mod:`peftlab.toolkit.blockwise`; a plugin still written against that name is told where they went."""
    from peftlab.plugin import blockwise

    if hasattr(blockwise, name):
        raise AttributeError(f"peftlab.kernels.{name} is now peftlab.toolkit.blockwise.{name} "
                             "(from peftlab.toolkit import blockwise)")
    raise AttributeError(f"module 'peftlab.kernels' has no attribute {name!r}")
