"""Fine-tune a zoo LM with landmark attention: ``tokenlean train-landmark --model smollm2-135m --out DIR``.

Recipe (the paper's: short context, full attention over all blocks, no retrieval in training):

1. **Model.** The zoo model in float32 with :class:`~tokenlean.attention.landmark.LandmarkAttention`
   (``block_size`` 64: a landmark after every 63 tokens) patched in; ``<landmark>`` added by
   ``prepare`` (its embedding row starts at the mean row, as in the paper).
2. **Trainable parameters.** LoRA (rank ``lora_rank``, ``alpha``) on every attention projection
   (q, k, v, o), added as forward hooks so the model's classes stay as they are, and the landmark
   token's embedding vector. Everything else is frozen, so the shipped delta is small.
3. **Data.** The Paul Graham essays except the last ten (held out: ``heldout_essays``), tokenised,
   joined with ``</s>``-style separators (the tokenizer's EOS) and cut into windows of
   ``context - context / block_size`` tokens, which become ``context`` slots with their landmarks
   (512 → 504 tokens + 8 landmarks). A fixed order drawn from a generator seeded by the seed and
   the epoch. A share ``recall_fraction`` of each step's windows (drawn from the seed and the step)
   become *recall exercises* (:func:`recall_window`): one to three facts ("The <name> code is
   <5 digits>." and two other wordings, never the passkey test's) overwrite text in blocks 1 and
   later, and questions about up to two of them, each followed by its number, end the window, at
   least one block after the last fact. At 512 tokens an essay rarely needs a token from an
   earlier block, so the landmark gates get little reason to point anywhere in particular; an
   exercise's number can only be read through its block's landmark.
4. **Loss.** Next-token cross-entropy on the text's own tokens (landmarks stripped from the logits;
   the token before a landmark predicts the token after it), plus ``recall_weight`` times the mean
   cross-entropy of the asked numbers' digits in the micro-batch (each micro-batch's loss is
   weighted by its share of the step's windows; a micro-batch without exercises adds no answer
   term, so with ``micro_batch`` > 1 the answer term's weight depends on how the step's exercises
   fall into micro-batches — the shipped run's setting, 2 of 4).
5. **Optimiser.** AdamW (0.9, 0.98, weight decay 0), linear warm-up then cosine decay to 10 %,
   gradient clipping at 1.0, ``seqs_per_step`` windows per step in micro-batches.
6. **Evaluation.** Perplexity on ``EVAL_WINDOWS`` held-out windows at the training length, and
   *landmark retrieval accuracy* (:func:`landmark_retrieval_accuracy`): on held-out passkey
   prompts (a key line in one of blocks 1-6 of a seven-block text, the question after it), how
   often the model writes the key, and how often the landmark gates of the question's last token
   rank the key's block first, per head and by the vote of all heads (block 0, the attention
   sink, is not a candidate).
7. **Determinism.** Seeded; a checkpoint holds the trainable tensors, the optimiser and the step,
   so ``--resume`` continues where the run stopped.

The run leaves ``out/delta/`` (``landmark_delta.safetensors`` + ``landmark_delta.json``: the
LoRA matrices, the landmark vector and the settings) and ``log.txt``/``log.json``;
:func:`apply_landmark_delta` turns a base model into the landmark model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._io import atomic_write_json, atomic_write_text
from ._runs import (
    CHECKPOINT_NAME,
    RunLog,
    atomic_torch_save,
    install_dir,
    machine_description,
    prepare_run_dir,
    step_rows,
)
from .errors import TokenleanError

__all__ = [
    "DELTA_FILE",
    "LandmarkTrainConfig",
    "LandmarkTrainError",
    "add_train_landmark_arguments",
    "apply_landmark_delta",
    "landmark_delta_dir",
    "load_landmark_delta",
    "landmark_retrieval_accuracy",
    "recall_window",
    "run_train_landmark",
    "ship_landmark_delta",
    "train_landmark",
]

DELTA_FILE = "landmark_delta.safetensors"
DELTA_META = "landmark_delta.json"
EVAL_WINDOWS = 16
RETRIEVAL_PROMPTS = 24
RETRIEVAL_BLOCKS = 7  # blocks of text before the question; the first is not a candidate
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LandmarkTrainError(TokenleanError, ValueError):
    """Bad settings for ``train-landmark``."""


@dataclass
class LandmarkTrainConfig:
    """Everything that determines the trained delta (the run folder refuses other settings)."""

    model: str = "smollm2-135m"
    seed: int = 0
    block_size: int = 64
    context: int = 512
    max_steps: int = 140
    seqs_per_step: int = 4
    micro_batch: int = 2
    lr: float = 2e-3
    warmup_steps: int = 10
    lora_rank: int = 16
    lora_alpha: float = 32.0
    threads: int = 2
    recall_fraction: float = 0.5
    recall_weight: float = 1.0


def _check_config(cfg: LandmarkTrainConfig, minutes: float) -> None:
    for name in ("max_steps", "seqs_per_step", "micro_batch", "lora_rank", "threads"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LandmarkTrainError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(cfg.block_size, bool) or not isinstance(cfg.block_size, int) or cfg.block_size < 2:
        raise LandmarkTrainError(f"block_size must be an integer >= 2, got {cfg.block_size!r}")
    if not isinstance(cfg.context, int) or cfg.context % cfg.block_size or cfg.context < 2 * cfg.block_size:
        raise LandmarkTrainError(
            f"context ({cfg.context}) must be a multiple of block_size ({cfg.block_size}) and hold at least two blocks"
        )
    if cfg.seqs_per_step % cfg.micro_batch:
        raise LandmarkTrainError(
            f"seqs_per_step ({cfg.seqs_per_step}) must be a multiple of micro_batch ({cfg.micro_batch})"
        )
    if not cfg.lr > 0 or not cfg.lora_alpha > 0:
        raise LandmarkTrainError("lr and lora_alpha must be > 0")
    if not 0.0 <= cfg.recall_fraction <= 1.0:
        raise LandmarkTrainError(f"recall_fraction must be in [0, 1], got {cfg.recall_fraction!r}")
    if not cfg.recall_weight >= 0.0:
        raise LandmarkTrainError(f"recall_weight must be >= 0, got {cfg.recall_weight!r}")
    if not minutes > 0:
        raise LandmarkTrainError(f"minutes must be > 0, got {minutes!r}")


# --------------------------------------------------------------------------------------------
# LoRA by forward hooks
# --------------------------------------------------------------------------------------------


class LandmarkDelta(torch.nn.Module):
    """The trainable tensors: LoRA ``A``/``B`` per attention projection, and the landmark vector."""

    def __init__(self, model: torch.nn.Module, rank: int, alpha: float, landmark: int) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.landmark = landmark
        self.names: list[str] = []
        self.lora_a = torch.nn.ParameterDict()
        self.lora_b = torch.nn.ParameterDict()
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(module, torch.nn.Linear):
                key = name.replace(".", "__")
                a = torch.empty(rank, module.in_features)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_a[key] = torch.nn.Parameter(a)
                self.lora_b[key] = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.names.append(name)
        if not self.names:
            raise LandmarkTrainError(
                "no attention projections (q_proj/k_proj/v_proj/o_proj) found in the model"
            )
        embeddings = model.get_input_embeddings()
        self.vector = torch.nn.Parameter(embeddings.weight[landmark].detach().clone().float())

    def attach(self, model: torch.nn.Module) -> list[Any]:
        """Forward hooks adding the LoRA terms and the landmark vector; returns their handles."""
        handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            key = name.replace(".", "__")

            def hook(module: Any, inputs: Any, output: torch.Tensor, key: str = key) -> torch.Tensor:
                x = inputs[0]
                return output + (x @ self.lora_a[key].t() @ self.lora_b[key].t()) * self.scale

            handles.append(modules[name].register_forward_hook(hook))

        def embed_hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            where = (inputs[0] == self.landmark)[..., None]
            return torch.where(where, self.vector.to(output.dtype), output)

        handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
        return handles


SHIPPED_DELTAS = {"smollm2-135m-landmark": "smollm2-135m"}


def landmark_delta_dir(delta: str | os.PathLike[str]) -> Path:
    """The folder of a landmark delta: a zoo name (:data:`SHIPPED_DELTAS`, checked) or a folder."""
    if str(delta) in SHIPPED_DELTAS:
        from tokenlean import zoo

        zoo.verify(str(delta))  # shipped inside tokenlean: its files against their sha256 manifest
        return zoo.get_entry(str(delta)).path
    folder = Path(delta)
    if (folder / "delta" / DELTA_FILE).is_file():
        folder = folder / "delta"  # a train-landmark run folder
    if not (folder / DELTA_FILE).is_file() or not (folder / DELTA_META).is_file():
        names = ", ".join(SHIPPED_DELTAS)
        raise LandmarkTrainError(
            f"no landmark delta at {str(delta)!r}: give a shipped name ({names}) or a folder with "
            f"{DELTA_FILE} and {DELTA_META} (a train-landmark run's delta/)"
        )
    return folder


def load_landmark_delta(delta: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The settings and tensors of a landmark delta (see :func:`landmark_delta_dir`)."""
    from safetensors.torch import load_file

    folder = landmark_delta_dir(delta)
    return json.loads((folder / DELTA_META).read_text()), load_file(str(folder / DELTA_FILE))


def apply_landmark_delta(model: torch.nn.Module, tokenizer: Any, delta_dir: str | os.PathLike[str]) -> int:
    """Make ``model`` the landmark model: add ``<landmark>``, merge the LoRA terms, set the vector.

    Returns the landmark token id. The merge is ``W += scale · B A`` in float32, then cast back.
    """
    from tokenlean.attention.landmark import LandmarkAttention

    meta, tensors = load_landmark_delta(delta_dir)
    LandmarkAttention(block_size=int(meta["block_size"])).prepare(model, tokenizer)
    landmark = int(model.config.landmark_token_id)
    modules = dict(model.named_modules())
    scale = float(meta["scale"])
    with torch.no_grad():
        for name in meta["projections"]:
            key = name.replace(".", "__")
            weight = modules[name].weight
            merged = weight.float() + scale * (tensors[f"b.{key}"].float() @ tensors[f"a.{key}"].float())
            weight.copy_(merged.to(weight.dtype))
        embeddings = model.get_input_embeddings().weight
        embeddings[landmark] = tensors["landmark_vector"].to(embeddings.dtype)
    model.config.landmark_block_size = int(meta["block_size"])
    return landmark


def _save_delta(delta: LandmarkDelta, cfg: LandmarkTrainConfig, target: Path, extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {f"a.{k}": v.detach().contiguous() for k, v in delta.lora_a.items()}
        tensors |= {f"b.{k}": v.detach().contiguous() for k, v in delta.lora_b.items()}
        tensors["landmark_vector"] = delta.vector.detach().contiguous()
        save_file(tensors, str(tmp / DELTA_FILE))
        atomic_write_json(
            tmp / DELTA_META,
            {
                "base_model": cfg.model,
                "block_size": cfg.block_size,
                "context": cfg.context,
                "scale": delta.scale,
                "rank": cfg.lora_rank,
                "projections": delta.names,
                **extra,
            },
        )
        install_dir(tmp, target)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def ship_landmark_delta(run_dir: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Copy a finished run's ``delta/`` into the zoo's package data (``smollm2-135m-landmark``).

    Assembled beside ``dest`` and renamed into place when complete; its ``manifest.json`` (file →
    sha256, size; the run's command, settings, time, machine and final figures) is written last.
    """
    import shutil

    from tokenlean import zoo

    run_dir = Path(run_dir)
    report = json.loads((run_dir / "log.json").read_text())
    if not (run_dir / "delta" / DELTA_FILE).is_file() or report.get("final") is None:
        raise LandmarkTrainError(f"{str(run_dir)!r} holds no finished, evaluated train-landmark run")
    name = next(k for k, v in SHIPPED_DELTAS.items() if v == report["config"]["model"])
    target = Path(dest) if dest is not None else zoo.get_entry(name).path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in sorted((run_dir / "delta").iterdir()):
            shutil.copyfile(path, tmp / path.name)
        extra = {
            "training": {
                "command": report["command"],
                "config": report["config"],
                "steps": report["steps"],
                "train_wall_minutes": round(report["train_wall_minutes"], 2),
                "machine": report["machine"],
                "log": "benchmarks/results/smollm2_landmark_train/log.txt",
            },
            "base_perplexity": report["base_perplexity"],
            "untrained": report["evals"][0] if report["evals"] else None,
            "final": report["final"],
        }
        zoo.write_packaged_manifest(tmp, name, extra)
        install_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _windows(tokenizer: Any, docs: list[str], length: int) -> torch.Tensor:
    """The documents' tokens, EOS-separated, cut into ``(n, length)`` windows (the tail dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // length
    if n < 1:
        raise LandmarkTrainError(f"the texts hold {len(stream)} tokens, fewer than one window of {length}")
    return torch.tensor(stream[: n * length]).view(n, length)


def _split_docs() -> tuple[list[str], list[str]]:
    """The essays to train on, and the held-out ones (the harness's ``documents=heldout``)."""
    from tokenlean import data
    from tokenlean.eval.tasks import HELD_OUT_DOCUMENTS

    docs = data.load_documents("paul-graham-essays")
    return docs[:-HELD_OUT_DOCUMENTS], docs[-HELD_OUT_DOCUMENTS:]


# Recall exercises: a few "<name> ... <number>" facts hidden in a window's earlier blocks, questions
# about them at its end. Natural essays at 512 tokens rarely need a token from an earlier block, so
# the landmark gates get little reason to point anywhere in particular; these give every exercise
# window a token (the number) that can only be read through the right block's landmark. The
# wording is deliberately not the passkey test's ("The pass key is ..." in grass/sky filler).
RECALL_NAMES = (
    "river",
    "garden",
    "violet",
    "harbor",
    "lantern",
    "falcon",
    "copper",
    "meadow",
    "orchid",
    "glacier",
    "saddle",
    "thistle",
    "compass",
    "ember",
    "marble",
    "willow",
    "cobalt",
    "anchor",
    "juniper",
    "quarry",
    "beacon",
    "canyon",
    "pepper",
    "summit",
    "walnut",
    "velvet",
    "harvest",
    "tundra",
    "cinder",
    "pebble",
)
RECALL_TEMPLATES = (  # (fact, question); the question ends just before " <number>"
    (" The {name} code is {key}.", " What is the {name} code? The {name} code is"),
    (" Write down the number of the {name}: {key}.", " The number of the {name} was"),
    (" Note that the {name} id is {key}.", " Recall the {name} id. It is"),
)


def recall_window(
    ids: torch.Tensor, tokenizer: Any, rng: np.random.Generator, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of the 1-D window ``ids`` with 1-3 facts in its earlier blocks and questions at its end.

    Each fact (``RECALL_TEMPLATES``: a name and a random 5-digit number) overwrites tokens starting
    in block 1 or later (never the first block, the attention sink) and ending at least one block
    before the questions; the questions (about up to two of the facts, in random order) overwrite
    the window's last tokens, each followed by its number. Returns ``(ids, answer)``: ``answer``
    is True at the tokens of the asked numbers (the targets of the recall loss).
    """
    out = ids.clone()
    n = out.shape[0]
    per_block = block_size - 1  # text tokens per landmark block
    template = RECALL_TEMPLATES[int(rng.integers(len(RECALL_TEMPLATES)))]
    count = int(rng.integers(1, 4))
    names = rng.choice(len(RECALL_NAMES), size=count, replace=False)
    keys = [str(int(k)) for k in rng.integers(10_000, 100_000, size=count)]
    asked = rng.permutation(count)[: min(2, count)]

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tail: list[int] = []
    answer_at: list[int] = []
    for i in asked:
        question = tok(template[1].format(name=RECALL_NAMES[names[i]]))
        number = tok(" " + keys[i])
        tail += question
        # the number's tokens that hold digits (SmolLM2 writes " 12345" as " ", "1", ..., "5")
        answer_at += [
            len(tail) + j for j, t in enumerate(number) if any(c.isdigit() for c in tokenizer.decode([t]))
        ]
        tail += number + tok(".")
    facts = [tok(template[0].format(name=RECALL_NAMES[names[i]], key=keys[i])) for i in range(count)]
    first, last = per_block, n - len(tail) - per_block  # fact spans lie in [first, last)
    spans: list[tuple[int, int]] = []
    for fact in facts:

        def free(start: int, size: int = len(fact)) -> bool:
            return all(start + size <= a or start >= b for a, b in spans)

        for _ in range(100):
            start = int(rng.integers(first, max(first + 1, last - len(fact))))
            if free(start):
                break
        else:  # a crowded window: the first free start (check_recall_room makes this rare)
            start = next((i for i in range(first, last - len(fact) + 1) if free(i)), -1)
            if start < 0:
                raise LandmarkTrainError("recall exercise: no room for the facts in the window")
        if start + len(fact) > last:
            raise LandmarkTrainError(f"recall exercise: a window of {n} tokens is too short")
        spans.append((start, start + len(fact)))
        out[start : start + len(fact)] = torch.tensor(fact)
    out[n - len(tail) :] = torch.tensor(tail)
    answer = torch.zeros(n, dtype=torch.bool)
    answer[[n - len(tail) + a for a in answer_at]] = True
    return out, answer


def check_recall_room(tokenizer: Any, length: int, block_size: int) -> None:
    """Refuse, before training, a window of ``length`` tokens too short for the longest recall exercise."""

    def longest(i: int) -> int:
        return max(
            len(tokenizer(t[i].format(name=n, key="99999"), add_special_tokens=False)["input_ids"])
            for t in RECALL_TEMPLATES
            for n in RECALL_NAMES
        )

    number = len(tokenizer(" 99999.", add_special_tokens=False)["input_ids"])
    tail = 2 * (longest(1) + number)
    # the facts are placed at random without overlap: leave them twice the room they fill
    need = (block_size - 1) + 2 * 3 * longest(0) + (block_size - 1) + tail
    if need > length:
        raise LandmarkTrainError(
            f"recall exercises need windows of at least {need} tokens (the first block, room for three facts, "
            f"a block's gap, two questions); this run's windows hold {length}: raise context or set recall_fraction=0"
        )


def _recall_batch(
    windows: torch.Tensor, tokenizer: Any, cfg: LandmarkTrainConfig, step: int, rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s windows, each made a recall exercise with probability ``recall_fraction``."""
    ids = windows[rows].clone()
    answer = torch.zeros_like(ids, dtype=torch.bool)
    rng = np.random.default_rng([cfg.seed, step, 53])
    for i in range(ids.shape[0]):
        if rng.random() < cfg.recall_fraction:
            ids[i], answer[i] = recall_window(ids[i], tokenizer, rng, cfg.block_size)
    return ids, answer


def _training_loss(model: Any, ids: torch.Tensor, answer: torch.Tensor, weight: float) -> torch.Tensor:
    """Mean next-token cross-entropy, plus ``weight`` times the mean over the recall answers' tokens."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    loss = losses.mean()
    targets = answer[:, 1:].reshape(-1)
    if weight > 0 and bool(targets.any()):
        loss = loss + weight * losses[targets].mean()
    return loss


@torch.no_grad()
def _perplexity(model: Any, windows: torch.Tensor, batch: int) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def landmark_retrieval_accuracy(
    model: Any,
    tokenizer: Any,
    method: Any,
    texts: list[str],
    prompts: int = RETRIEVAL_PROMPTS,
    seed: int = 0,
    question_offset: int | str = 0,
) -> dict[str, Any]:
    """Whether the landmark gates of the query that must recall a passkey point at the key's block.

    Each prompt: ``RETRIEVAL_BLOCKS`` blocks of held-out text with a passkey line
    (``"The pass key is 12345. Remember it. 12345 is the pass key."``) replacing the start of one
    random block other than the first, then ``question_offset`` more tokens of text (0, the training
    log's setting: the question opens the next block; ``"random"``: uniform in 0 .. block_size - 2
    per prompt, as a question falls in real text) and the question
    ``"What is the pass key? The pass key is"``. The query is the question's last token (the one that predicts the key). The
    first block is not a candidate: most heads park their attention on the opening tokens (the
    "attention sink"), so its gate is large whatever the text says; the key is never put there.

    For every layer and head the gates of the candidate blocks are renormalised to sum to 1, so
    that each head has one vote of equal weight. Returned:

    - ``accuracy``: how often the candidate with the largest mean renormalised gate (all layers
      and heads) is the key's block;
    - ``head_accuracy``: how often a single head's largest candidate gate is the key's block,
      averaged over layers, heads and prompts; ``head_top2`` the same for the two largest;
    - ``chance`` (``1 / candidates``) and ``chance_top2``;
    - ``answer_accuracy``: how often the model, reading the whole prompt with landmarks, writes the
      key (teacher-forced: every token of ``" <key>"`` is the argmax after the tokens before it,
      which is what greedy decoding would write).

    ``model`` must be patched with ``method`` (a :class:`LandmarkAttention`).
    """
    rng = np.random.default_rng([seed, 77])
    bs = method.block_size
    per_block = bs - 1
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    blocks = RETRIEVAL_BLOCKS
    candidates = blocks - 1  # blocks 1 .. blocks-1
    if question_offset != "random" and (
        isinstance(question_offset, bool)
        or not isinstance(question_offset, int)
        or not 0 <= question_offset < per_block
    ):
        raise LandmarkTrainError(
            f"question_offset must be 'random' or an integer in [0, {per_block}), got {question_offset!r}"
        )
    hits = answered = 0
    offsets: list[int] = []
    room = blocks * per_block + (per_block if question_offset == "random" else int(question_offset))
    head_hits = 0.0
    head_hits2 = 0.0
    for _ in range(prompts):
        key = int(rng.integers(10000, 100000))
        line = tokenizer(
            f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False
        )["input_ids"]
        start = int(rng.integers(0, len(stream) - room))
        ids = list(stream[start : start + blocks * per_block])
        target = int(rng.integers(1, blocks))
        ids[target * per_block : target * per_block + len(line)] = line
        offset = int(rng.integers(0, per_block)) if question_offset == "random" else int(question_offset)
        offsets.append(offset)
        at = start + blocks * per_block
        ids += stream[at : at + offset] + question
        asked = len(ids) - 1  # the question's last token
        answer = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
        gates: list[torch.Tensor] = []
        method._gate_recorder, method._gate_query = gates, asked + asked // per_block  # its slot
        try:
            logits = model(input_ids=torch.tensor([ids + answer]), use_cache=False).logits
        finally:
            method._gate_recorder, method._gate_query = None, None
        predicted = logits[0, asked : asked + len(answer)].argmax(-1).tolist()
        answered += int(predicted == answer)  # greedy decoding would write the key
        landmark_slots = torch.arange(2 * bs - 1, blocks * bs, bs)  # landmarks of blocks 1 .. blocks-1
        per_head = torch.stack([g[0, :, 0, landmark_slots] for g in gates]).flatten(0, 1).double()
        per_head = per_head / per_head.sum(-1, keepdim=True).clamp_min(1e-300)  # (layers*heads, candidates)
        hits += int(int(per_head.mean(0).argmax()) + 1 == target)
        top2 = per_head.topk(2, dim=-1).indices + 1
        head_hits += float((top2[:, 0] == target).double().mean())
        head_hits2 += float((top2 == target).any(-1).double().mean())
    return {
        "question_offsets": offsets,
        "answer_accuracy": answered / prompts,
        "accuracy": hits / prompts,
        "head_accuracy": head_hits / prompts,
        "head_top2": head_hits2 / prompts,
        "prompts": prompts,
        "candidates": candidates,
        "chance": 1.0 / candidates,
        "chance_top2": 2.0 / candidates,
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _lr_factor(step: int, cfg: LandmarkTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_landmark(
    out: str | os.PathLike[str],
    config: LandmarkTrainConfig | None = None,
    *,
    minutes: float = 120.0,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    eval_minutes: float = 12.0,
    checkpoint_minutes: float = 4.0,
    final_eval: bool = True,
    eval_windows: int = EVAL_WINDOWS,
    retrieval_prompts: int = RETRIEVAL_PROMPTS,
    log_file: str | os.PathLike[str] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config.model`` with landmarks into ``out`` (see the module docstring); return the report."""
    cfg = config or LandmarkTrainConfig()
    _check_config(cfg, minutes)
    out = Path(out)
    wall0, cpu0 = time.time(), time.process_time()
    torch.set_num_threads(cfg.threads)
    if cfg.recall_fraction > 0:  # before the run folder is made
        from transformers import AutoTokenizer

        from tokenlean import zoo

        real = cfg.context - cfg.context // cfg.block_size
        check_recall_room(
            AutoTokenizer.from_pretrained(zoo.fetch(cfg.model, progress=False)), real, cfg.block_size
        )
    ckpt = prepare_run_dir(
        out, asdict(cfg), overwrite=overwrite, resume=resume, command="train-landmark", product="delta",
        error=LandmarkTrainError,
    )  # fmt: skip
    log = RunLog(progress)
    log(f"machine: {machine_description()}")
    log(f"config: {json.dumps(asdict(cfg))}")

    import tokenlean
    from tokenlean import zoo
    from tokenlean.attention.landmark import LandmarkAttention

    model, tokenizer = zoo.load(cfg.model, dtype=torch.float32)
    model.eval()  # no dropout; gradients flow all the same
    for p in model.parameters():
        p.requires_grad_(False)
    method = LandmarkAttention(block_size=cfg.block_size, kernel="auto")
    train_docs, held_docs = _split_docs()
    real = cfg.context - cfg.context // cfg.block_size
    eval_set = _windows(tokenizer, held_docs, real)[:eval_windows]
    base_ppl = _perplexity(model, eval_set, cfg.micro_batch) if ckpt is None and final_eval else None
    method.prepare(model, tokenizer)
    landmark = int(model.config.landmark_token_id)
    train_set = _windows(tokenizer, train_docs, real)
    log(
        f"data: {train_set.shape[0]} training windows of {real} tokens ({cfg.context} slots with landmarks), "
        f"{eval_set.shape[0]} held-out windows"
    )
    torch.manual_seed(cfg.seed)
    delta = LandmarkDelta(model, cfg.lora_rank, cfg.lora_alpha, landmark)
    n_train = sum(p.numel() for p in delta.parameters())
    log(
        f"model: {cfg.model}, {sum(p.numel() for p in model.parameters()):,} parameters; trainable {n_train:,} (LoRA r={cfg.lora_rank} on {len(delta.names)} projections + landmark vector)"
    )
    handles = delta.attach(model)
    opt = torch.optim.AdamW(delta.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    step, history, wall_before, cpu_before, seen = 0, [], 0.0, 0.0, 0
    if ckpt is not None:
        delta.load_state_dict(ckpt["delta"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        wall_before, cpu_before, seen = ckpt["wall_seconds"], ckpt["cpu_seconds"], ckpt["windows_seen"]
        base_ppl = ckpt.get("base_ppl")
        log(f"resumed from step {step}")

    def wall() -> float:
        return wall_before + time.time() - wall0

    def cpu() -> float:
        return cpu_before + time.process_time() - cpu0

    def checkpoint() -> None:
        atomic_torch_save(
            {
                "delta": delta.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "history": history,
                "wall_seconds": wall(),
                "cpu_seconds": cpu(),
                "windows_seen": seen,
                "base_ppl": base_ppl,
            },
            out / "checkpoints" / CHECKPOINT_NAME,
        )

    def evaluate(tag: str) -> dict[str, Any]:
        res = {
            "step": step,
            "wall_min": wall() / 60,
            "perplexity": _perplexity(model, eval_set, cfg.micro_batch),
            "retrieval": landmark_retrieval_accuracy(model, tokenizer, method, held_docs, retrieval_prompts),
        }
        log(
            f"{tag} step {step} ({wall() / 60:.1f} min wall): held-out ppl {res['perplexity']:.2f} "
            f"(base without landmarks {base_ppl:.2f}); landmark retrieval "
            f"{res['retrieval']['accuracy']:.0%} of {res['retrieval']['prompts']}, per head "
            f"{res['retrieval']['head_accuracy']:.1%} (chance {res['retrieval']['chance']:.1%}); "
            f"passkey answered {res['retrieval']['answer_accuracy']:.0%}"
            if base_ppl is not None
            else f"{tag} step {step}: held-out ppl {res['perplexity']:.2f}"
        )
        return res

    from tqdm.auto import tqdm

    interrupted = stopped_by_time = False
    try:
        with tokenlean.patch(model, method):
            if ckpt is None and final_eval:
                history.append(evaluate("before training:"))
            last_eval = last_ckpt = time.time()
            first = step
            with tqdm(
                total=cfg.max_steps, initial=step, desc="train-landmark", unit="step", disable=not progress
            ) as bar:
                while step < cfg.max_steps:
                    if stop_after is not None and step - first >= stop_after:
                        interrupted = True
                        break
                    if wall() > minutes * 60:
                        stopped_by_time = True
                        log(f"time limit of {minutes:g} min reached at step {step}")
                        break
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * _lr_factor(step, cfg)
                    rows = step_rows(cfg.seed, step, cfg.seqs_per_step, train_set.shape[0], stream=31)
                    opt.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    batch, answers = _recall_batch(train_set, tokenizer, cfg, step, rows)
                    for mb in range(0, len(rows), cfg.micro_batch):
                        ids, answer = batch[mb : mb + cfg.micro_batch], answers[mb : mb + cfg.micro_batch]
                        loss = _training_loss(model, ids, answer, cfg.recall_weight)
                        (loss * len(ids) / len(rows)).backward()
                        loss_sum += float(loss.detach()) * len(ids)
                    torch.nn.utils.clip_grad_norm_(delta.parameters(), 1.0)
                    opt.step()
                    step += 1
                    seen += len(rows)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / len(rows):.3f}")
                    history.append({"step": step, "loss": loss_sum / len(rows), "wall_min": wall() / 60})
                    if final_eval and time.time() - last_eval >= eval_minutes * 60 and step < cfg.max_steps:
                        history.append(evaluate("eval:"))
                        last_eval = time.time()
                    if time.time() - last_ckpt >= checkpoint_minutes * 60:
                        checkpoint()
                        last_ckpt = time.time()
            checkpoint()
            if interrupted:
                log(f"stopped after {step} steps (stop_after={stop_after}); resume with --resume")
                atomic_write_text(out / "log.txt", "\n".join(log.lines) + "\n")
                return {"steps": step, "interrupted": True, "delta_dir": None}
            train_wall, train_cpu = wall(), cpu()
            log(
                f"training done: {step} steps, {seen} windows, {train_wall / 60:.1f} min wall, {train_cpu / 60:.1f} min CPU"
            )
            final = evaluate("final:") if final_eval else None
    finally:
        for h in handles:
            h.remove()
    _save_delta(delta, cfg, out / "delta", {"steps": step, "final": final})
    size = (out / "delta" / DELTA_FILE).stat().st_size
    log(f"total: {wall() / 60:.1f} min wall, {cpu() / 60:.1f} min CPU; delta {size / 1e6:.1f} MB")
    report = {
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "config": asdict(cfg),
        "steps": step,
        "stopped_by_time_limit": stopped_by_time,
        "train_wall_minutes": train_wall / 60,
        "train_cpu_minutes": train_cpu / 60,
        "base_perplexity": base_ppl,
        "final": final,
        "evals": [h for h in history if "perplexity" in h],
        "losses": [h for h in history if "loss" in h],
        "delta_bytes": size,
        "delta_dir": str(out / "delta"),
    }
    for path in [out / "log.txt", *([Path(log_file)] if log_file else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(log.lines) + "\n")
        atomic_write_json(path.with_suffix(".json"), report)
    return report


def add_train_landmark_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tokenlean train-landmark`` options to ``parser``."""
    d = LandmarkTrainConfig()
    parser.add_argument("--model", default=d.model, help="zoo model to fine-tune (default: %(default)s)")
    parser.add_argument("--out", required=True, help="run folder (delta/, checkpoints/, log.txt)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--block-size", type=int, default=d.block_size, help="tokens per block incl. its landmark"
    )
    parser.add_argument(
        "--context", type=int, default=d.context, help="training length in slots, landmarks included"
    )
    parser.add_argument("--max-steps", type=int, default=d.max_steps)
    parser.add_argument("--seqs-per-step", type=int, default=d.seqs_per_step)
    parser.add_argument("--micro-batch", type=int, default=d.micro_batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument(
        "--recall-fraction",
        type=float,
        default=d.recall_fraction,
        help="share of training windows made recall exercises (default: %(default)s; 0 = essays only)",
    )
    parser.add_argument(
        "--recall-weight",
        type=float,
        default=d.recall_weight,
        help="weight of the recall answers' mean loss beside the text's (default: %(default)s)",
    )
    parser.add_argument(
        "--minutes", type=float, default=120.0, help="wall-clock limit (default: %(default)s)"
    )
    parser.add_argument("--eval-minutes", type=float, default=12.0, help="minutes between evaluations")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluations (for quick runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument(
        "--log", metavar="FILE", help="also write the log here (and its figures as FILE.json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def run_train_landmark(args: argparse.Namespace) -> int:
    """Run ``tokenlean train-landmark`` from parsed arguments; prints the figures; returns 0."""
    cfg = LandmarkTrainConfig(
        model=args.model,
        seed=args.seed,
        block_size=args.block_size,
        context=args.context,
        max_steps=args.max_steps,
        seqs_per_step=args.seqs_per_step,
        micro_batch=args.micro_batch,
        lr=args.lr,
        lora_rank=args.lora_rank,
        recall_fraction=args.recall_fraction,
        recall_weight=args.recall_weight,
    )
    report = train_landmark(
        args.out,
        cfg,
        minutes=args.minutes,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
        eval_minutes=args.eval_minutes,
        final_eval=not args.no_eval,
        log_file=args.log,
    )
    final = report.get("final") or {}
    print(
        json.dumps(
            {
                "delta_dir": report.get("delta_dir"),
                "steps": report["steps"],
                "held_out_perplexity": final.get("perplexity"),
                "base_perplexity": report.get("base_perplexity"),
            },
            indent=2,
        )
    )
    return 0
