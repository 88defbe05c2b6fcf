"""Methods that change what attention sees.

Built in:

* :class:`SinkWindowAttention` (``"sink_window"``): StreamingLLM-style attention sinks plus a
  sliding window, the baseline the landmark-attention module compares against.
* :class:`LandmarkAttention` (``"landmark"``): landmark attention's grouped softmax, a PyTorch
  reference and a fused Triton kernel (:mod:`tokenlean.attention.landmark`).
* :class:`TokenPrepending` (``"token_prepending"``) and :class:`SentenceEncoder`: better
  sentence embeddings from decoder LLMs (:mod:`tokenlean.attention.prepending`).
"""

from .landmark import LandmarkAttention
from .prepending import SentenceEncoder, TokenPrepending, prepare_placeholder
from .sink_window import SinkWindowAttention

__all__ = [
    "LandmarkAttention",
    "SentenceEncoder",
    "SinkWindowAttention",
    "TokenPrepending",
    "prepare_placeholder",
]
