"""Methods that change what attention sees.

Built in: :class:`SinkWindowAttention` (``"sink_window"``), StreamingLLM-style attention sinks
plus a sliding window — the baseline the landmark-attention module compares against.
"""

from .sink_window import SinkWindowAttention

__all__ = ["SinkWindowAttention"]
