"""The contract tests over every installed plugin. They live in the package (``peftlab.contract``,
so ``peftlab check PLUGIN --full`` runs them without a checkout); pytest collects them here from the
installed copy that every other test uses (collecting ``peftlab/contract/`` by path would import the
checkout's copy under the installed package's name)."""

from peftlab.contract.test_adapters_and_metrics import *  # noqa: F403
from peftlab.contract.test_quantizers import *  # noqa: F403
