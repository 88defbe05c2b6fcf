"""Token Prepending: training-free sentence embeddings from decoder LLMs.

* :class:`TokenPrepending` (``"token_prepending"``): the patch. Before each decoder layer in
  ``[start_layer, exit_layer)`` the placeholder token's hidden state is overwritten by the last
  token's.
* :func:`prepare_placeholder`: adds the placeholder to a tokenizer and the model's embeddings.
* :class:`SentenceEncoder`: prompt + optional Token Prepending + readout layer + pooling, with a
  sentence-transformers / MTEB style ``encode``.
"""

from .encoder import PROMPTS, SentenceEncoder, preprocess_sentence
from .method import TokenPrepending, placeholder_id, prepare_placeholder

__all__ = [
    "PROMPTS",
    "SentenceEncoder",
    "TokenPrepending",
    "placeholder_id",
    "prepare_placeholder",
    "preprocess_sentence",
]
