"""Methods that change what attention sees.

Built in:

* :class:`SinkWindowAttention` (``"sink_window"``): StreamingLLM-style attention sinks plus a
  sliding window, the baseline the landmark-attention module compares against.
* :class:`BlockRetrieval` (``"block_retrieval"``): a KV cache in blocks from which each query
  chunk retrieves its top-k (InfLLM's training-free scoring, or landmark attention's).
* :class:`LandmarkAttention` (``"landmark"``): landmark attention's grouped softmax, a PyTorch
  reference and a fused Triton kernel (:mod:`tokenlean.attention.landmark`).
* :class:`TokenPrepending` (``"token_prepending"``) and :class:`SentenceEncoder`: better
  sentence embeddings from decoder LLMs (:mod:`tokenlean.attention.prepending`).
"""

from .block_retrieval import BlockRetrieval
from .landmark import LandmarkAttention
from .prepending import SentenceEncoder, TokenPrepending, prepare_placeholder
from .sink_window import SinkWindowAttention

__all__ = [
    "BlockRetrieval",
    "LandmarkAttention",
    "SentenceEncoder",
    "SinkWindowAttention",
    "TokenPrepending",
    "prepare_placeholder",
]
