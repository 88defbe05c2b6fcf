"""Keep/drop classifiers for the prompt-compression tests, built from real zoo weights.

No LLMLingua-2 checkpoint is reachable offline, so the tests build two 2-label token
classifiers on minilm-l6's real transformer layers and save them under folder names llmlingua
recognises (it picks its word rule from the name):

* ``*-bert-base-multilingual-cased-*``: minilm-l6 with its own WordPiece tokenizer (``##``).
* ``*-xlm-roberta-large-*``: the same layers with an XLM-R-style SentencePiece Unigram
  tokenizer (``▁`` word starts, ``<s>``/``</s>``/``<pad>``/``<unk>``/``<mask>``), trained here on
  the Paul Graham essays, and the embedding matrix cut to its vocabulary.

The classification head is seeded and scaled so keep probabilities spread over (0, 1): parity
is about the pipeline around the encoder, which must agree for any weights.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _head(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = model.classifier.weight.shape[1]
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(2, hidden, generator=gen) * 0.35)
        model.classifier.bias.zero_()


def build_bert_classifier(root: Path) -> Path:
    from transformers import AutoTokenizer, BertForTokenClassification

    from tokenlean import zoo

    out = root / "minilm-l6-bert-base-multilingual-cased-clf"
    if (out / "config.json").exists():
        return out
    src = str(zoo.get_entry("minilm-l6").path)
    model = BertForTokenClassification.from_pretrained(src, num_labels=2)
    _head(model, 0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def build_xlmr_classifier(root: Path, vocab_size: int = 6000) -> Path:
    from tokenizers import Regex, SentencePieceUnigramTokenizer, normalizers, pre_tokenizers
    from transformers import BertForTokenClassification, XLMRobertaTokenizerFast

    from tokenlean import zoo
    from tokenlean.data import load_text

    out = root / "minilm-l6-xlm-roberta-large-clf"
    if (out / "config.json").exists():
        return out
    text = load_text("paul-graham-essays")
    lines = [line for line in text.split("\n") if line.strip()]
    sp = SentencePieceUnigramTokenizer()
    # SentencePiece keeps punctuation and digits apart from letters (split_by_unicode_script,
    # split_by_number); a lone punctuation piece carries no "▁", which llmlingua's rule handles.
    sp.pre_tokenizer = pre_tokenizers.Sequence(
        [
            sp.pre_tokenizer,
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=False),
        ]
    )
    sp.train_from_iterator(
        lines, vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False,
    )  # fmt: skip
    # XLM-R's SentencePiece model folds every whitespace run (line breaks too) into one space.
    sp.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    sp.add_special_tokens(["<mask>"])
    tok = XLMRobertaTokenizerFast(tokenizer_object=sp._tokenizer)
    tok.bos_token, tok.eos_token, tok.sep_token, tok.cls_token = "<s>", "</s>", "</s>", "<s>"
    tok.unk_token, tok.pad_token, tok.mask_token = "<unk>", "<pad>", "<mask>"
    src = str(zoo.get_entry("minilm-l6").path)
    model = BertForTokenClassification.from_pretrained(src, num_labels=2)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.pad_token_id = tok.pad_token_id
    _head(model, 1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
