"""Variants: the configurations the harness measures side by side, baseline first.

A variant is one of

* ``baseline``: the unpatched model, prompts as given;
* ``patch``: a :class:`~tokenlean.methods.Method` applied to the model (``tokenlean.patch``)
  around each measurement, removed afterwards;
* ``compressor``: a text transform at a rate: every prompt (or every context of a prompt) is
  compressed before the model sees it. The model itself is left alone.

*Peers* are variants too: the implementation a user would pick instead of tokenlean's (for
prompt compression the real ``llmlingua`` package), registered with ``peer="<library>"`` so
reports can mark them. A new module adds its peers the same way: a compressor factory here, or a
:class:`~tokenlean.methods.Method` whose class sets ``peer`` for model patches.

Compressors are registered by name with :func:`register_compressor`; a spec is
``"name"`` or ``"name:k=v,..."``; the llmlingua peer also takes a bare model folder,
``"llmlingua:/path/to/classifier"``. Built in:

========================  ====================================================================
``default``               tokenlean's LLMLingua-2 compressor with the shipped offline classifier
``lingua2``               tokenlean's LLMLingua-2 compressor, any classifier (``model=<folder or hub id>``)
``random``                random word drop at the rate (seeded)
``selective_context``     Selective-Context-style self-information word drop under a zoo LM
``llmlingua``             peer: llmlingua 0.2.2's LLMLingua-2 (``pip install llmlingua==0.2.2``)
========================  ====================================================================

Options of ``default``/``lingua2``: ``precision`` (fp32, int8, bf16, fp16), ``compat``
(llmlingua 0.2.2's exact output), ``structure`` (keep code/JSON/headings verbatim), ``device``;
of ``random``: ``seed``; of ``selective_context``: ``model`` (zoo name, default smollm2-135m).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenlean.errors import EvalError, MethodConfigError, did_you_mean
from tokenlean.methods import Method, get_method_class, make_method, parse_method_spec, split_spec
from tokenlean.patching import patch

__all__ = [
    "KINDS",
    "CompressorFactory",
    "CompressorPool",
    "Variant",
    "compressor_names",
    "make_variants",
    "parse_compressor_spec",
    "register_compressor",
]

#: Variant kinds, in report order.
KINDS = ("baseline", "patch", "compressor")


@dataclass(frozen=True)
class CompressorFactory:
    """How to build a registered compressor.

    Attributes
    ----------
    name : str
    build : callable
        ``build(**options) -> compressor``; the compressor has ``compress(text_or_list, rate=...)``
        returning a :class:`~tokenlean.compressors.prompt.CompressionResult` (or an object with
        its ``text``, ``texts``, ``origin_tokens``, ``compressed_tokens``, ``words`` and
        ``labels``), and may keep ``last_timings["encoder_s"]`` (seconds inside its encoder).
    options : tuple of str
        Option names the spec may give.
    positional : str or None
        Option that a bare value after the colon fills (``llmlingua:/folder`` = ``model=/folder``).
    peer : str or None
        The library of a peer implementation (``"llmlingua"``), else None.
    doc : str
        One line for ``tokenlean methods``.
    """

    name: str
    build: Callable[..., Any]
    options: tuple[str, ...] = ()
    positional: str | None = None
    peer: str | None = None
    doc: str = ""


_COMPRESSORS: dict[str, CompressorFactory] = {}


def register_compressor(
    name: str,
    *,
    options: Sequence[str] = (),
    positional: str | None = None,
    peer: str | None = None,
    doc: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``build(**options) -> compressor`` as the compressor ``name`` (a decorator)."""

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        _COMPRESSORS[name] = CompressorFactory(
            name, build, tuple(options), positional, peer, doc or (build.__doc__ or "").strip().split("\n")[0]
        )
        return build

    return decorator


def compressor_names() -> list[str]:
    """Names of the registered compressors (peers included)."""
    return sorted(_COMPRESSORS)


def get_compressor_factory(name: str) -> CompressorFactory:
    """The factory registered as ``name``; an unknown name gets close names suggested."""
    try:
        return _COMPRESSORS[name]
    except KeyError:
        pass
    try:
        get_method_class(name)
    except MethodConfigError:
        raise EvalError(
            f"unknown compressor {name!r}.{did_you_mean(name, _COMPRESSORS)} "
            f"Compressors: {', '.join(sorted(_COMPRESSORS))}"
        ) from None
    raise EvalError(f"{name!r} is a model patch, not a prompt compressor: pass it with --method {name}")


def parse_compressor_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a compressor spec into its name and options (strings), checked against the factory.

    ``"default"``, ``"lingua2:model=/dir,precision=int8"``, ``"llmlingua:/dir"``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EvalError(f"a compressor spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    factory = get_compressor_factory(name.strip())
    rest = rest.strip()
    if rest and factory.positional and "=" not in rest.split(",")[0]:
        rest = f"{factory.positional}={rest}"
    try:
        _, items = split_spec(f"{name}:{rest}")
    except ValueError as exc:
        raise EvalError(f"bad compressor option {exc}") from None
    options = dict(items)
    unknown = sorted(set(options) - set(factory.options))
    if unknown:
        raise EvalError(
            f"compressor {factory.name!r} has no option(s) {', '.join(unknown)}; "
            f"options: {', '.join(factory.options) or 'none'}"
        )
    return factory.name, options


@dataclass(frozen=True)
class Variant:
    """A measured configuration.

    Attributes
    ----------
    name : str
        Unique within a run: ``"baseline"``, the method name (or its spec when two share a name),
        ``"<compressor spec>@<rate>"``.
    kind : {"baseline", "patch", "compressor"}
    method : Method or None
        The patch of a ``patch`` variant (the last one applied, when it is a stack).
    stack : tuple of Method
        Patches applied before ``method``, in order: a variant ``"landmark:delta=...+block_retrieval"``
        runs block retrieval on top of the landmark patch.
    compressor : str or None
        The compressor spec of a ``compressor`` variant.
    rate : float or None
        Fraction of tokens a ``compressor`` variant keeps.
    peer : str or None
        The library of a peer implementation.
    """

    name: str
    kind: str = "baseline"
    method: Method | None = None
    compressor: str | None = None
    rate: float | None = None
    peer: str | None = None
    options: dict[str, str] = field(default_factory=dict, compare=False)
    stack: tuple[Method, ...] = ()

    @property
    def methods(self) -> tuple[Method, ...]:
        """Every patch of the variant, in the order they are applied."""
        return (*self.stack, self.method) if self.method is not None else ()

    def record(self) -> dict[str, Any]:
        """The variant as the report record stores it."""
        if self.kind == "patch":
            assert self.method is not None
            method, params = "+".join(m.name for m in self.methods), self.method.params()
            if self.stack:
                params = {f"{m.name}.{k}": v for m in self.methods for k, v in m.params().items()}
        elif self.kind == "compressor":
            method, params = self.compressor.partition(":")[0], {**self.options, "rate": self.rate}
        else:
            method, params = None, {}
        return {
            "name": self.name,
            "kind": self.kind,
            "method": method,
            "params": params,
            "spec": self.compressor
            if self.kind == "compressor"
            else ("+".join(m.spec() for m in self.methods) if self.method else None),
            "rate": self.rate,
            "peer": self.peer,
        }

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """The model as this variant runs it: patched for a ``patch`` variant, else unchanged."""
        with contextlib.ExitStack() as stack:
            for method in self.methods:
                stack.enter_context(patch(model, method))
            yield


def _rate_label(rate: float) -> str:
    return f"{rate:g}"


def make_variants(
    methods: Sequence[Method | str | Sequence[Method | str]] | Method | str = (),
    compressors: Sequence[str] = (),
    rates: Sequence[float] = (),
) -> list[Variant]:
    """Baseline first, then one variant per method, then one per compressor and rate.

    Parameters
    ----------
    methods : method objects or specs
        Model patches (``"sink_window:window=256"``). A variant is named after its method, or
        after its spec when two methods share a name. Patches joined by ``+`` are one variant
        that applies them in order (``"landmark:delta=smollm2-135m-landmark+block_retrieval:scoring=landmark"``);
        so is a tuple (or list) of methods or specs inside ``methods``. A ``+`` followed by a
        registered name always starts a new method, also inside an option value.
    compressors : compressor specs
        Prompt compressors (``"default"``, ``"llmlingua:/dir"``); each is measured at every rate.
    rates : floats in (0, 1]
        Fractions of tokens kept; needs at least one compressor. Default with compressors: 0.5.

    Raises
    ------
    EvalError
        A rate without a compressor or outside (0, 1], a compressor given as a method (or the
        other way round), an unknown name, the same configuration twice.
    """
    if isinstance(methods, (str, Method)):
        methods = [methods]
    rates = list(rates)
    if rates and not compressors:
        raise EvalError("--rate is given but no --compressor: rates apply to prompt compressors only")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise EvalError(f"a rate is the fraction of tokens kept, in (0, 1]; got {rate!r}")
    if len(set(rates)) != len(rates):
        raise EvalError(f"a rate is given twice: {rates}")
    parsed: list[tuple[Method, ...]] = []
    for m in methods:
        if isinstance(m, str):
            parsed.append(tuple(_parse_one_method(part) for part in _split_stack(m)))
        elif isinstance(m, (tuple, list)):
            if not m:
                raise EvalError("an empty stack of methods")
            parsed.append(tuple(_parse_one_method(x) if isinstance(x, str) else make_method(x) for x in m))
        else:
            parsed.append((make_method(m),))
    for stack in parsed:
        names_in = [m.name for m in stack]
        if len(set(names_in)) != len(names_in):
            raise EvalError(f"the same method twice in one stack: {'+'.join(names_in)}")
    names = ["+".join(m.name for m in stack) for stack in parsed]
    variants = [Variant("baseline")]
    for stack, joined in zip(parsed, names):
        method = stack[-1]
        short = "+".join(m.spec(changed_only=True) for m in stack)
        name = short if names.count(joined) > 1 else joined
        variants.append(
            Variant(name, "patch", method=method, peer=getattr(method, "peer", None), stack=stack[:-1])
        )
    for spec in compressors:
        cname, options = parse_compressor_spec(spec)
        factory = get_compressor_factory(cname)
        canonical = _canonical_spec(cname, options, factory.positional)
        for rate in rates or [0.5]:
            variants.append(
                Variant(
                    f"{canonical}@{_rate_label(float(rate))}",
                    "compressor",
                    compressor=canonical,
                    rate=float(rate),
                    peer=factory.peer,
                    options=options,
                )
            )
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise EvalError(f"the same configuration is given twice: {v.name!r}")
        seen.add(v.name)
    return variants


def _split_stack(spec: str) -> list[str]:
    """``"a:x=1+b:y=2"`` → ``["a:x=1", "b:y=2"]``: a ``+`` starts a new method only where a method name follows."""
    parts: list[str] = []
    known = _method_names() | set(compressor_names())
    for piece in spec.split("+"):
        if parts and piece.partition(":")[0].strip() not in known:
            parts[-1] += "+" + piece  # a '+' inside an option value
        else:
            parts.append(piece)
    return parts


def _parse_one_method(spec: str) -> Method:
    name = spec.partition(":")[0].strip()
    if name not in _method_names() and name in compressor_names():
        raise EvalError(f"{name!r} is a prompt compressor, not a model patch: pass it with --compressor")
    return parse_method_spec(spec)


def _canonical_spec(name: str, options: dict[str, str], positional: str | None) -> str:
    """``name[:value][,k=v...]``: the positional option bare and first, the others sorted."""
    parts = [options[positional]] if positional and positional in options else []
    parts += [f"{k}={v}" for k, v in sorted(options.items()) if k != positional]
    return name + (":" + ",".join(parts) if parts else "")


def _method_names() -> set[str]:
    from tokenlean.methods import methods

    return {info.name for info in methods()}


# --------------------------------------------------------------------------------------------
# running compressors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compressed:
    """What a variant made of a text: the text(s) the model sees and what it cost.

    Attributes
    ----------
    text : str
        The compressed text (contexts joined as the compressor joins them).
    texts : list of str
        One compressed text per input context.
    origin_tokens, compressed_tokens : int
        cl100k tokens before and after (equal for the baseline and patches).
    seconds : float
        Wall time of the ``compress`` call (0 for variants that do not compress).
    encoder_s : float or None
        Seconds inside the compressor's encoder, where the compressor reports it.
    words, labels : list or None
        The compressor's words and keep decisions (1 = kept), where it reports them.
    """

    text: str
    texts: list[str]
    origin_tokens: int
    compressed_tokens: int
    seconds: float = 0.0
    encoder_s: float | None = None
    words: list[str] | None = None
    labels: list[int] | None = None

    @property
    def rate(self) -> float:
        """Achieved rate: compressed / original tokens (1.0 for an empty input)."""
        return self.compressed_tokens / self.origin_tokens if self.origin_tokens else 1.0

    def row(self) -> dict[str, float]:
        """Token counts and time, as the harness logs them per compress call."""
        return {
            "origin_tokens": int(self.origin_tokens),
            "compressed_tokens": int(self.compressed_tokens),
            "compress_s": float(self.seconds),
        }


class CompressorPool:
    """Builds each compressor once (shared by all rates of a spec) and runs it for a variant.

    Parameters
    ----------
    counter : str
        Token counter for the baseline's and patches' (uncompressed) token counts.
    shared_models : dict, optional
        ``{zoo name: (model, tokenizer)}`` of models already loaded, which compressors that need
        a zoo LM (selective context) reuse instead of loading them again.
    """

    def __init__(self, counter: str = "cl100k", shared_models: dict[str, tuple[Any, Any]] | None = None):
        self._built: dict[str, Any] = {}
        self._counter_name = counter
        self._counter: Any = None
        self.shared_models = dict(shared_models or {})

    def get(self, variant: Variant) -> Any:
        """The compressor object of a ``compressor`` variant (built on first use)."""
        if variant.kind != "compressor" or variant.compressor is None:
            raise EvalError(f"variant {variant.name!r} is not a prompt compressor")
        if variant.compressor not in self._built:
            name, options = parse_compressor_spec(variant.compressor)
            factory = get_compressor_factory(name)
            try:
                self._built[variant.compressor] = factory.build(pool=self, **options)
            except TypeError as exc:
                raise EvalError(f"bad options for compressor {variant.compressor!r}: {exc}") from None
        return self._built[variant.compressor]

    def count(self, text: str) -> int:
        if self._counter is None:
            from tokenlean.compressors.prompt.counting import get_counter

            self._counter = get_counter(self._counter_name)
        return int(self._counter.count(text))

    def compress(self, variant: Variant, text_or_list: str | Sequence[str]) -> Compressed:
        """``text_or_list`` as ``variant`` hands it to the model.

        A compressor variant compresses it at its rate (a list is a list of contexts, each
        compressed, as LLMLingua-2 does with demonstrations); other variants return it unchanged
        with its token count.
        """
        texts = [text_or_list] if isinstance(text_or_list, str) else list(text_or_list)
        if variant.kind != "compressor":
            joined = "\n\n".join(texts)
            n = self.count(joined)
            return Compressed(joined, texts, n, n)
        compressor = self.get(variant)
        start = time.perf_counter()
        result = compressor.compress(text_or_list, rate=variant.rate)
        seconds = time.perf_counter() - start
        timings = getattr(compressor, "last_timings", None) or {}
        out_texts = list(getattr(result, "texts", None) or [result.text])
        if len(out_texts) != len(texts):
            out_texts = [result.text]
        return Compressed(
            text=result.text,
            texts=out_texts,
            origin_tokens=int(result.origin_tokens),
            compressed_tokens=int(result.compressed_tokens),
            seconds=seconds,
            encoder_s=timings.get("encoder_s"),
            words=list(result.words) if getattr(result, "words", None) is not None else None,
            labels=[int(x) for x in result.labels] if getattr(result, "labels", None) is not None else None,
        )

    def close(self) -> None:
        """Drop every built compressor (frees their models)."""
        self._built.clear()


# --------------------------------------------------------------------------------------------
# built-in compressors
# --------------------------------------------------------------------------------------------


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise EvalError(f"compressor option {name} must be true or false, got {value!r}")


def _lingua2(model: str, pool: CompressorPool, precision: str, compat: Any, structure: Any, device: Any):
    from tokenlean.compressors.prompt import PromptCompressor

    return PromptCompressor(
        model,
        device=device,
        precision=precision,
        llmlingua_compat=_flag(compat, "compat"),
        keep_structure=_flag(structure, "structure"),
    )


@register_compressor("default", options=("precision", "compat", "structure", "device"))
def _build_default(pool: CompressorPool, precision="fp32", compat="false", structure="true", device=None):
    """tokenlean's LLMLingua-2 compressor with the shipped offline classifier (minilm-l6, distilled here)."""
    return _lingua2("default", pool, precision, compat, structure, device)


@register_compressor(
    "lingua2", options=("model", "precision", "compat", "structure", "device"), positional="model"
)
def _build_lingua2(
    pool: CompressorPool, model="default", precision="fp32", compat="false", structure="true", device=None
):
    """tokenlean's LLMLingua-2 compressor on any 2-label token classifier (folder or hub id)."""
    return _lingua2(model, pool, precision, compat, structure, device)


@register_compressor("random", options=("seed",))
def _build_random(pool: CompressorPool, seed="0"):
    """Random word drop at the rate (seeded): the floor a learned compressor must beat."""
    from tokenlean.compressors.prompt.baselines import RandomDropCompressor

    return RandomDropCompressor(seed=int(seed))


@register_compressor("selective_context", options=("model",))
def _build_selective(pool: CompressorPool, model="smollm2-135m"):
    """Selective-Context-style word drop by self-information under a zoo causal LM."""
    from tokenlean.compressors.prompt.baselines import SelectiveContextCompressor

    if model in pool.shared_models:
        lm, tok = pool.shared_models[model]
        return SelectiveContextCompressor(model=lm, tokenizer=tok)
    return SelectiveContextCompressor(model=model)


@register_compressor("llmlingua", options=("model", "device"), positional="model", peer="llmlingua")
def _build_llmlingua(pool: CompressorPool, model="default", device=None):
    """Peer: llmlingua 0.2.2's LLMLingua-2 on a classifier folder ("default": tokenlean's, exported)."""
    from tokenlean.compressors.prompt.peers import LLMLinguaPeer

    return LLMLinguaPeer(model, device=device)
