"""Peers: the prompt compressor a user would pick instead, behind tokenlean's compressor interface.

:class:`LLMLinguaPeer` runs the real ``llmlingua`` 0.2.2 package (``pip install llmlingua==0.2.2``;
it is in tokenlean's ``dev`` extra) and returns a :class:`~.result.CompressionResult`, so the
harness measures it beside tokenlean's compressor in one interleaved run
(``tokenlean bench --workload compress --compressor llmlingua:<folder> --compressor default``).

llmlingua picks its word rule from the model *name* (``bert-base-multilingual-cased`` -> ``##``
WordPiece, ``xlm-roberta-large`` -> SentencePiece). :func:`export_classifier` writes tokenlean's
shipped default classifier (adapter merged) into a folder whose name llmlingua reads correctly,
so ``llmlingua:default`` compares both libraries on the same weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from tokenlean.errors import TokenleanError

from .result import CompressionResult

__all__ = ["LLMLinguaPeer", "PeerError", "export_classifier"]

#: llmlingua's word separator in ``fn_labeled_original_prompt`` (its default) and ours.
_WORD_SEP = "\t\t|\t\t"
_LABEL_SEP = " "
_EXPORT_NAME = "tokenlean-default-bert-base-multilingual-cased"


class PeerError(TokenleanError, RuntimeError):
    """A peer library is missing or cannot run the given model."""


def export_classifier(folder: str | os.PathLike[str] | None = None) -> Path:
    """Write tokenlean's default classifier (minilm-l6 + shipped adapter, merged) as a HF folder.

    Parameters
    ----------
    folder : path, optional
        Parent folder; default ``<tokenlean cache>/peers``. The classifier goes into
        ``<folder>/tokenlean-default-bert-base-multilingual-cased`` (a name that makes llmlingua
        use the WordPiece ``##`` rule, which is minilm-l6's), written atomically; an existing
        complete export is reused.

    Returns
    -------
    Path
        The classifier folder (``config.json``, weights, tokenizer files).
    """
    import shutil
    import tempfile

    from tokenlean import zoo

    from .train import load_default_classifier

    parent = Path(folder) if folder is not None else zoo.cache_dir() / "peers"
    target = parent / _EXPORT_NAME
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_classifier()
    staging = Path(tempfile.mkdtemp(prefix=f".{_EXPORT_NAME}.", dir=parent))
    try:  # written beside the target, renamed into place when complete
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # an incomplete export from an interrupted run
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class LLMLinguaPeer:
    """llmlingua 0.2.2's ``PromptCompressor(use_llmlingua2=True)`` as a tokenlean compressor.

    Parameters
    ----------
    model : str
        A folder holding a 2-label token classifier whose name contains
        ``bert-base-multilingual-cased`` or ``xlm-roberta-large`` (llmlingua picks its word rule
        from the name), a hub id with internet, or ``"default"``: tokenlean's shipped
        classifier, exported by :func:`export_classifier`.
    device : str, optional
        ``"cpu"`` or ``"cuda"`` (default: CUDA when available).

    Attributes
    ----------
    last_timings : dict
        ``{"encoder_s": seconds}`` of the last call: wall time inside the classifier's forward
        (CUDA-synchronised), so the work around the encoder is ``total - encoder_s``.
    """

    peer = "llmlingua"

    def __init__(self, model: str = "default", device: str | None = None) -> None:
        try:
            from llmlingua import PromptCompressor as _LLMLingua
        except ImportError as exc:
            raise PeerError(
                "the llmlingua peer needs the llmlingua package: pip install llmlingua==0.2.2"
            ) from exc
        # llmlingua counts tokens with tiktoken's cl100k_base by name: make it work offline.
        from tokenlean import zoo

        from .counting import prepare_tiktoken_cache

        cache = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(zoo.cache_dir() / "tiktoken"))
        prepare_tiktoken_cache(cache)
        folder = str(export_classifier()) if model == "default" else str(model)
        if Path(folder).is_dir() and not any(
            key in Path(folder).name for key in ("bert-base-multilingual-cased", "xlm-roberta-large")
        ):
            raise PeerError(
                f"llmlingua picks its word rule from the model name; {folder!r} contains neither "
                "'bert-base-multilingual-cased' nor 'xlm-roberta-large': rename the folder"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_name = folder
        self._impl = _LLMLingua(model_name=folder, device_map=self.device.type, use_llmlingua2=True)
        self.last_timings: dict[str, float] = {}
        self._inside = 0.0
        self._started = 0.0
        self._impl.model.register_forward_pre_hook(self._enter)
        self._impl.model.register_forward_hook(self._leave)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter(self, *_: Any) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        self._sync()
        self._inside += time.perf_counter() - self._started

    def compress(self, text_or_list: str | list[str], rate: float = 0.5, **kwargs: Any) -> CompressionResult:
        """``compress_prompt(contexts, rate=rate, use_llmlingua2=True)``, as a CompressionResult.

        Extra keyword arguments go to llmlingua unchanged (``force_tokens``, ``target_token``...).
        ``words``/``labels`` are llmlingua's own word decisions (``return_word_label=True``).
        """
        contexts = [text_or_list] if isinstance(text_or_list, str) else list(text_or_list)
        self._inside = 0.0
        out = self._impl.compress_prompt(
            contexts,
            rate=rate,
            use_context_level_filter=False,
            return_word_label=True,
            word_sep=_WORD_SEP,
            label_sep=_LABEL_SEP,
            **kwargs,
        )
        self.last_timings = {"encoder_s": self._inside}
        words, labels = [], []
        for item in str(out.get("fn_labeled_original_prompt", "")).split(_WORD_SEP):
            word, sep, label = item.rpartition(_LABEL_SEP)
            if sep and label in ("0", "1"):
                words.append(word)
                labels.append(int(label))
        texts = list(out.get("compressed_prompt_list") or [out["compressed_prompt"]])
        return CompressionResult(
            text=out["compressed_prompt"],
            texts=texts if len(texts) == len(contexts) else [out["compressed_prompt"]],
            origin_tokens=int(out["origin_tokens"]),
            compressed_tokens=int(out["compressed_tokens"]),
            words=words,
            labels=labels,
            info={"peer": "llmlingua 0.2.2"},
        )

    def __repr__(self) -> str:
        return f"LLMLinguaPeer({self.model_name!r}, device={str(self.device)!r})"
