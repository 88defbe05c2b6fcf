"""Random-weight token classifiers of the two published LLMLingua-2 encoder sizes, for timing.

Latency does not depend on weight values, and no LLMLingua-2 checkpoint is reachable offline, so
the speed comparison on a GPU builds BERT classifiers with the shapes of mBERT-base (LLMLingua-2-
small) and XLM-R-large (LLMLingua-2) from their real configurations, seeded, with a given
tokenizer (minilm-l6's by default), and saves them under folder names from which llmlingua picks
its word rule. The folders then go to the harness like any classifier:

    python benchmarks/prompt_classifiers.py --out .gpu_assets/classifiers --tokenizer DIR
    tokenlean bench --model none --workload compress:words=21000 --rate 0.33 --no-quality \\
        --compressor llmlingua:DIR/random-mbert-base-bert-base-multilingual-cased \\
        --compressor lingua2:DIR/random-mbert-base-bert-base-multilingual-cased,compat=true ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: hidden size, layers, heads, intermediate size of the two published LLMLingua-2 encoders
SIZES = {
    "mbert-base": (768, 12, 12, 3072, "bert-base-multilingual-cased"),
    "xlmr-large": (1024, 24, 16, 4096, "xlm-roberta-large"),
}


def build(kind: str, out: Path, tokenizer: str | None = None, seed: int = 0) -> Path:
    """Save a seeded random ``kind`` classifier (see :data:`SIZES`) under ``out``; return its folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from tokenlean import zoo

    hidden, layers, heads, inter, rule_name = SIZES[kind]
    folder = out / f"random-{kind}-{rule_name}"
    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer or str(zoo.fetch("minilm-l6", progress=False)))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, num_labels=2, architectures=["BertForTokenClassification"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForTokenClassification(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="parent folder of the classifier folders")
    parser.add_argument("--kinds", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: minilm-l6 from the zoo)"
    )
    args = parser.parse_args(argv)
    for kind in args.kinds:
        print(build(kind, Path(args.out), args.tokenizer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
