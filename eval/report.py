"""The one renderer: a bench record (``tokenlean.report/2``) into report files.

Every workload and task of the harness writes into the same record (see :func:`validate_record`),
and this module renders all of it. :func:`write_report` writes into a folder::

    report.json              the record itself
    report.md                the answer first (one line per variant), then every section
    report.html              one self-contained page (inline CSS, plots as data URIs)
    speedup_vs_quality.png   speed against quality kept, one marker per variant
    latency.png              the workload's timings per variant
    rate_honoured.png        achieved against requested rate of the prompt compressors
    <plot>.png               plots that tasks register (e.g. quality_vs_rate.png)
    <image>.png              pictures that sections hold (Image blocks; linked from report.md)

The page leads with the answer: one line per variant (speed ×, memory ×, quality kept, tokens
saved) and the speedup-against-quality plot; per-task sections, the workload's timings,
settings, model and machine details follow, the machine last.

A task or workload brings its own section and plot functions and nothing else:
``@register_section("name")`` on ``fn(record, key, entry) -> list[Table | Text | Pre | Image]`` renders a
quality entry whose ``section`` is ``"name"`` (Markdown and HTML alike); ``@register_plot("x.png")``
on ``fn(record) -> bytes | None`` adds a plot. Their modules are imported by
:func:`load_renderers` before a record is rendered.

Every file is written atomically (temporary file + rename), and everything is rendered in
memory before the first file is touched, so a failure never leaves a half-written report.

Conventions used in the tables
------------------------------
* latency cells read ``median [p25–p75]`` in the same unit; seconds below 1 s are shown in ms,
  throughputs in tokens (or sentences) per second, peak memory in MB;
* speedup cells read ``median× [p25–p75]`` of the per-repeat ratios reference/variant
  (> 1× means the variant is faster, or uses less memory); the reference reads ``1.00×``;
* "kept" is a task's primary metric relative to the baseline, in percent:
  ``variant / baseline`` when higher is better, ``baseline / variant`` when lower is better.
"""

from __future__ import annotations

import base64
import copy
import html
import importlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenlean._io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir
from tokenlean.errors import TokenleanError

__all__ = [
    "SCHEMA",
    "Image",
    "Pre",
    "ReportError",
    "Table",
    "Text",
    "fmt",
    "fmt_pct",
    "load_record",
    "load_renderers",
    "new_figure",
    "plot_latency",
    "plot_rate_honoured",
    "plot_speedup_vs_quality",
    "png_bytes",
    "register_plot",
    "register_section",
    "render_html",
    "render_markdown",
    "validate_record",
    "variant_colors",
    "variant_label",
    "write_report",
]

SCHEMA = "tokenlean.report/2"
#: Older record schemas that still load and render (upgraded in memory).
COMPATIBLE_SCHEMAS = ("tokenlean.report/1",)

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
SPEEDUP_PLOT_NAME = "speedup_vs_quality.png"
LATENCY_PLOT_NAME = "latency.png"
RATE_PLOT_NAME = "rate_honoured.png"
_RESERVED_NAMES = (SPEEDUP_PLOT_NAME, LATENCY_PLOT_NAME, RATE_PLOT_NAME)

# Display names of latency metrics, in display order: key -> (column title, kind).
# kind "s": seconds (shown in ms below 1 s), "rate": per second, "mb": megabytes, "": as is.
LATENCY_METRICS: dict[str, tuple[str, str]] = {
    "compress_s": ("compress", "s"),
    "encoder_s": ("encoder", "s"),
    "around_encoder_s": ("around the encoder", "s"),
    "prefill_s": ("prefill", "s"),
    "ttft_s": ("TTFT", "s"),
    "decode_tokens_per_s": ("decode", "rate"),
    "e2e_s": ("e2e", "s"),
    "encode_s": ("encode", "s"),
    "sentences_per_s": ("encode throughput", "rate"),
    "prompt_tokens": ("prompt tokens", ""),
    "achieved_rate": ("achieved rate", ""),
    "peak_memory_mb": ("peak memory", "mb"),
}

# Display names of speedup keys, in display order: key -> column title.
SPEEDUP_KEYS: dict[str, str] = {
    "compress": "compress",
    "encoder": "encoder",
    "around_encoder": "around the encoder",
    "prefill": "prefill",
    "ttft": "TTFT",
    "decode": "decode",
    "e2e": "e2e",
    "encode": "encode",
    "peak_memory": "peak memory",
}

_REQUIRED_KEYS = ("schema", "created", "machine", "model", "variants", "latency", "speedup", "quality")
_DASH = "—"
_KINDS = ("baseline", "patch", "compressor")


class ReportError(TokenleanError, ValueError):
    """A benchmark record is missing, unreadable or does not follow ``tokenlean.report/2``."""


# --------------------------------------------------------------------------------------------
# validation and loading
# --------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_stats(stats: Any, where: str, required: tuple[str, ...]) -> None:
    if not isinstance(stats, Mapping):
        raise ReportError(f"{where} must be an object with {', '.join(required)}, got {type(stats).__name__}")
    for key in required:
        if key not in stats:
            raise ReportError(f"{where} is missing {key!r}")
        if not _is_number(stats[key]):
            raise ReportError(f"{where}[{key!r}] must be a number, got {stats[key]!r}")
    for key in ("min", "max"):
        if key in stats and stats[key] is not None and not _is_number(stats[key]):
            raise ReportError(f"{where}[{key!r}] must be a number, got {stats[key]!r}")
    if "n" in stats and (not isinstance(stats["n"], int) or isinstance(stats["n"], bool) or stats["n"] < 0):
        raise ReportError(f"{where}['n'] must be a non-negative integer, got {stats['n']!r}")
    if "values" in stats:
        values = stats["values"]
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise ReportError(f"{where}['values'] must be a list of numbers")


def _check_variant_stats(record: Mapping[str, Any], section: str, known: set[str], what: str) -> None:
    """Check ``record[section]``: ``{variant: {name: {"median", "p25", "p75", ...}}}``, known variants only."""
    entries = record[section]
    if not isinstance(entries, Mapping):
        raise ReportError(f"record[{section!r}] must be an object (empty when not measured)")
    for vname, stats_by_name in entries.items():
        if vname not in known:
            raise ReportError(f"record[{section!r}] has unknown variant {vname!r}")
        if not isinstance(stats_by_name, Mapping):
            raise ReportError(f"record[{section!r}][{vname!r}] must be an object of {what}")
        for key, stats in stats_by_name.items():
            _check_stats(stats, f"record[{section!r}][{vname!r}][{key!r}]", ("median", "p25", "p75"))


def validate_record(record: Any) -> None:
    """Check that ``record`` follows the ``tokenlean.report/2`` schema (``/1`` records are accepted).

    Parameters
    ----------
    record : dict
        A benchmark record. Required keys: ``schema`` (``"tokenlean.report/2"``), ``created``
        (str), ``machine`` (dict), ``model`` (dict with a str ``name``), ``variants`` (non-empty
        list of ``{"name", "kind", "method", "params", ...}``, the first being the baseline with
        ``kind="baseline"`` and ``method=None``; kinds ``patch`` and ``compressor`` follow),
        ``latency`` and ``speedup`` (``{variant: {metric: {"median", "p25", "p75", ...}}}``) and
        ``quality`` (``{task: {"primary", "higher_is_better", "variants": {variant: {metric:
        number}}, "section"?, "compare"?, "extra"?, "n_examples"?, "config"?}}``), possibly empty.
        Optional: ``seed``, ``config``, ``workload`` (``{"name", "metrics", "speedups",
        "primary", "reference", "options", "extra"}``) and ``tokens`` (``{variant: {"saved",
        "requested", "achieved_mean", ...}}`` for prompt compressors).

    Raises
    ------
    ReportError
        (a ``ValueError``) naming the first problem found.
    """
    if not isinstance(record, Mapping):
        raise ReportError(f"a report record must be a JSON object, got {type(record).__name__}")
    if "schema" not in record:
        raise ReportError(f"record has no 'schema' key (expected {SCHEMA!r})")
    if record["schema"] != SCHEMA and record["schema"] not in COMPATIBLE_SCHEMAS:
        raise ReportError(f"unsupported record schema {record['schema']!r} (expected {SCHEMA!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise ReportError(f"record is missing required key(s): {', '.join(missing)}")

    if not isinstance(record["created"], str) or not record["created"]:
        raise ReportError("record['created'] must be a non-empty ISO-8601 string")
    if "seed" in record and record["seed"] is not None and not isinstance(record["seed"], int):
        raise ReportError(f"record['seed'] must be an integer or null, got {record['seed']!r}")
    for key in ("machine", "model"):
        if not isinstance(record[key], Mapping):
            raise ReportError(f"record[{key!r}] must be an object, got {type(record[key]).__name__}")
    if "config" in record and not isinstance(record["config"], Mapping):
        raise ReportError(f"record['config'] must be an object, got {type(record['config']).__name__}")
    if not isinstance(record["model"].get("name"), str) or not record["model"]["name"]:
        raise ReportError("record['model']['name'] must be a non-empty string")

    variants = record["variants"]
    if not isinstance(variants, list) or not variants:
        raise ReportError("record['variants'] must be a non-empty list (the baseline comes first)")
    names: list[str] = []
    for i, variant in enumerate(variants):
        where = f"record['variants'][{i}]"
        if not isinstance(variant, Mapping):
            raise ReportError(f"{where} must be an object")
        for key in ("name", "method", "params"):
            if key not in variant:
                raise ReportError(f"{where} is missing {key!r}")
        name = variant["name"]
        if not isinstance(name, str) or not name:
            raise ReportError(f"{where}['name'] must be a non-empty string")
        if name in names:
            raise ReportError(f"variant name {name!r} appears twice in record['variants']")
        names.append(name)
        if variant["method"] is not None and not isinstance(variant["method"], str):
            raise ReportError(f"{where}['method'] must be a string or null")
        kind = variant.get("kind", "baseline" if variant["method"] is None else "patch")
        if kind not in _KINDS:
            raise ReportError(f"{where}['kind'] must be one of {', '.join(_KINDS)}, got {kind!r}")
        if (kind == "baseline") != (i == 0):
            raise ReportError(f"{where}: the baseline, and only the baseline, comes first")
        if not isinstance(variant["params"], Mapping):
            raise ReportError(f"{where}['params'] must be an object")
    if variants[0]["method"] is not None:
        raise ReportError(
            f"the first variant must be the unpatched baseline (method null), got method {variants[0]['method']!r}"
        )
    known = set(names)
    for key in ("workload", "tokens"):
        if key in record and not isinstance(record[key], Mapping):
            raise ReportError(f"record[{key!r}] must be an object, got {type(record[key]).__name__}")
    for vname, cell in (record.get("tokens") or {}).items():
        if vname not in known:
            raise ReportError(f"record['tokens'] has unknown variant {vname!r}")
        if not isinstance(cell, Mapping) or not all(v is None or _is_number(v) for v in cell.values()):
            raise ReportError(f"record['tokens'][{vname!r}] must be an object of numbers")

    _check_variant_stats(record, "latency", known, "metrics")
    _check_variant_stats(record, "speedup", known, "ratios")

    quality = record["quality"]
    if not isinstance(quality, Mapping):
        raise ReportError("record['quality'] must be an object (possibly empty)")
    for task, entry in quality.items():
        where = f"record['quality'][{task!r}]"
        if not isinstance(entry, Mapping):
            raise ReportError(f"{where} must be an object")
        for key in ("primary", "higher_is_better", "variants"):
            if key not in entry:
                raise ReportError(f"{where} is missing {key!r}")
        if not isinstance(entry["primary"], str) or not entry["primary"]:
            raise ReportError(f"{where}['primary'] must be a metric name")
        if not isinstance(entry["higher_is_better"], bool):
            raise ReportError(f"{where}['higher_is_better'] must be true or false")
        n_examples = entry.get("n_examples")
        if n_examples is not None and (not isinstance(n_examples, int) or isinstance(n_examples, bool)):
            raise ReportError(f"{where}['n_examples'] must be an integer")
        if not isinstance(entry["variants"], Mapping):
            raise ReportError(f"{where}['variants'] must be an object of variant -> metrics")
        if "section" in entry and not isinstance(entry["section"], str):
            raise ReportError(f"{where}['section'] must be a section name")
        for key in ("compare", "extra"):
            if key in entry and not isinstance(entry[key], Mapping):
                raise ReportError(f"{where}[{key!r}] must be an object")
        for vname in entry.get("compare", {}):
            if vname not in known:
                raise ReportError(f"{where}['compare'] has unknown variant {vname!r}")
        for vname, metrics in entry["variants"].items():
            if vname not in known:
                raise ReportError(f"{where}['variants'] has unknown variant {vname!r}")
            if not isinstance(metrics, Mapping):
                raise ReportError(f"{where}['variants'][{vname!r}] must be an object of metrics")
            for metric, value in metrics.items():
                if value is not None and not _is_number(value):
                    raise ReportError(
                        f"{where}['variants'][{vname!r}][{metric!r}] must be a number or null, got {value!r}"
                    )


def load_record(path_or_dir: str | os.PathLike[str]) -> dict:
    """Read and validate a record from ``report.json``.

    Parameters
    ----------
    path_or_dir : str or path-like
        A ``report.json`` file, or a folder holding one.

    Returns
    -------
    dict
        The validated record, as stored.

    Raises
    ------
    ReportError
        (a ``ValueError``) when the file is missing, unreadable, not valid JSON (e.g. truncated)
        or does not follow the schema.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / JSON_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"no report record at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read report record {str(path)!r}: {exc}") from exc
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"report record {str(path)!r} is not valid JSON (corrupt or truncated?): {exc}"
        ) from exc
    try:
        validate_record(record)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from exc
    return record


def _normalized(record: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy in the current schema's shape (older records gain kinds and a workload)."""
    validate_record(record)
    rec = copy.deepcopy(dict(record))
    for v in rec["variants"]:
        v.setdefault("kind", "baseline" if v["method"] is None else "patch")
    rec.setdefault("tokens", {})
    if "workload" not in rec:
        encode = any("encode_s" in m for m in rec["latency"].values())
        rec["workload"] = {
            "name": "encode" if encode else "generate",
            "primary": "encode" if encode else "e2e",
            "reference": rec["variants"][0]["name"],
        }
    rec["workload"].setdefault("reference", rec["variants"][0]["name"])
    rec["workload"].setdefault("primary", "e2e")
    return rec


# --------------------------------------------------------------------------------------------
# renderer registry: sections and plots that tasks and workloads bring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A table block: ``headers``, ``rows`` of cell strings, the first ``text_cols`` columns left-aligned."""

    headers: list[str]
    rows: list[list[str]]
    text_cols: int = 1
    title: str = ""
    note: str = ""


@dataclass(frozen=True)
class Text:
    """A paragraph (``strong`` for a warning the reader must not miss)."""

    text: str
    strong: bool = False


@dataclass(frozen=True)
class Pre:
    """Verbatim text (e.g. a prompt before and after compression), with a title line."""

    text: str
    title: str = ""


@dataclass(frozen=True)
class Image:
    """A picture inside a section: PNG ``data`` written as ``filename`` beside the report (Markdown
    shows it from there), embedded in the HTML page; ``caption`` under it in both."""

    data: bytes
    filename: str
    caption: str = ""

    def __post_init__(self) -> None:
        name = self.filename
        if not name.endswith(".png") or Path(name).name != name or name in _RESERVED_NAMES:
            raise ValueError(f"an Image's filename is a plain, unreserved *.png name, got {name!r}")


Block = Table | Text | Pre | Image
SectionFn = Callable[[Mapping[str, Any], str, Mapping[str, Any]], list[Block]]
PlotFn = Callable[[Mapping[str, Any]], "bytes | None"]

_SECTIONS: dict[str, SectionFn] = {}
_PLOTS: dict[str, PlotFn] = {}
#: Modules that register sections or plots; imported by :func:`load_renderers`.
RENDERER_MODULES: list[str] = [
    "tokenlean.eval.prompt_tasks",
    "tokenlean.eval.fact_tasks",
    "tokenlean.eval.workloads",
    "tokenlean.eval.vision",
    "tokenlean.eval.vqa",
]


def register_section(name: str) -> Callable[[SectionFn], SectionFn]:
    """Register ``fn(record, key, entry) -> [Table | Text | Pre, ...]`` for quality entries of section ``name``."""

    def decorator(fn: SectionFn) -> SectionFn:
        _SECTIONS[name] = fn
        return fn

    return decorator


def register_plot(filename: str) -> Callable[[PlotFn], PlotFn]:
    """Register ``fn(record) -> PNG bytes or None`` (None when the record holds nothing to plot)."""
    if not filename.endswith(".png"):
        raise ValueError(f"a plot file name ends in .png, got {filename!r}")

    def decorator(fn: PlotFn) -> PlotFn:
        _PLOTS[filename] = fn
        return fn

    return decorator


def load_renderers() -> None:
    """Import the modules that register sections and plots (idempotent)."""
    for module in RENDERER_MODULES:
        importlib.import_module(module)


# --------------------------------------------------------------------------------------------
# number formatting and derived values
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return _is_number(x) and math.isfinite(x)


def fmt(x: Any) -> str:
    """Format a number with 3-4 significant digits; ints keep all digits; None/NaN -> dash."""
    if x is None:
        return _DASH
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if not _is_number(x):
        return str(x)
    if math.isnan(x):
        return _DASH
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    if abs(x) >= 1e-3:
        return f"{x:.4g}"
    return f"{x:.3g}"


def _latency_unit(metric: str, median: float) -> tuple[float, str]:
    """Scale and unit for one latency cell."""
    kind = LATENCY_METRICS.get(metric, (metric, "s" if metric.endswith("_s") else ""))[1]
    if metric.endswith("_per_s"):
        kind = "rate"
    if kind == "s":
        return (1e3, "ms") if _finite(median) and abs(median) < 1 else (1.0, "s")
    if kind == "rate":
        return 1.0, "sent/s" if metric == "sentences_per_s" else "tok/s"
    if metric.endswith("_mb"):
        return 1.0, "MB"
    if kind == "mb":
        return 1.0, "MB"
    return 1.0, ""


def _fmt_latency(metric: str, stats: Mapping[str, Any] | None) -> str:
    if not stats or not _finite(stats.get("median")):
        return _DASH
    scale, unit = _latency_unit(metric, stats["median"])
    text = f"{fmt(stats['median'] * scale)} {unit}".rstrip()
    p25, p75 = stats.get("p25"), stats.get("p75")
    if _finite(p25) and _finite(p75):
        text += f" [{fmt(p25 * scale)}–{fmt(p75 * scale)}]"
    return text


def _fmt_speedup(stats: Mapping[str, Any] | None) -> str:
    if not stats or not _finite(stats.get("median")):
        return _DASH
    text = f"{stats['median']:.2f}×"
    p25, p75 = stats.get("p25"), stats.get("p75")
    if _finite(p25) and _finite(p75):
        text += f" [{p25:.2f}–{p75:.2f}]"
    return text


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """``x`` (already in percent) as ``"12.3%"``; None/NaN -> dash."""
    return _DASH if x is None or not _finite(x) else f"{x:.{digits}f}%"


def fmt_accuracy_diff(diff: Mapping[str, Any] | None) -> str:
    """A paired accuracy difference ``accuracy_diff`` [``_low``, ``_high``] in points, signed; dash without one."""
    if not diff or diff.get("accuracy_diff") is None:
        return _DASH
    return (
        f"{100 * diff['accuracy_diff']:+.1f} [{100 * diff['accuracy_diff_low']:+.1f}, "
        f"{100 * diff['accuracy_diff_high']:+.1f}]"
    )


def _fmt_params(params: Mapping[str, Any]) -> str:
    if not params:
        return _DASH
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _baseline_name(record: Mapping[str, Any]) -> str:
    return record["variants"][0]["name"]


def _variant_names(record: Mapping[str, Any]) -> list[str]:
    return [v["name"] for v in record["variants"]]


def _variant(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return next(v for v in record["variants"] if v["name"] == name)


def variant_label(record: Mapping[str, Any], name: str) -> str:
    """A variant's display name: its name, with ``(peer: <library>)`` for peer implementations."""
    variant = next((v for v in record["variants"] if v["name"] == name), None)
    peer = variant.get("peer") if variant else None
    return f"{name} (peer: {peer})" if peer else name


def kept(entry: Mapping[str, Any], baseline: str, variant: str) -> float | None:
    """Primary metric of ``variant`` relative to ``baseline``, in percent (None if undefined)."""
    rows = entry["variants"]
    primary = entry["primary"]
    base = rows.get(baseline, {}).get(primary)
    value = rows.get(variant, {}).get(primary)
    if not (_finite(base) and _finite(value)):
        return None
    if value == base:
        return 100.0
    num, den = (value, base) if entry["higher_is_better"] else (base, value)
    if den == 0:
        return None
    return 100.0 * num / den


def _ordered_keys(section: Mapping[str, Mapping[str, Any]], known_order: Sequence[str]) -> list[str]:
    """Keys used by any variant of ``section``: the known ones in their order, then the others as met."""
    present: list[str] = []
    for entries in section.values():
        for key in entries:
            if key not in present:
                present.append(key)
    order = list(dict.fromkeys(known_order))
    return [k for k in order if k in present] + [k for k in present if k not in order]


def _latency_metrics(record: Mapping[str, Any]) -> list[str]:
    known = list((record.get("workload") or {}).get("metrics") or {}) or list(LATENCY_METRICS)
    return _ordered_keys(record["latency"], known + list(LATENCY_METRICS))


def _speedup_keys(record: Mapping[str, Any]) -> list[str]:
    known = list((record.get("workload") or {}).get("speedups") or {}) or list(SPEEDUP_KEYS)
    return _ordered_keys(record["speedup"], known + list(SPEEDUP_KEYS))


def _task_metrics(entry: Mapping[str, Any]) -> list[str]:
    metrics = [entry["primary"]]
    for row in entry["variants"].values():
        for metric in row:
            if metric not in metrics:
                metrics.append(metric)
    return metrics


def _direction(entry: Mapping[str, Any]) -> str:
    return "↑" if entry["higher_is_better"] else "↓"


def _title(record: Mapping[str, Any]) -> str:
    created = record["created"]
    try:
        date = datetime.fromisoformat(created.replace("Z", "+00:00")).date().isoformat()
    except ValueError:
        date = created
    return f"tokenlean report: {record['model']['name']} ({date})"


def _workload_name(record: Mapping[str, Any]) -> str:
    return str((record.get("workload") or {}).get("name") or "generate")


def _reference_name(record: Mapping[str, Any]) -> str:
    return str((record.get("workload") or {}).get("reference") or _baseline_name(record))


def _primary_speedup(record: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The variant's speedup on the workload's primary key (``e2e`` for generation)."""
    ratios = record["speedup"].get(name, {})
    primary = (record.get("workload") or {}).get("primary")
    for key in (primary, "e2e", "encode", "compress"):
        if key and key in ratios:
            return ratios[key]
    return None


def _first_kept(record: Mapping[str, Any], name: str) -> tuple[str, float] | None:
    """``(task, kept %)`` of the first quality task that measured the variant against the baseline."""
    baseline = _baseline_name(record)
    for task, entry in record["quality"].items():
        value = kept(entry, baseline, name)
        if value is not None and name in entry["variants"]:
            return task, value
    return None


# --------------------------------------------------------------------------------------------
# the sections every report has
# --------------------------------------------------------------------------------------------


def _headline(record: Mapping[str, Any]) -> list[Block]:
    """One line per variant: speed ×, memory ×, quality kept, tokens saved."""
    baseline = _baseline_name(record)
    workload = _workload_name(record)
    against = _reference_label(record)
    speed_title = "speed ×"
    if record["latency"]:
        speed_title += f" ({workload}" + (f", vs {against})" if against != baseline else ")")
    headers = ["variant", "kind", speed_title, "memory ×", "quality kept", "tokens saved"]
    references = _references(record)
    rows = []
    for variant in record["variants"]:
        name, kind = variant["name"], variant.get("kind", "patch")
        is_reference = name in record["latency"] and references.get(name) is None
        speed = "1.00×" if is_reference else _fmt_speedup(_primary_speedup(record, name))
        memory = record["speedup"].get(name, {}).get("peak_memory")
        mem = "1.00×" if is_reference else _fmt_speedup(memory)
        if name == baseline:
            quality = "100% (reference)" if record["quality"] else _DASH
        else:
            first = _first_kept(record, name)
            quality = f"{fmt_pct(first[1])} ({first[0]})" if first else _DASH
        saved = _tokens_saved(record, name)
        rows.append([variant_label(record, name), kind, speed, mem, quality, saved])
    notes = []
    if record["latency"]:
        notes.append(
            f"speed ×: median [p25–p75] of {against}/variant time per paired, interleaved round "
            f"of the {workload} workload (> 1× is faster); memory ×: the same for peak memory."
        )
    if record["quality"]:
        notes.append(
            "quality kept: the variant's primary metric relative to the baseline's, on the first task "
            "that measured it (sections below)."
        )
    if record.get("tokens"):
        notes.append(
            "tokens saved: share of the prompt tokens (cl100k) the compressor removed, over all its "
            "compress calls in this run."
        )
    return [Table(headers, rows, text_cols=2, note=" ".join(notes))]


def _tokens_saved(record: Mapping[str, Any], name: str) -> str:
    """The share of prompt tokens a variant saved: its pooled compress calls, else the first lm-eval task's."""
    tokens = (record.get("tokens") or {}).get(name)
    if tokens and _finite(tokens.get("saved")):
        return f"{100 * tokens['saved']:.1f}%"
    if _variant(record, name).get("kind") == "compressor":
        for task, entry in record["quality"].items():
            value = entry["variants"].get(name, {}).get("tokens_saved")
            if _finite(value):
                return f"{100 * value:.1f}% ({task})"
    return _DASH


def _tokens_section(record: Mapping[str, Any]) -> list[Block]:
    tokens = record.get("tokens") or {}
    if not tokens:
        return []
    headers = ["variant", "requested rate", "achieved (mean)", "min", "max", "mean |error| (pp)",
               "within ±2 pp (inputs ≥ 200 tokens)", "calls", "tokens in", "tokens out", "saved",
               "compress time"]  # fmt: skip
    rows = []
    for name in _variant_names(record):
        cell = tokens.get(name)
        if not cell:
            continue
        within = cell.get("within_2pp")
        within_text = (
            _DASH if not _finite(within) else f"{100 * within:.0f}% of {cell.get('calls_200plus', 0)}"
        )
        rows.append(
            [
                variant_label(record, name),
                fmt(cell.get("requested")),
                f"{cell['achieved_mean']:.3f}" if _finite(cell.get("achieved_mean")) else _DASH,
                f"{cell['achieved_min']:.3f}" if _finite(cell.get("achieved_min")) else _DASH,
                f"{cell['achieved_max']:.3f}" if _finite(cell.get("achieved_max")) else _DASH,
                f"{cell['mean_abs_error_pp']:.2f}" if _finite(cell.get("mean_abs_error_pp")) else _DASH,
                within_text,
                fmt(cell.get("calls")),
                fmt(cell.get("origin_tokens")),
                fmt(cell.get("compressed_tokens")),
                f"{100 * cell['saved']:.1f}%" if _finite(cell.get("saved")) else _DASH,
                f"{fmt(cell.get('compress_s'))} s",
            ]
        )
    note = (
        "Every compress call of the run (task inputs and workload prompts), counted in cl100k tokens: "
        "achieved rate = compressed / original tokens per call; saved = 1 − Σ compressed / Σ original."
    )
    return [Table(headers, rows, text_cols=1, note=note)]


def _latency_section(record: Mapping[str, Any]) -> list[Block]:
    if not record["latency"]:
        return [Text("Latency was not measured in this run.")]
    return [
        Table(*_timings_table(record), text_cols=2),
        Table(*_speedups_table(record), text_cols=2, title="Speedups", note=_latency_note(record)),
        Table(*_latency_detail_table(record), text_cols=2, title="Every metric"),
    ]


def _reference_label(record: Mapping[str, Any]) -> str:
    """What speedups are against: one variant, or a compressor spec at each variant's rate."""
    refs = {r for r in _references(record).values() if r is not None}
    if len(refs) == 1:
        return next(iter(refs))
    spec = ((record.get("workload") or {}).get("extra") or {}).get("reference")
    return f"{spec} at the same rate" if spec else _reference_name(record)


def _references(record: Mapping[str, Any]) -> dict[str, str | None]:
    workload = record.get("workload") or {}
    refs = workload.get("references")
    if isinstance(refs, Mapping):
        return dict(refs)
    reference = _reference_name(record)
    return {name: (reference if name != reference else None) for name in _variant_names(record)}


def _timed(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The variants the workload timed, in record order."""
    return [v for v in record["variants"] if record["latency"].get(v["name"])]


def _timings_table(record: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per timed variant: its params and the median [p25–p75] of every latency metric."""
    metrics = _latency_metrics(record)
    headers = ["variant", "params"]
    for metric in metrics:
        title, kind = LATENCY_METRICS.get(metric, (metric, ""))
        rate = "sentences/s" if metric == "sentences_per_s" else "tok/s"
        headers.append(f"{title} ({rate})" if kind == "rate" or metric.endswith("_per_s") else title)
    rows = []
    for variant in _timed(record):
        lat = record["latency"][variant["name"]]
        row = [variant_label(record, variant["name"]), _fmt_params(variant["params"])]
        rows.append(row + [_fmt_latency(metric, lat.get(metric)) for metric in metrics])
    return headers, rows


def _speedups_table(record: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per timed variant: its reference and every speedup against it (1.00× for a reference)."""
    references = _references(record)
    speedups = _speedup_keys(record)
    headers = ["variant", "reference", *(f"{SPEEDUP_KEYS.get(key, key)} ×" for key in speedups)]
    rows = []
    for variant in _timed(record):
        name = variant["name"]
        reference = references.get(name)
        if reference is None:
            cells = ["1.00×"] * len(speedups)
        else:
            ratios = record["speedup"].get(name, {})
            cells = [_fmt_speedup(ratios.get(key)) for key in speedups]
        rows.append([variant_label(record, name), reference or _DASH, *cells])
    return headers, rows


def _latency_note(record: Mapping[str, Any]) -> str:
    workload = record.get("workload") or {}
    parts = [
        f"Workload `{_workload_name(record)}`"
        + (f" ({_fmt_params(workload['options'])})" if workload.get("options") else "")
        + ". Latency cells are `median [p25–p75]` over the timed rounds; seconds below 1 s in ms, "
        "memory in MB.",
        f"× columns: `median× [p25–p75]` of reference/variant ratios ({_reference_label(record)}) from paired, "
        "interleaved rounds (rotating order); above 1× the variant is faster or uses less memory.",
    ]
    if workload.get("note"):
        parts.append(str(workload["note"]))
    return " ".join(parts)


def _latency_detail_table(record: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "metric", "median", "IQR [p25–p75]", "min", "max", "n"]
    rows = []
    for name in _variant_names(record):
        metrics = record["latency"].get(name)
        if not metrics:
            continue
        ordered = [m for m in _latency_metrics(record) if m in metrics]
        for metric in ordered:
            stats = metrics[metric]
            scale, unit = _latency_unit(metric, stats["median"])
            suffix = f" {unit}" if unit else ""

            def cell(key: str, stats: Mapping[str, Any] = stats, scale: float = scale) -> str:
                value = stats.get(key)
                return fmt(value * scale) if _finite(value) else _DASH

            iqr = f"[{cell('p25')}–{cell('p75')}]{suffix}"
            rows.append(
                [
                    name,
                    metric,
                    f"{cell('median')}{suffix}",
                    iqr,
                    f"{cell('min')}{suffix}" if "min" in stats else _DASH,
                    f"{cell('max')}{suffix}" if "max" in stats else _DASH,
                    fmt(stats.get("n")),
                ]
            )
    return headers, rows


def _quality_table(record: Mapping[str, Any], task: str) -> tuple[list[str], list[list[str]]]:
    entry = record["quality"][task]
    baseline = _baseline_name(record)
    metrics = _task_metrics(entry)
    headers = (
        ["variant"] + [f"{m} {_direction(entry)}" if m == entry["primary"] else m for m in metrics] + ["kept"]
    )
    rows = []
    for name in _variant_names(record):
        if name not in entry["variants"]:
            continue
        values = entry["variants"][name]
        rows.append(
            [variant_label(record, name)]
            + [fmt(values.get(m)) for m in metrics]
            + [fmt_pct(kept(entry, baseline, name))]
        )
    return headers, rows


def _task_caption(entry: Mapping[str, Any]) -> str:
    better = "higher" if entry["higher_is_better"] else "lower"
    text = f"primary metric: {entry['primary']} ({better} is better)"
    if entry.get("n_examples") is not None:
        text += f"; examples: {fmt(entry['n_examples'])}"
    return text


def _generic_quality(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list[Block]:
    headers, rows = _quality_table(record, key)
    if not rows:
        return [Text(_task_caption(entry) + "."), Text("No results.")]
    return [Text(_task_caption(entry) + "."), Table(headers, rows)]


def _quality_blocks(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list[Block]:
    section = entry.get("section") or ""
    fn = _SECTIONS.get(section)
    return fn(record, key, entry) if fn is not None else _generic_quality(record, key, entry)


def _model_rows(record: Mapping[str, Any]) -> list[list[str]]:
    return [
        [str(k), fmt(v) if _is_number(v) else (_DASH if v is None else str(v))]
        for k, v in record["model"].items()
    ]


def _machine_rows(record: Mapping[str, Any]) -> list[list[str]]:
    rows = [[str(k), _DASH if v is None else str(v)] for k, v in record["machine"].items()]
    rows.append(["created", record["created"]])
    if "seed" in record:
        rows.append(["seed", _DASH if record["seed"] is None else str(record["seed"])])
    return rows


def _config_rows(record: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, value in (record.get("config") or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        rows.append([str(key), text])
    return rows


def _variant_rows(record: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for v in record["variants"]:
        what = v["method"] if v["method"] is not None else "(none: unpatched model, prompts as given)"
        rows.append(
            [
                v["name"],
                v.get("kind", "patch"),
                what,
                json.dumps(v["params"], default=str, ensure_ascii=False, sort_keys=True),
                v.get("peer") or _DASH,
            ]
        )
    return rows


def _sections(record: Mapping[str, Any]) -> list[tuple[str, list[Block]]]:
    """Every section of the report after the headline, in order: (title, blocks)."""
    out: list[tuple[str, list[Block]]] = []
    for key, entry in record["quality"].items():
        out.append((f"Quality: {key}", _quality_blocks(record, key, entry)))
    tokens = _tokens_section(record)
    if tokens:
        out.append(("Tokens saved and rate honoured", tokens))
    out.append(("Latency", _latency_section(record)))
    workload = record.get("workload") or {}
    fn = _SECTIONS.get(f"workload:{workload.get('name')}")
    if fn is not None:
        blocks = fn(record, str(workload.get("name")), workload)
        if blocks:
            out.append((f"Workload: {workload.get('name')}", blocks))
    variants_table = Table(
        ["variant", "kind", "method", "params", "peer"], _variant_rows(record), text_cols=5
    )
    out.append(("Variants", [variants_table]))
    config = _config_rows(record)
    if config:
        out.append(("Bench settings", [Table(["setting", "value"], config, text_cols=2)]))
    out.append(("Model", [Table(["key", "value"], _model_rows(record), text_cols=2)]))
    out.append(("Machine and libraries", [Table(["key", "value"], _machine_rows(record), text_cols=2)]))
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
    """A GitHub-flavoured Markdown table; the first ``text_cols`` columns left-aligned, the rest right."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" if i < text_cols else "--:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_line(record: Mapping[str, Any], code: Any, esc: Any) -> str:
    """ "Model `name` (class, dtype, device), N parameters; created ...; seed S" in a markup's terms."""
    model = record["model"]
    line = f"Model {code(str(model['name']))}"
    extras = [str(model[k]) for k in ("class", "dtype", "device") if model.get(k)]
    if extras:
        line += f" ({esc(', '.join(extras))})"
    if _is_number(model.get("num_parameters")):
        line += f", {esc(fmt(model['num_parameters']))} parameters"
    line += f"; created {esc(str(record['created']))}"
    if record.get("seed") is not None:
        line += f"; seed {esc(str(record['seed']))}"
    return line


def _md_blocks(blocks: Sequence[Block]) -> list[str]:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            if block.title:
                out += [f"### {block.title}", ""]
            out += [
                md_table(block.headers, block.rows, block.text_cols) if block.rows else "_no results_",
                "",
            ]
            if block.note:
                out += [f"_{block.note}_", ""]
        elif isinstance(block, Text):
            out += [f"**{block.text}**" if block.strong else block.text, ""]
        elif isinstance(block, Image):
            out += [f"![{_plot_caption(block.filename)}]({block.filename})", ""]
            if block.caption:
                out += [f"_{block.caption}_", ""]
        else:
            if block.title:
                out += [f"{block.title}:", ""]
            out += ["```", block.text, "```", ""]
    return out


def render_markdown(record: dict) -> str:
    """Render a record as a Markdown report.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/2`` (or ``/1``) record.

    Returns
    -------
    str
        Markdown: the headline table (one line per variant: speed, memory, quality kept, tokens
        saved), then one section per quality task, tokens saved, latency, variants, settings,
        model, and machine/library versions last.
    """
    rec = _normalized(record)
    load_renderers()
    out = [f"# {_title(rec)}", ""]
    out += [_model_line(rec, code=lambda text: f"`{text}`", esc=str) + ".", ""]
    out += ["## Summary", ""] + _md_blocks(_headline(rec))
    for title, blocks in _sections(rec):
        out += [f"## {title}", ""] + _md_blocks(blocks)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin-top: 1.2rem; }
p.meta, p.note, p.caption { color: #555; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border: 1px solid #d8d8d8; padding: .3rem .55rem; vertical-align: top; }
th { background: #f3f4f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #e5e5e5; }
figcaption { color: #555; font-size: .85rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .8rem; white-space: pre-wrap; }
code { background: #f3f4f6; padding: 0 .2rem; }
"""


def html_table(headers: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
    """An HTML table; the first ``text_cols`` columns are text, the rest right-aligned numbers."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{esc(c)}</td>" if i < text_cols else f'<td class="num">{esc(c)}</td>'
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_blocks(blocks: Sequence[Block]) -> list[str]:
    esc = html.escape
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            if block.title:
                out.append(f"<h3>{esc(block.title)}</h3>")
            out.append(
                html_table(block.headers, block.rows, block.text_cols)
                if block.rows
                else '<p class="note">No results.</p>'
            )
            if block.note:
                out.append(f'<p class="note">{esc(block.note.replace("`", ""))}</p>')
        elif isinstance(block, Text):
            text = esc(block.text.replace("`", ""))
            out.append(
                f"<p><strong>{text}</strong></p>" if block.strong else f'<p class="caption">{text}</p>'
            )
        elif isinstance(block, Image):
            uri = "data:image/png;base64," + base64.b64encode(block.data).decode("ascii")
            caption = esc((block.caption or _plot_caption(block.filename)).replace("`", ""))
            out.append(
                f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
            )
        else:
            if block.title:
                out.append(f"<p>{esc(block.title)}:</p>")
            out.append(f"<pre>{esc(block.text)}</pre>")
    return out


def _plot_caption(key: str) -> str:
    stem = key[:-4] if key.endswith(".png") else key
    return stem.replace("_", " ")


def _figure(key: str, data: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    caption = html.escape(_plot_caption(key))
    return f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def render_html(record: dict, plots: dict[str, bytes]) -> str:
    """Render a record as one self-contained HTML page.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/2`` (or ``/1``) record.
    plots : dict of str to bytes
        PNG images to embed, keyed by file name (used as caption and alt text); entries whose
        value is ``None`` or empty are left out. The speedup-against-quality plot goes under the
        headline table, the others after the sections they illustrate.

    Returns
    -------
    str
        An HTML document with inline CSS and the plots as base64 ``data:`` URIs; it loads
        nothing from the network. Every string taken from the record is HTML-escaped.
    """
    rec = _normalized(record)
    load_renderers()
    esc = html.escape
    title = _title(rec)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    meta = _model_line(rec, code=lambda text: f"<code>{esc(text)}</code>", esc=esc)
    parts.append(f'<p class="meta">{meta}.</p>')
    parts.append("<h2>Summary</h2>")
    parts += _html_blocks(_headline(rec))
    shown = {key: data for key, data in (plots or {}).items() if data}
    if SPEEDUP_PLOT_NAME in shown:
        parts.append(_figure(SPEEDUP_PLOT_NAME, shown.pop(SPEEDUP_PLOT_NAME)))
    for title_text, blocks in _sections(rec):
        if title_text == "Variants" and shown:  # the remaining plots, before the reference tables
            parts.append("<h2>Plots</h2>")
            parts += [_figure(key, data) for key, data in shown.items()]
            shown = {}
        parts.append(f"<h2>{esc(title_text)}</h2>")
        parts += _html_blocks(blocks)
    raw = json.dumps(record, indent=2, default=str, ensure_ascii=False)
    parts.append(f"<details><summary>Raw record (JSON)</summary><pre>{esc(raw)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    # A bare Figure renders through the Agg canvas on savefig without touching pyplot or the
    # global backend, and is freed with the object (nothing registered to close).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def variant_colors(record: Mapping[str, Any]) -> dict[str, str]:
    """One colour per variant, the same in every plot."""
    return {name: f"C{i % 10}" for i, name in enumerate(_variant_names(record))}


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def plot_speedup_vs_quality(record: dict) -> bytes | None:
    """Plot the workload's speedup against quality kept, one labelled marker per variant.

    x is the variant's median speedup on the workload's primary key (e2e for generation, encode
    for encoding, compress time against the reference for compression; error bars p25–p75), y
    its quality kept (%) on the first task that measured it; dashed lines mark 1.0× and 100 %.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/2`` (or ``/1``) record.

    Returns
    -------
    bytes or None
        PNG bytes, or None when no variant has both a speedup and a kept value.
    """
    rec = _normalized(record)
    reference = _reference_name(rec)
    points = []  # (name, x, x_lo, x_hi, y, task)
    for name in _variant_names(rec):
        if name == reference:
            continue
        stats = _primary_speedup(rec, name)
        first = _first_kept(rec, name)
        if not stats or not _finite(stats.get("median")) or first is None:
            continue
        x = stats["median"]
        lo = x - stats["p25"] if _finite(stats.get("p25")) else 0.0
        hi = stats["p75"] - x if _finite(stats.get("p75")) else 0.0
        points.append((name, x, max(lo, 0.0), max(hi, 0.0), first[1], first[0]))
    if not points:
        return None

    fig = new_figure(7.0, 4.8)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="0.45", linestyle="--", linewidth=1, zorder=1)
    ax.axhline(100.0, color="0.45", linestyle="--", linewidth=1, zorder=1)
    colors = variant_colors(rec)
    ax.scatter([1.0], [100.0], marker="s", s=60, color=colors[reference], zorder=3)
    ax.annotate(reference, (1.0, 100.0), xytext=(6, 6), textcoords="offset points", fontsize=9)
    for name, x, lo, hi, y, task in points:
        ax.errorbar(
            [x], [y], xerr=[[lo], [hi]], fmt="o", markersize=7, capsize=4, color=colors[name], zorder=3
        )
        ax.annotate(f"{name}\n({task})", (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8)
    xs = [1.0] + [p[1] - p[2] for p in points] + [p[1] + p[3] for p in points]
    ys = [100.0] + [p[4] for p in points]
    xpad = max(0.05, 0.18 * (max(xs) - min(xs)))  # room for the labels
    ypad = max(1.0, 0.12 * (max(ys) - min(ys)))
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    workload = _workload_name(rec)
    against = "" if reference == _baseline_name(rec) else f" vs {reference}"
    ax.set_xlabel(f"speedup{against}, {workload} workload (×, median, bars p25–p75)")
    ax.set_ylabel("quality kept vs baseline (%), first task measured")
    ax.set_title(f"{rec['model']['name']}: speed against quality")
    ax.grid(True, alpha=0.3)
    return png_bytes(fig)


def _bar_series(
    record: Mapping[str, Any], metric: str, scale: float
) -> list[tuple[float, float, float] | None]:
    out: list[tuple[float, float, float] | None] = []
    for name in [n for n in _variant_names(record) if n in record["latency"]]:
        stats = record["latency"].get(name, {}).get(metric)
        if not stats or not _finite(stats.get("median")):
            out.append(None)
            continue
        m = stats["median"] * scale
        lo = m - stats["p25"] * scale if _finite(stats.get("p25")) else 0.0
        hi = stats["p75"] * scale - m if _finite(stats.get("p75")) else 0.0
        out.append((m, max(lo, 0.0), max(hi, 0.0)))
    return out


def plot_latency(record: dict) -> bytes | None:
    """Plot median latencies per variant, with IQR error bars.

    Left panel: grouped bars of the workload's times in ms (compress, prefill, TTFT, e2e,
    encode; one bar per variant in each group); right panel: decode throughput in tokens/s. A
    panel without data is left out; variants the workload did not time are not drawn.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/2`` (or ``/1``) record.

    Returns
    -------
    bytes or None
        PNG bytes, or None when the record holds none of these latency metrics.
    """
    record = _normalized(record)
    if not record["latency"]:
        return None
    names = [n for n in _variant_names(record) if n in record["latency"]]
    time_metrics = [
        m
        for m in ("compress_s", "encoder_s", "around_encoder_s", "prefill_s", "ttft_s", "e2e_s", "encode_s")
        if any(s is not None for s in _bar_series(record, m, 1e3))
    ]
    decode = _bar_series(record, "decode_tokens_per_s", 1.0)
    has_decode = any(s is not None for s in decode)
    if not time_metrics and not has_decode:
        return None

    panels = int(bool(time_metrics)) + int(has_decode)
    ratios = [max(2, len(time_metrics)), 1][:panels] if time_metrics else [1]
    fig = new_figure(4.0 + 2.2 * len(time_metrics) + (3.0 if has_decode else 0.0), 4.6)
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    colors = variant_colors(record)

    if time_metrics:
        ax = axes[0]
        width = 0.8 / len(names)
        all_values = []
        for i, name in enumerate(names):
            xs, ms, errs = [], [], [[], []]
            for j, metric in enumerate(time_metrics):
                s = _bar_series(record, metric, 1e3)[i]
                if s is None:
                    continue
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ms.append(s[0])
                errs[0].append(s[1])
                errs[1].append(s[2])
            if not xs:
                continue
            all_values += ms
            bars = ax.bar(xs, ms, width * 0.92, yerr=errs, capsize=3, color=colors[name], label=name)
            ax.bar_label(bars, labels=[fmt(m) for m in ms], fontsize=7, padding=2)
        positive = [v for v in all_values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(time_metrics)))
        ax.set_xticklabels([LATENCY_METRICS[m][0] for m in time_metrics])
        log = " (log scale)" if ax.get_yscale() == "log" else ""
        ax.set_ylabel(f"median time (ms){log}, bars p25–p75")
        ax.set_title("latency (lower is better)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)

    if has_decode:
        ax = axes[-1]
        xs = [i for i, s in enumerate(decode) if s is not None]
        ms = [decode[i][0] for i in xs]  # type: ignore[index]
        errs = [[decode[i][1] for i in xs], [decode[i][2] for i in xs]]  # type: ignore[index]
        bars = ax.bar(xs, ms, 0.6, yerr=errs, capsize=3, color=[colors[names[i]] for i in xs])
        ax.bar_label(bars, labels=[fmt(m) for m in ms], fontsize=7, padding=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([names[i] for i in xs], rotation=20, ha="right")
        ax.set_ylabel("median decode tokens/s, bars p25–p75")
        ax.set_title("decode throughput (higher is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)

    fig.suptitle(f"{record['model']['name']}: latency per variant")
    return png_bytes(fig)


def plot_rate_honoured(record: dict) -> bytes | None:
    """Achieved minus requested rate of every prompt compressor, in percentage points.

    One marker per compressor variant (mean over its compress calls, bars min–max), grouped by
    compressor; the shaded band is the ±2 pp the compressors promise for inputs of 200+ tokens.
    Returns None when the run has no compressor.
    """
    rec = _normalized(record)
    tokens = rec.get("tokens") or {}
    cells = [
        (name, tokens[name])
        for name in _variant_names(rec)
        if name in tokens
        and _finite(tokens[name].get("requested"))
        and _finite(tokens[name].get("achieved_mean"))
    ]
    if not cells:
        return None
    fig = new_figure(5.8, 4.2)
    ax = fig.add_subplot()
    ax.axhspan(-2, 2, color="0.92", zorder=0, label="±2 pp")
    ax.axhline(0, color="0.5", ls="--", lw=1)
    groups: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for name, cell in cells:
        spec = _variant(rec, name).get("spec") or name.rsplit("@", 1)[0]
        groups.setdefault(str(spec), []).append((float(cell["requested"]), cell))
    for i, (spec, points) in enumerate(groups.items()):
        points.sort(key=lambda p: p[0])
        shift = 0.004 * (i - (len(groups) - 1) / 2)  # keep overlapping error bars apart
        xs = [r + shift for r, _ in points]
        ys = [100 * (c["achieved_mean"] - r) for r, c in points]
        lo = [100 * (c["achieved_mean"] - c.get("achieved_min", c["achieved_mean"])) for _, c in points]
        hi = [100 * (c.get("achieved_max", c["achieved_mean"]) - c["achieved_mean"]) for _, c in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=f"C{i % 10}", label=spec)
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, -3), max(high, 3))
    ax.set_xlabel("requested rate (fraction of cl100k tokens kept)")
    ax.set_ylabel("achieved − requested (pp; mean, bars min–max)")
    ax.set_title("rate honoured")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

#: The built-in plots, in page order; registered plots follow.
_BUILTIN_PLOTS: dict[str, str] = {
    SPEEDUP_PLOT_NAME: "plot_speedup_vs_quality",
    LATENCY_PLOT_NAME: "plot_latency",
    RATE_PLOT_NAME: "plot_rate_honoured",
}


def _render_plots(record: Mapping[str, Any]) -> dict[str, bytes | None]:
    """Every plot of the record (None where a plot has nothing to show)."""
    import sys

    module = sys.modules[__name__]  # looked up at call time, so a replaced function is used
    plots: dict[str, bytes | None] = {
        name: getattr(module, fn)(record) for name, fn in _BUILTIN_PLOTS.items()
    }
    for name, fn in _PLOTS.items():
        plots[name] = fn(_normalized(record))
    return plots


def _section_images(record: Mapping[str, Any]) -> dict[str, bytes]:
    """The :class:`Image` blocks of every section, by file name (a name used twice is an error)."""
    images: dict[str, bytes] = {}
    for _, blocks in _sections(_normalized(record)):
        for block in blocks:
            if isinstance(block, Image):
                if block.filename in images or block.filename in _PLOTS:
                    raise ReportError(f"two pictures of the report are named {block.filename!r}")
                images[block.filename] = block.data
    return images


def write_report(record: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path | list[Path]]:
    """Validate ``record`` and write the report files into ``out_dir``.

    Everything is rendered in memory first; then each file is written atomically. A plot that
    cannot be drawn (missing data) is skipped, and a stale copy of it from an earlier report in
    the same folder is removed so the folder never shows a plot of another run.

    Parameters
    ----------
    record : dict
        A ``tokenlean.report/2`` (or ``/1``) record.
    out_dir : str or path-like
        Output folder; created if needed.

    Returns
    -------
    dict
        ``{"json": Path, "markdown": Path, "html": Path, "plots": [Path, ...]}`` (plots include the
        sections' :class:`Image` files).

    Raises
    ------
    ReportError
        (a ``ValueError``) if the record does not follow the schema.
    tokenlean.errors.OutputDirError
        If ``out_dir`` cannot be written.
    """
    validate_record(record)
    load_renderers()
    out = ensure_writable_dir(out_dir)

    plots = _render_plots(record)
    markdown = render_markdown(record)
    page = render_html(record, {k: v for k, v in plots.items() if v})
    images = _section_images(record)

    plot_paths = []
    for name, data in plots.items():
        if data:
            plot_paths.append(atomic_write_bytes(out / name, data))
    for name, data in images.items():
        plot_paths.append(atomic_write_bytes(out / name, data))
    md_path = atomic_write_text(out / MARKDOWN_NAME, markdown)
    html_path = atomic_write_text(out / HTML_NAME, page)
    json_path = atomic_write_json(out / JSON_NAME, record)
    for name, data in plots.items():
        if not data:
            (out / name).unlink(missing_ok=True)
    return {"json": json_path, "markdown": md_path, "html": html_path, "plots": plot_paths}


def main(argv: list[str] | None = None) -> int:
    """Re-render the report files of a folder (or ``report.json``) from its record."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokenlean.eval.report", description=main.__doc__)
    parser.add_argument("path", help="report folder or report.json")
    parser.add_argument("--out", help="output folder (default: the record's folder)")
    args = parser.parse_args(argv)
    record = load_record(args.path)
    src = Path(args.path)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    paths = write_report(record, out)
    print(f"report written to {paths['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
