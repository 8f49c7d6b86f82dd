"""The built-in components peftlab uses when a setting is left out: configuration, not code.

The engine never branches on these names; they are only default values, and every one can be
overridden (``--adapter``, ``eval.metrics``). With the built-in plugins disabled, name the
components to use and nothing here is consulted.
"""

#: the adapter of a cell, ``peftlab ranks`` and ``peftlab estimate --model`` when none is named
ADAPTER = "lora"
#: the metrics a cell scores with when ``eval.metrics`` is not set (the E2E challenge's BLEU and
#: ROUGE-L, and rouge-score's ROUGE-L)
METRICS = ("bleu-e2e", "rougeL-e2e", "rougeL")
