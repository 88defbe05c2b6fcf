"""Methods that change what attention sees.

Built in:

* :class:`SinkWindowAttention` (``"sink_window"``): StreamingLLM-style attention sinks plus a
  sliding window, the baseline the landmark-attention module compares against.
* :class:`TokenPrepending` (``"token_prepending"``) and :class:`SentenceEncoder`: better
  sentence embeddings from decoder LLMs (:mod:`tokenlean.attention.prepending`).
"""

from .prepending import SentenceEncoder, TokenPrepending, prepare_placeholder
from .sink_window import SinkWindowAttention

__all__ = ["SentenceEncoder", "SinkWindowAttention", "TokenPrepending", "prepare_placeholder"]
