"""Quality of the prompt compressors at rates 0.5 / 0.33 / 0.2 (issue 4, item 6).

Methods: the default compressor (``PromptCompressor()``, the shipped student) and two baselines,
random word drop and Selective-Context-style self-information under smollm2-135m. Measures:

* BBH few-shot accuracy: the 3-shot chain-of-thought demonstrations compressed, the question
  verbatim, answers scored by log-likelihood with a zoo LM reader, against the uncompressed
  demonstrations (and against none);
* needle retention in held-out Paul Graham essays (the last 10, never trained on);
* F1 of the kept words against the self-information teacher's keep labels (held-out essays);
* the achieved rate of every compress call ("rate honoured").

    python benchmarks/prompt_quality.py --out runs/prompt_quality                 # the full run
    python benchmarks/prompt_quality.py --out runs/pq_quick --quick               # a tiny one
    python benchmarks/prompt_quality.py --out runs/pq --methods random,selective_context \\
        --tasks date_understanding,navigate --n 30 --reader qwen2.5-0.5b

The folder receives ``report.json``, ``report.md``, ``report.html``, ``quality_vs_rate.png`` and
``rate_honoured.png`` (written atomically, once everything is measured) and ``units.jsonl``, the
finished units: an interrupted run resumes when started again with the same settings. See
``tokenlean.eval.compression`` for the method details.
"""

from __future__ import annotations

import argparse
import sys

from tokenlean.errors import TokenleanError
from tokenlean.eval.compression import add_quality_arguments, run_quality_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prompt_quality.py", description=__doc__.split("\n\n", 1)[0].strip()
    )
    add_quality_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_quality_command(args)
    except TokenleanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
