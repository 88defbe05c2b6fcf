"""What every prompt compressor returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompressionResult"]


@dataclass
class CompressionResult:
    """The outcome of one ``compress`` call.

    Attributes
    ----------
    text : str
        The compressed prompt (the compressed contexts joined with ``"\\n\\n"``).
    texts : list of str
        One compressed text per input context, in input order (a context removed by the
        context-level filter gives ``""``).
    origin_tokens, compressed_tokens : int
        Token counts of the input (all contexts) and of ``text``, with the counter named in
        ``counter`` (tiktoken cl100k by default, as LLMLingua-2 counts).
    words : list of str
        The words the keep/drop decision was made on, in input order.
    labels : list of int
        ``1`` where the word was kept, ``0`` where it was dropped (same length as ``words``).
    counter : str
        Which tokenizer counted the tokens.
    info : dict
        Extra figures of the method (e.g. kept contexts, timings).
    """

    text: str
    texts: list[str]
    origin_tokens: int
    compressed_tokens: int
    words: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    counter: str = "tiktoken:cl100k_base"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``origin_tokens / compressed_tokens`` (e.g. 3.0 for "3x"); 1.0 when nothing was given."""
        if self.compressed_tokens == 0:
            return 1.0 if self.origin_tokens == 0 else float("inf")
        return self.origin_tokens / self.compressed_tokens

    @property
    def rate(self) -> float:
        """``compressed_tokens / origin_tokens``, the fraction kept; 1.0 for an empty input."""
        if self.origin_tokens == 0:
            return 1.0
        return self.compressed_tokens / self.origin_tokens

    def as_llmlingua(self) -> dict[str, Any]:
        """The result in llmlingua's ``compress_prompt`` dict format (strings like ``"3.3x"``)."""
        ratio = 1.0 if self.compressed_tokens == 0 else self.origin_tokens / self.compressed_tokens
        saving = (self.origin_tokens - self.compressed_tokens) * 0.06 / 1000
        return {
            "compressed_prompt": self.text,
            "compressed_prompt_list": [
                self.texts[i] for i in self.info.get("kept_contexts", range(len(self.texts)))
            ],
            "origin_tokens": self.origin_tokens,
            "compressed_tokens": self.compressed_tokens,
            "ratio": f"{ratio:.1f}x",
            "rate": f"{1 / ratio * 100:.1f}%",
            "saving": f", Saving ${saving:.1f} in GPT-4.",
        }

    def __str__(self) -> str:
        return self.text
