"""Methods that drop tokens: prompt compression (text in, text out) and visual token pruning.

The modules live in ``compressors/prompt`` and ``compressors/visual`` as they land.
"""

__all__: list[str] = []
