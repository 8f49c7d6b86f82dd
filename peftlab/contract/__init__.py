"""The plugin contract as tests, shipped with peftlab so a plugin author runs them on an installed
plugin without a checkout: ``peftlab check PLUGIN --full``, or
``pytest -p peftlab.contract.plugin --pyargs peftlab.contract --peftlab-plugin PLUGIN`` (needs
``pip install peftlab[test]``).

Every quantizer round-trips weights of several shapes and dtypes to its shape and the dtype asked
for, stores real packed bytes, refuses bad input naming it and works under ``QuantizedLinear``;
every adapter trains something and only what it reports on a tiny Llama and a tiny GPT-2, saves and
reloads to equal outputs, merges to equal outputs or refuses, covers what trains with its optimizer
groups and generates the same with and without the cache; every metric prefers a reference to
noise. Without ``--peftlab-plugin`` they run over every installed component (``nox -s tests`` does).
"""
