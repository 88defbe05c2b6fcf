"""Turn one benchmark record (schema ``tokenlean.report/1``) into report files.

A record is a plain dict that the bench harness produces; see :func:`validate_record` for the
keys it must hold. :func:`write_report` renders it into a folder::

    report.json              the record itself
    report.md                summary table, per-task quality, latency detail, machine
    report.html              one self-contained page (inline CSS, plots as data URIs)
    speedup_vs_quality.png   e2e speedup against quality kept (skipped when data is missing)
    latency.png              median latencies and decode throughput (skipped without latency)

Every file is written atomically (temporary file + rename), and everything is rendered in
memory before the first file is touched, so a failure never leaves a half-written report.

Conventions used in the tables
------------------------------
* latency cells read ``median [p25–p75]`` in the same unit; seconds below 1 s are shown in ms,
  decode throughput in tokens/s, peak memory in MB;
* speedup cells read ``median× [p25–p75]`` of the per-repeat ratios baseline/variant
  (> 1× means the variant is faster, or uses less memory); the baseline reads ``1.00×``;
* "kept" is a task's primary metric relative to the baseline, in percent:
  ``variant / baseline`` when higher is better, ``baseline / variant`` when lower is better.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenlean._io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir
from tokenlean.errors import TokenleanError

__all__ = [
    "SCHEMA",
    "ReportError",
    "load_record",
    "plot_latency",
    "plot_speedup_vs_quality",
    "render_html",
    "render_markdown",
    "validate_record",
    "write_report",
]

SCHEMA = "tokenlean.report/1"

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
SPEEDUP_PLOT_NAME = "speedup_vs_quality.png"
LATENCY_PLOT_NAME = "latency.png"

# Known latency metrics, in display order: key -> (column title, kind).
# kind "s": seconds (shown in ms below 1 s), "rate": tokens/s, "mb": megabytes.
LATENCY_METRICS: dict[str, tuple[str, str]] = {
    "prefill_s": ("prefill", "s"),
    "ttft_s": ("TTFT", "s"),
    "decode_tokens_per_s": ("decode", "rate"),
    "e2e_s": ("e2e", "s"),
    "encode_s": ("encode", "s"),
    "sentences_per_s": ("encode throughput", "rate"),
    "peak_memory_mb": ("peak memory", "mb"),
}

# Known speedup keys, in display order: key -> column title.
SPEEDUP_KEYS: dict[str, str] = {
    "prefill": "prefill",
    "ttft": "TTFT",
    "decode": "decode",
    "e2e": "e2e",
    "encode": "encode",
    "peak_memory": "peak memory",
}

_REQUIRED_KEYS = ("schema", "created", "machine", "model", "variants", "latency", "speedup", "quality")
_DASH = "—"


class ReportError(TokenleanError, ValueError):
    """A benchmark record is missing, unreadable or does not follow ``tokenlean.report/1``."""


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
    """Check that ``record`` follows the ``tokenlean.report/1`` schema.

    Parameters
    ----------
    record : dict
        A benchmark record. Required keys: ``schema`` (``"tokenlean.report/1"``), ``created``
        (str), ``machine`` (dict), ``model`` (dict with a str ``name``), ``variants`` (non-empty
        list of ``{"name", "method", "params"}``, the first being the baseline with
        ``method=None``), ``latency``, ``speedup`` and ``quality`` (dicts, possibly empty).
        ``seed`` (int or None) and ``config`` (dict) are optional.

    Raises
    ------
    ReportError
        (a ``ValueError``) naming the first problem found.
    """
    if not isinstance(record, Mapping):
        raise ReportError(f"a report record must be a JSON object, got {type(record).__name__}")
    if "schema" not in record:
        raise ReportError(f"record has no 'schema' key (expected {SCHEMA!r})")
    if record["schema"] != SCHEMA:
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
        if not isinstance(variant["params"], Mapping):
            raise ReportError(f"{where}['params'] must be an object")
    if variants[0]["method"] is not None:
        raise ReportError(
            f"the first variant must be the unpatched baseline (method null), got method {variants[0]['method']!r}"
        )
    known = set(names)

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
        The validated record.

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


# --------------------------------------------------------------------------------------------
# number formatting and derived values
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return _is_number(x) and math.isfinite(x)


def _fmt(x: Any) -> str:
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
    if kind == "mb":
        return 1.0, "MB"
    return 1.0, ""


def _fmt_latency(metric: str, stats: Mapping[str, Any] | None) -> str:
    if not stats or not _finite(stats.get("median")):
        return _DASH
    scale, unit = _latency_unit(metric, stats["median"])
    text = f"{_fmt(stats['median'] * scale)} {unit}".rstrip()
    p25, p75 = stats.get("p25"), stats.get("p75")
    if _finite(p25) and _finite(p75):
        text += f" [{_fmt(p25 * scale)}–{_fmt(p75 * scale)}]"
    return text


def _fmt_speedup(stats: Mapping[str, Any] | None) -> str:
    if not stats or not _finite(stats.get("median")):
        return _DASH
    text = f"{stats['median']:.2f}×"
    p25, p75 = stats.get("p25"), stats.get("p75")
    if _finite(p25) and _finite(p75):
        text += f" [{p25:.2f}–{p75:.2f}]"
    return text


def _fmt_pct(x: float | None) -> str:
    return _DASH if x is None or not math.isfinite(x) else f"{x:.1f}%"


def _fmt_params(params: Mapping[str, Any]) -> str:
    if not params:
        return _DASH
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _baseline_name(record: Mapping[str, Any]) -> str:
    return record["variants"][0]["name"]


def _variant_names(record: Mapping[str, Any]) -> list[str]:
    return [v["name"] for v in record["variants"]]


def _kept(entry: Mapping[str, Any], baseline: str, variant: str) -> float | None:
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
    return [k for k in known_order if k in present] + [k for k in present if k not in known_order]


def _latency_metrics(record: Mapping[str, Any]) -> list[str]:
    return _ordered_keys(record["latency"], list(LATENCY_METRICS))


def _speedup_keys(record: Mapping[str, Any]) -> list[str]:
    return _ordered_keys(record["speedup"], list(SPEEDUP_KEYS))


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


# --------------------------------------------------------------------------------------------
# tables shared by Markdown and HTML: (headers, rows of cell strings)
# --------------------------------------------------------------------------------------------

Table = tuple[list[str], list[list[str]]]


def _summary_table(record: Mapping[str, Any]) -> Table:
    baseline = _baseline_name(record)
    metrics = _latency_metrics(record)
    speedups = _speedup_keys(record)
    tasks = list(record["quality"])
    headers = ["variant", "params"]
    for metric in metrics:
        title, kind = LATENCY_METRICS.get(metric, (metric, ""))
        rate = "sentences/s" if metric == "sentences_per_s" else "tok/s"
        headers.append(f"{title} ({rate})" if kind == "rate" or metric.endswith("_per_s") else title)
    headers += [f"{SPEEDUP_KEYS.get(key, key)} speedup" for key in speedups]
    for task in tasks:
        entry = record["quality"][task]
        headers += [f"{task}: {entry['primary']} {_direction(entry)}", f"{task}: kept"]

    rows = []
    for variant in record["variants"]:
        name = variant["name"]
        row = [name, _fmt_params(variant["params"])]
        lat = record["latency"].get(name, {})
        row += [_fmt_latency(metric, lat.get(metric)) for metric in metrics]
        if name == baseline:
            row += ["1.00×"] * len(speedups)
        else:
            ratios = record["speedup"].get(name, {})
            row += [_fmt_speedup(ratios.get(key)) for key in speedups]
        for task in tasks:
            entry = record["quality"][task]
            row.append(_fmt(entry["variants"].get(name, {}).get(entry["primary"])))
            row.append(_fmt_pct(_kept(entry, baseline, name)))
        rows.append(row)
    return headers, rows


def _summary_note(record: Mapping[str, Any]) -> str:
    parts = []
    if record["latency"]:
        parts.append(
            "Latency cells are `median [p25–p75]` (interquartile range, same unit) over the timed "
            "repeats; seconds below 1 s are shown in ms, decode throughput in tokens/s, memory in MB."
        )
    if record["speedup"]:
        parts.append(
            "Speedups are `median× [p25–p75]` of baseline/variant ratios from paired, interleaved "
            "repeats; above 1× the variant is faster (or uses less memory); the baseline reads 1.00×."
        )
    if record["quality"]:
        parts.append(
            '↑/↓: higher/lower is better. "kept" is the primary metric relative to the baseline '
            "(variant/baseline when higher is better, baseline/variant when lower is better)."
        )
    if not parts:
        parts.append("No latency, speedup or quality was measured in this run.")
    return " ".join(parts)


def _latency_detail_table(record: Mapping[str, Any]) -> Table:
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
                return _fmt(value * scale) if _finite(value) else _DASH

            iqr = f"[{cell('p25')}–{cell('p75')}]{suffix}"
            rows.append(
                [
                    name,
                    metric,
                    f"{cell('median')}{suffix}",
                    iqr,
                    f"{cell('min')}{suffix}" if "min" in stats else _DASH,
                    f"{cell('max')}{suffix}" if "max" in stats else _DASH,
                    _fmt(stats.get("n")),
                ]
            )
    return headers, rows


def _quality_table(record: Mapping[str, Any], task: str) -> Table:
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
            [name] + [_fmt(values.get(m)) for m in metrics] + [_fmt_pct(_kept(entry, baseline, name))]
        )
    return headers, rows


def _task_caption(entry: Mapping[str, Any]) -> str:
    better = "higher" if entry["higher_is_better"] else "lower"
    text = f"primary metric: {entry['primary']} ({better} is better)"
    if entry.get("n_examples") is not None:
        text += f"; examples: {_fmt(entry['n_examples'])}"
    return text


def _model_rows(record: Mapping[str, Any]) -> list[list[str]]:
    return [
        [str(k), _fmt(v) if _is_number(v) else (_DASH if v is None else str(v))]
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


def _method_rows(record: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            v["name"],
            v["method"] if v["method"] is not None else "(none: unpatched baseline)",
            json.dumps(v["params"], default=str, ensure_ascii=False, sort_keys=True),
        ]
        for v in record["variants"]
    ]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
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
        line += f", {esc(_fmt(model['num_parameters']))} parameters"
    line += f"; created {esc(str(record['created']))}"
    if record.get("seed") is not None:
        line += f"; seed {esc(str(record['seed']))}"
    return line


def render_markdown(record: dict) -> str:
    """Render a record as a Markdown report.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/1`` record.

    Returns
    -------
    str
        Markdown with the summary table (one row per variant), a section per quality task,
        latency detail, method configs, bench settings, and machine/library versions.
    """
    validate_record(record)
    out = [f"# {_title(record)}", ""]
    desc = _model_line(record, code=lambda text: f"`{text}`", esc=str)
    out += [
        desc + ".",
        "",
        "## Summary",
        "",
        _md_table(*_summary_table(record), text_cols=2),
        "",
        f"_{_summary_note(record)}_",
        "",
    ]

    for task, entry in record["quality"].items():
        out += [f"## Quality: {task}", "", f"{_task_caption(entry)}.", ""]
        headers, rows = _quality_table(record, task)
        out += [_md_table(headers, rows) if rows else "_no results_", ""]

    if record["latency"]:
        out += ["## Latency detail", "", _md_table(*_latency_detail_table(record), text_cols=2), ""]
    else:
        out += ["## Latency detail", "", "_Latency was not measured in this run._", ""]

    out += [
        "## Methods",
        "",
        _md_table(["variant", "method", "params"], _method_rows(record), text_cols=3),
        "",
    ]
    config = _config_rows(record)
    if config:
        out += ["## Bench settings", "", _md_table(["setting", "value"], config, text_cols=2), ""]
    out += ["## Model", "", _md_table(["key", "value"], _model_rows(record), text_cols=2), ""]
    out += [
        "## Machine and libraries",
        "",
        _md_table(["key", "value"], _machine_rows(record), text_cols=2),
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
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
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .8rem; }
code { background: #f3f4f6; padding: 0 .2rem; }
"""


def _html_table(headers: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
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


def _plot_caption(key: str) -> str:
    stem = key[:-4] if key.endswith(".png") else key
    return stem.replace("_", " ")


def render_html(record: dict, plots: dict[str, bytes]) -> str:
    """Render a record as one self-contained HTML page.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/1`` record.
    plots : dict of str to bytes
        PNG images to embed, keyed by a name (e.g. ``"latency.png"``) used as caption and alt
        text; entries whose value is ``None`` or empty are left out.

    Returns
    -------
    str
        An HTML document with inline CSS and the plots as base64 ``data:`` URIs; it loads
        nothing from the network. Every string taken from the record is HTML-escaped.
    """
    validate_record(record)
    esc = html.escape
    title = _title(record)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    meta = _model_line(record, code=lambda text: f"<code>{esc(text)}</code>", esc=esc)
    parts.append(f'<p class="meta">{meta}.</p>')

    parts.append("<h2>Machine and libraries</h2>")
    parts.append(_html_table(["key", "value"], _machine_rows(record), text_cols=2))
    parts.append("<h2>Model</h2>")
    parts.append(_html_table(["key", "value"], _model_rows(record), text_cols=2))

    parts.append("<h2>Summary</h2>")
    parts.append(_html_table(*_summary_table(record), text_cols=2))
    parts.append(f'<p class="note">{esc(_summary_note(record).replace("`", ""))}</p>')

    parts.append("<h2>Latency</h2>")
    if record["latency"]:
        parts.append(_html_table(*_latency_detail_table(record), text_cols=2))
    else:
        parts.append('<p class="note">Latency was not measured in this run.</p>')

    for task, entry in record["quality"].items():
        parts.append(f"<h2>Quality: {esc(task)}</h2>")
        parts.append(f'<p class="caption">{esc(_task_caption(entry))}</p>')
        headers, rows = _quality_table(record, task)
        parts.append(_html_table(headers, rows) if rows else '<p class="note">No results.</p>')

    shown = [(key, data) for key, data in (plots or {}).items() if data]
    if shown:
        parts.append("<h2>Plots</h2>")
        for key, data in shown:
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            caption = esc(_plot_caption(key))
            parts.append(
                f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
            )

    parts.append("<h2>Methods</h2>")
    parts.append(_html_table(["variant", "method", "params"], _method_rows(record), text_cols=3))
    config = _config_rows(record)
    if config:
        parts.append("<h2>Bench settings</h2>")
        parts.append(_html_table(["setting", "value"], config, text_cols=2))

    raw = json.dumps(record, indent=2, default=str, ensure_ascii=False)
    parts.append(f"<details><summary>Raw record (JSON)</summary><pre>{esc(raw)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    # A bare Figure renders through the Agg canvas on savefig without touching pyplot or the
    # global backend, and is freed with the object (nothing registered to close).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _variant_colors(record: Mapping[str, Any]) -> dict[str, str]:
    """One colour per variant, the same in every plot."""
    return {name: f"C{i % 10}" for i, name in enumerate(_variant_names(record))}


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def plot_speedup_vs_quality(record: dict) -> bytes | None:
    """Plot end-to-end speedup against quality kept, one labelled marker per variant.

    x is the median e2e speedup (encode speedup for encoding runs; error bars p25–p75), y the quality kept (%) of the first task
    whose baseline has a usable primary metric; dashed lines mark 1.0× and 100 %.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/1`` record.

    Returns
    -------
    bytes or None
        PNG bytes, or None when there is nothing to plot (no quality task with a kept value, or
        no variant with an e2e speedup).
    """
    validate_record(record)
    baseline = _baseline_name(record)
    task = None
    for name, entry in record["quality"].items():
        if any(_kept(entry, baseline, v) is not None for v in _variant_names(record)[1:]):
            task = name
            break
    if task is None:
        return None
    entry = record["quality"][task]

    points = []  # (name, x, x_lo, x_hi, y)
    for name in _variant_names(record)[1:]:
        speedups = record["speedup"].get(name, {})
        stats = speedups.get("e2e") or speedups.get("encode")  # generation or encoding workload
        kept = _kept(entry, baseline, name)
        if not stats or not _finite(stats.get("median")) or kept is None:
            continue
        x = stats["median"]
        lo = x - stats["p25"] if _finite(stats.get("p25")) else 0.0
        hi = stats["p75"] - x if _finite(stats.get("p75")) else 0.0
        points.append((name, x, max(lo, 0.0), max(hi, 0.0), kept))
    if not points:
        return None

    fig = _new_figure(7.0, 4.8)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="0.45", linestyle="--", linewidth=1, zorder=1)
    ax.axhline(100.0, color="0.45", linestyle="--", linewidth=1, zorder=1)
    ax.scatter([1.0], [100.0], marker="s", s=60, color=_variant_colors(record)[baseline], zorder=3)
    ax.annotate(baseline, (1.0, 100.0), xytext=(6, 6), textcoords="offset points", fontsize=9)
    colors = _variant_colors(record)
    for name, x, lo, hi, y in points:
        ax.errorbar(
            [x], [y], xerr=[[lo], [hi]], fmt="o", markersize=7, capsize=4, color=colors[name], zorder=3
        )
        ax.annotate(name, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=9)
    xs = [1.0] + [p[1] - p[2] for p in points] + [p[1] + p[3] for p in points]
    ys = [100.0] + [p[4] for p in points]
    xpad = max(0.05, 0.18 * (max(xs) - min(xs)))  # room for the labels
    ypad = max(1.0, 0.12 * (max(ys) - min(ys)))
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    ax.set_xlabel("end-to-end (or encode) speedup vs baseline (×, median, bars p25–p75)")
    metric = task if task == entry["primary"] else f"{task}, {entry['primary']}"
    ax.set_ylabel(f"quality kept (%): {metric}")
    ax.set_title(f"{record['model']['name']}: speedup vs quality")
    ax.grid(True, alpha=0.3)
    return _png_bytes(fig)


def _bar_series(
    record: Mapping[str, Any], metric: str, scale: float
) -> list[tuple[float, float, float] | None]:
    out: list[tuple[float, float, float] | None] = []
    for name in _variant_names(record):
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

    Left panel: grouped bars of prefill / TTFT / e2e in ms (one bar per variant in each group);
    right panel: decode throughput in tokens/s. A panel without data is left out.

    Parameters
    ----------
    record : dict
        A valid ``tokenlean.report/1`` record.

    Returns
    -------
    bytes or None
        PNG bytes, or None when the record holds none of these latency metrics.
    """
    validate_record(record)
    if not record["latency"]:
        return None
    names = _variant_names(record)
    time_metrics = [
        m
        for m in ("prefill_s", "ttft_s", "e2e_s", "encode_s")
        if any(s is not None for s in _bar_series(record, m, 1e3))
    ]
    decode = _bar_series(record, "decode_tokens_per_s", 1.0)
    has_decode = any(s is not None for s in decode)
    if not time_metrics and not has_decode:
        return None

    panels = int(bool(time_metrics)) + int(has_decode)
    ratios = [max(2, len(time_metrics)), 1][:panels] if time_metrics else [1]
    fig = _new_figure(4.0 + 2.2 * len(time_metrics) + (3.0 if has_decode else 0.0), 4.6)
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    colors = _variant_colors(record)

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
            ax.bar_label(bars, labels=[_fmt(m) for m in ms], fontsize=7, padding=2)
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
        ax.bar_label(bars, labels=[_fmt(m) for m in ms], fontsize=7, padding=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([names[i] for i in xs], rotation=20, ha="right")
        ax.set_ylabel("median decode tokens/s, bars p25–p75")
        ax.set_title("decode throughput (higher is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)

    fig.suptitle(f"{record['model']['name']}: latency per variant")
    return _png_bytes(fig)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_report(record: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path | list[Path]]:
    """Validate ``record`` and write the report files into ``out_dir``.

    Everything is rendered in memory first; then each file is written atomically. A plot that
    cannot be drawn (missing data) is skipped, and a stale copy of it from an earlier report in
    the same folder is removed so the folder never shows a plot of another run.

    Parameters
    ----------
    record : dict
        A ``tokenlean.report/1`` record.
    out_dir : str or path-like
        Output folder; created if needed.

    Returns
    -------
    dict
        ``{"json": Path, "markdown": Path, "html": Path, "plots": [Path, ...]}``.

    Raises
    ------
    ReportError
        (a ``ValueError``) if the record does not follow the schema.
    tokenlean.errors.OutputDirError
        If ``out_dir`` cannot be created or written.
    """
    validate_record(record)
    out = ensure_writable_dir(out_dir)

    plots: dict[str, bytes | None] = {
        SPEEDUP_PLOT_NAME: plot_speedup_vs_quality(record),
        LATENCY_PLOT_NAME: plot_latency(record),
    }
    markdown = render_markdown(record)
    page = render_html(record, {k: v for k, v in plots.items() if v})

    plot_paths = []
    for name, data in plots.items():
        if data:
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
