"""Methods that drop tokens: prompt compression (text in, text out) and visual token pruning.

* ``compressors/prompt``: :class:`~tokenlean.compressors.prompt.PromptCompressor` (LLMLingua-2);
* ``compressors/visual``: ToDRE, FastV, DivPrune and two baselines as reversible patches on
  vision-language models (registered methods ``todre``, ``fastv``, ``divprune``,
  ``random_prune``, ``pool_prune``).
"""

from . import visual as visual  # registers the visual pruning methods

__all__: list[str] = ["visual"]
