"""Tests for tokenlean.eval.report: record -> report.json / .md / .html / PNG plots."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import statistics

import numpy as np
import pytest

from tokenlean.errors import OutputDirError
from tokenlean.eval import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stats(values: list[float]) -> dict:
    q = np.percentile(values, [25, 50, 75])
    return {
        "median": float(q[1]),
        "p25": float(q[0]),
        "p75": float(q[2]),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def _ratio_stats(values: list[float]) -> dict:
    s = _stats(values)
    return {k: s[k] for k in ("median", "p25", "p75", "n")}


@pytest.fixture
def record() -> dict:
    base_prefill = [0.0512, 0.0498, 0.0505, 0.0521, 0.0509]
    sink_prefill = [0.0311, 0.0302, 0.0307, 0.0320, 0.0305]
    snap_prefill = [0.0402, 0.0398, 0.0411, 0.0405, 0.0399]

    def latency(prefill: list[float], decode_tps: float, peak: float) -> dict:
        e2e = [p + 32 / (decode_tps + i) for i, p in enumerate(prefill)]
        return {
            "prefill_s": _stats(prefill),
            "ttft_s": _stats([p + 0.004 for p in prefill]),
            "decode_tokens_per_s": _stats([decode_tps + d for d in (-1.5, 0.0, 0.7, 1.2, -0.4)]),
            "e2e_s": _stats(e2e),
            "peak_memory_mb": _stats([peak] * 5),
        }

    return {
        "schema": "tokenlean.report/2",
        "created": "2026-11-26T13:20:00+00:00",
        "seed": 0,
        "machine": {
            "platform": "Linux-6.8-x86_64",
            "python": "3.11.9",
            "cpu": "x86_64",
            "cpu_count": 16,
            "gpu": None,
            "torch": "2.13.0",
            "transformers": "5.1.0",
            "tokenlean": "0.1.0",
            "numpy": "2.1.0",
        },
        "model": {
            "name": "smollm2-135m",
            "class": "LlamaForCausalLM",
            "dtype": "float32",
            "device": "cpu",
            "num_parameters": 134515008,
        },
        "config": {
            "prompt_tokens": 512,
            "new_tokens": 32,
            "repeats": 5,
            "warmup": 1,
            "batch_size": 1,
            "tasks": ["perplexity", "fidelity"],
        },
        "variants": [
            {"name": "baseline", "kind": "baseline", "method": None, "params": {}},
            {
                "name": "sink_window",
                "kind": "patch",
                "method": "sink_window",
                "params": {"sink_tokens": 4, "window": 256},
            },
            {"name": "snapkv", "kind": "patch", "method": "snapkv", "params": {"budget": 128, "pool": "max"}},
            {
                "name": "default@0.33",
                "kind": "compressor",
                "method": "default",
                "params": {"rate": 0.33},
                "spec": "default",
                "rate": 0.33,
                "peer": None,
            },
        ],  # fmt: skip
        "workload": {
            "name": "generate",
            "primary": "e2e",
            "reference": "baseline",
            "options": {"prompt_tokens": 512},
        },
        "tokens": {
            "default@0.33": {
                "requested": 0.33,
                "calls": 31,
                "origin_tokens": 27505,
                "compressed_tokens": 9112,
                "saved": 1 - 9112 / 27505,
                "achieved_mean": 0.331,
                "achieved_min": 0.327,
                "achieved_max": 0.337,
                "mean_abs_error_pp": 0.24,
                "within_2pp": 1.0,
                "calls_200plus": 31,
                "compress_s": 5.1,
            }
        },  # fmt: skip
        "latency": {
            "baseline": latency(base_prefill, 41.0, 812.5),
            "sink_window": latency(sink_prefill, 55.3, 640.25),
            "snapkv": latency(snap_prefill, 48.9, 700.0),
        },
        "speedup": {
            "sink_window": {
                "prefill": _ratio_stats([1.62, 1.65, 1.66, 1.63, 1.67]),
                "ttft": _ratio_stats([1.55, 1.57, 1.58, 1.56, 1.60]),
                "decode": _ratio_stats([1.33, 1.35, 1.34, 1.36, 1.32]),
                "e2e": _ratio_stats([1.371, 1.402, 1.389, 1.395, 1.380]),
                "peak_memory": _ratio_stats([1.27, 1.27, 1.27, 1.27, 1.27]),
            },
            "snapkv": {
                "prefill": _ratio_stats([1.25, 1.26, 1.24, 1.27, 1.25]),
                "ttft": _ratio_stats([1.22, 1.21, 1.23, 1.22, 1.24]),
                "decode": _ratio_stats([1.18, 1.19, 1.20, 1.17, 1.19]),
                "e2e": _ratio_stats([1.19, 1.21, 1.20, 1.22, 1.18]),
                "peak_memory": _ratio_stats([1.16, 1.16, 1.16, 1.16, 1.16]),
            },
        },
        "quality": {
            "perplexity": {
                "primary": "perplexity",
                "higher_is_better": False,
                "n_examples": 8,
                "variants": {
                    "baseline": {"perplexity": 21.3, "nll": 3.0587, "tokens": 8184},
                    "sink_window": {"perplexity": 23.9, "nll": 3.1739, "tokens": 8184},
                    "snapkv": {"perplexity": 22.1, "nll": 3.0956, "tokens": 8184},
                },
            },
            "fidelity": {
                "primary": "top1_agreement",
                "higher_is_better": True,
                "n_examples": 8,
                "variants": {
                    "baseline": {"top1_agreement": 1.0, "kl_divergence": 0.0},
                    "sink_window": {"top1_agreement": 0.91, "kl_divergence": 0.071},
                    "snapkv": {"top1_agreement": 0.97, "kl_divergence": 0.02},
                },
            },
        },
    }


def _leftovers(folder: pathlib.Path) -> list[str]:
    """Temporary files left behind by an interrupted atomic write."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def test_write_report_writes_all_files(record, tmp_path):
    out = tmp_path / "run" / "nested"  # created on demand
    paths = report.write_report(record, out)
    assert set(paths) == {"json", "markdown", "html", "plots"}
    assert paths["json"] == out / "report.json"
    assert paths["markdown"] == out / "report.md"
    assert paths["html"] == out / "report.html"
    assert sorted(p.name for p in paths["plots"]) == [
        "latency.png",
        "rate_honoured.png",
        "speedup_vs_quality.png",
    ]
    for path in [paths["json"], paths["markdown"], paths["html"], *paths["plots"]]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert json.loads(paths["json"].read_text()) == record
    assert _leftovers(out) == []


def test_plots_are_decodable_pngs(record, tmp_path):
    import matplotlib.image as mpimg

    paths = report.write_report(record, tmp_path)
    for path in paths["plots"]:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img.dtype == np.float32
        assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_plot_functions_return_png_bytes(record):
    for fn in (report.plot_speedup_vs_quality, report.plot_latency):
        data = fn(record)
        assert isinstance(data, bytes) and data.startswith(PNG_SIGNATURE)


def test_plotting_leaves_global_backend_and_pyplot_alone(record):
    import matplotlib

    backend = matplotlib.get_backend()
    report.plot_latency(record)
    report.plot_speedup_vs_quality(record)
    assert matplotlib.get_backend() == backend
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    if pyplot is not None:
        assert pyplot.get_fignums() == []


def test_load_record_roundtrip(record, tmp_path):
    report.write_report(record, tmp_path)
    assert report.load_record(tmp_path) == record
    assert report.load_record(tmp_path / "report.json") == record
    assert report.load_record(str(tmp_path)) == record


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def test_markdown_contents(record):
    md = report.render_markdown(record)
    assert md.startswith("# tokenlean report: smollm2-135m (2026-11-26)")
    for variant in record["variants"]:
        assert variant["name"] in md
    # speedup strings computed from the fixture values
    for name in ("sink_window", "snapkv"):
        e2e = record["speedup"][name]["e2e"]
        assert e2e["median"] == statistics.median(
            [1.371, 1.402, 1.389, 1.395, 1.380] if name == "sink_window" else [1.19, 1.21, 1.20, 1.22, 1.18]
        )
        expected = f"{e2e['median']:.2f}× [{e2e['p25']:.2f}–{e2e['p75']:.2f}]"
        assert expected in md
    assert "1.39× [1.38–1.40]" in md  # sink_window e2e, spelled out once by hand
    baseline_row = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "1.00×" in baseline_row
    assert "sink_tokens=4, window=256" in md
    # latency below 1 s shown in ms with its IQR; tokens/s and MB as is
    prefill = record["latency"]["baseline"]["prefill_s"]
    assert (
        f"{prefill['median'] * 1000:.4g} ms [{prefill['p25'] * 1000:.4g}–{prefill['p75'] * 1000:.4g}]" in md
    )
    assert "812.5 MB" in md
    assert "tok/s" in md
    # the convention is stated under the table
    assert "median [p25–p75]" in md
    # quality: primary metric and kept (lower-is-better ppl: baseline/variant; higher: variant/baseline)
    assert f"{100 * 21.3 / 23.9:.1f}%" in md
    assert f"{100 * 0.97 / 1.0:.1f}%" in md
    assert "## Quality: perplexity" in md and "## Quality: fidelity" in md
    assert "kl_divergence" in md and "nll" in md
    assert "8,184" in md
    # machine and versions
    assert "## Machine and libraries" in md
    for key in ("torch", "transformers", "tokenlean", "numpy"):
        assert f"| {key} | {record['machine'][key]} |" in md


def test_markdown_table_is_rectangular(record):
    md = report.render_markdown(record)
    lines = md.splitlines()
    start = lines.index("## Summary") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == 2 + len(record["variants"])
    widths = {line.replace("\\|", "").count("|") for line in table}
    assert len(widths) == 1


def test_markdown_escapes_pipes(record):
    record["variants"][1]["params"]["pattern"] = "a|b"
    md = report.render_markdown(record)
    assert "a\\|b" in md


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def test_html_is_self_contained(record, tmp_path):
    paths = report.write_report(record, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert page.count("data:image/png;base64,") == 3  # speedup vs quality, latency, rate honoured
    assert "<details>" in page and "<pre>" in page
    assert "smollm2-135m" in page and "2026-11-26" in page
    for variant in record["variants"]:
        assert variant["name"] in page
    e2e = record["speedup"]["sink_window"]["e2e"]
    assert f"{e2e['median']:.2f}× [{e2e['p25']:.2f}–{e2e['p75']:.2f}]" in page
    assert "IQR" in page
    assert "transformers" in page


def test_html_escapes_record_strings(record):
    record["variants"][1]["params"]["note"] = "<b>bold</b>"
    record["model"]["name"] = "evil<script>alert(1)</script>"
    record["quality"]["fidelity"]["variants"]["snapkv"]["<i>x</i>"] = 1.0
    page = report.render_html(record, {})
    assert "<b>" not in page
    assert "<i>" not in page
    assert "<script" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;script&gt;" in page


def test_render_html_embeds_given_plots(record):
    page = report.render_html(record, {"latency.png": PNG_SIGNATURE + b"fake", "missing.png": None})
    assert page.count("data:image/png;base64,") == 1
    assert "missing" not in page


# --------------------------------------------------------------------------------------------
# validation and loading
# --------------------------------------------------------------------------------------------


def test_validate_accepts_fixture(record):
    report.validate_record(record)


def test_validate_rejects_wrong_schema(record):
    record["schema"] = "tokenlean.report/0"
    with pytest.raises(ValueError, match="schema"):
        report.validate_record(record)


@pytest.mark.parametrize("key", ["schema", "machine", "model", "variants", "latency", "speedup", "quality"])
def test_validate_rejects_missing_key(record, key):
    del record[key]
    with pytest.raises(ValueError, match=key):
        report.validate_record(record)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.update(variants=[]), "variants"),
        (lambda r: r["variants"][0].update(method="sink_window"), "baseline"),
        (lambda r: r["variants"].append({"name": "snapkv", "method": "x", "params": {}}), "twice"),
        (lambda r: r["variants"][1].pop("params"), "params"),
        (lambda r: r["latency"]["baseline"]["e2e_s"].pop("median"), "median"),
        (lambda r: r["latency"]["baseline"]["e2e_s"].update(p25="fast"), "p25"),
        (lambda r: r["latency"].update(ghost={}), "ghost"),
        (lambda r: r["speedup"]["snapkv"].update(e2e=1.2), "e2e"),
        (lambda r: r["quality"]["fidelity"].pop("primary"), "primary"),
        (lambda r: r["quality"]["fidelity"].update(higher_is_better="yes"), "higher_is_better"),
        (lambda r: r["quality"]["perplexity"]["variants"]["snapkv"].update(perplexity="low"), "perplexity"),
        (lambda r: r.update(latency=[]), "latency"),
        (lambda r: r["model"].pop("name"), "name"),
    ],
)
def test_validate_rejects_bad_shapes(record, mutate, match):
    mutate(record)
    with pytest.raises(ValueError, match=match):
        report.validate_record(record)


def test_validate_rejects_non_dict():
    with pytest.raises(ValueError):
        report.validate_record(["not", "a", "record"])


def test_write_report_validates_first(record, tmp_path):
    record["schema"] = "nope"
    with pytest.raises(ValueError, match="schema"):
        report.write_report(record, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_record_rejects_truncated_json(record, tmp_path):
    report.write_report(record, tmp_path)
    path = tmp_path / "report.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated"):
        report.load_record(tmp_path)


def test_load_record_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no report record"):
        report.load_record(tmp_path)
    with pytest.raises(ValueError, match="no report record"):
        report.load_record(tmp_path / "nope.json")


def test_load_record_rejects_wrong_schema(record, tmp_path):
    record["schema"] = "other/2"
    (tmp_path / "report.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="schema"):
        report.load_record(tmp_path)


def test_report_error_is_value_error():
    from tokenlean.errors import TokenleanError

    assert issubclass(report.ReportError, ValueError)
    assert issubclass(report.ReportError, TokenleanError)


# --------------------------------------------------------------------------------------------
# missing data
# --------------------------------------------------------------------------------------------


def test_empty_latency_still_renders(record, tmp_path):
    record["latency"] = {}
    record["speedup"] = {}
    assert report.plot_latency(record) is None
    assert report.plot_speedup_vs_quality(record) is None  # no e2e speedup to put on x
    paths = report.write_report(record, tmp_path)
    assert [p.name for p in paths["plots"]] == ["rate_honoured.png"]  # from the compress calls
    assert not (tmp_path / "latency.png").exists()
    md = paths["markdown"].read_text()
    assert "not measured" in md
    assert "perplexity" in md
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 1


def test_empty_quality_still_renders(record, tmp_path):
    record["quality"] = {}
    assert report.plot_speedup_vs_quality(record) is None
    paths = report.write_report(record, tmp_path)
    assert [p.name for p in paths["plots"]] == ["latency.png", "rate_honoured.png"]
    assert not (tmp_path / "speedup_vs_quality.png").exists()
    assert "sink_window" in paths["markdown"].read_text()
    assert paths["html"].read_text().count("data:image/png;base64,") == 2


def test_baseline_only_record(record, tmp_path):
    record["variants"] = record["variants"][:1]
    record["tokens"] = {}
    record["latency"] = {"baseline": record["latency"]["baseline"]}
    record["speedup"] = {}
    for entry in record["quality"].values():
        entry["variants"] = {"baseline": entry["variants"]["baseline"]}
    paths = report.write_report(record, tmp_path)
    assert [p.name for p in paths["plots"]] == ["latency.png"]
    assert "| baseline |" in paths["markdown"].read_text()


def test_partial_latency_metrics(record):
    for metrics in record["latency"].values():
        for key in ("ttft_s", "e2e_s", "prefill_s", "peak_memory_mb"):
            metrics.pop(key)
    data = report.plot_latency(record)  # only decode throughput left
    assert data is not None and data.startswith(PNG_SIGNATURE)
    report.render_markdown(record)


def test_stale_plot_removed_when_data_disappears(record, tmp_path):
    report.write_report(record, tmp_path)
    assert (tmp_path / "speedup_vs_quality.png").exists()
    record["quality"] = {}
    report.write_report(record, tmp_path)
    assert not (tmp_path / "speedup_vs_quality.png").exists()
    assert (tmp_path / "latency.png").exists()


def test_nan_and_none_values_render_as_dash(record):
    record["quality"]["perplexity"]["variants"]["snapkv"]["perplexity"] = None
    record["latency"]["snapkv"]["e2e_s"]["median"] = float("nan")
    md = report.render_markdown(record)
    snap_row = next(line for line in md.splitlines() if line.startswith("| snapkv |"))
    assert "—" in snap_row
    assert "nan" not in snap_row.lower()
    report.render_html(record, {})


# --------------------------------------------------------------------------------------------
# failures: output folder and atomicity
# --------------------------------------------------------------------------------------------


def test_output_dir_is_a_file(record, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(OutputDirError):
        report.write_report(record, blocker)
    with pytest.raises(OutputDirError):
        report.write_report(record, blocker / "sub")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root ignores file permissions, so a read-only folder is still writable",
)
def test_output_dir_read_only(record, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputDirError):
            report.write_report(record, ro)
    finally:
        ro.chmod(0o755)


def test_failed_plot_leaves_previous_report_intact(record, tmp_path, monkeypatch):
    report.write_report(record, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(_record):
        raise RuntimeError("plotting exploded")

    changed = copy.deepcopy(record)
    changed["model"]["name"] = "another-model"
    monkeypatch.setattr(report, "plot_latency", boom)
    with pytest.raises(RuntimeError, match="plotting exploded"):
        report.write_report(changed, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before
    assert report.load_record(tmp_path) == record


def test_write_interrupted_midway_leaves_no_partial_file(record, tmp_path, monkeypatch):
    report.write_report(record, tmp_path)
    old_html = (tmp_path / "report.html").read_bytes()
    old_json = (tmp_path / "report.json").read_bytes()

    real_write_bytes = pathlib.Path.write_bytes

    def half_write(self, data):
        if self.name.startswith(".report.html."):
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write_bytes(self, data)

    changed = copy.deepcopy(record)
    changed["model"]["name"] = "another-model"
    monkeypatch.setattr(pathlib.Path, "write_bytes", half_write)
    with pytest.raises(OSError, match="No space"):
        report.write_report(changed, tmp_path)
    monkeypatch.undo()

    assert (tmp_path / "report.html").read_bytes() == old_html
    assert (tmp_path / "report.json").read_bytes() == old_json
    assert _leftovers(tmp_path) == []
    assert report.load_record(tmp_path) == record


def test_main_rerenders_folder(record, tmp_path, capsys):
    report.write_report(record, tmp_path / "a")
    assert report.main([str(tmp_path / "a" / "report.json"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.html").is_file()
    assert report.load_record(tmp_path / "b") == record
    assert "report.html" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# one renderer: the headline first, registered sections, older records
# --------------------------------------------------------------------------------------------


def test_report_leads_with_one_line_per_variant(record):
    md = report.render_markdown(record)
    summary = md.index("## Summary")
    assert (
        summary
        < md.index("## Quality: perplexity")
        < md.index("## Latency")
        < md.index("## Machine and libraries")
    )
    assert md.rstrip().endswith(f"| seed | {record['seed']} |")  # machine details come last
    header = next(line for line in md[summary:].splitlines() if line.startswith("| variant |"))
    assert header == "| variant | kind | speed × (generate) | memory × | quality kept | tokens saved |"
    rows: dict[str, str] = {}
    for line in md[summary:].splitlines():  # the first table row of each variant: the headline
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert "| patch | 1.39× [1.38–1.40] | 1.27× [1.27–1.27] | 89.1% (perplexity) | — |" in rows["sink_window"]
    assert rows["default@0.33"].endswith(f"| {100 * (1 - 9112 / 27505):.1f}% |")  # tokens saved
    page = report.render_html(record, {"speedup_vs_quality.png": b"\x89PNG-a", "latency.png": b"\x89PNG-b"})
    # the speed/quality plot sits right under the headline, machine tables at the end
    assert page.index("Summary") < page.index("speedup vs quality") < page.index("Quality: perplexity")
    assert page.index("Latency") < page.index("latency</figcaption>") < page.index("Machine and libraries")


def test_tokens_section_and_rate_plot(record):
    md = report.render_markdown(record)
    assert "## Tokens saved and rate honoured" in md
    assert (
        "| default@0.33 | 0.33 | 0.331 | 0.327 | 0.337 | 0.24 | 100% of 31 | 31 | 27,505 | 9,112 | 66.9% |"
        in md
    )
    assert report.plot_rate_honoured(record).startswith(PNG_SIGNATURE)
    record["tokens"] = {}
    assert report.plot_rate_honoured(record) is None
    assert "Tokens saved" not in report.render_markdown(record)


def test_a_registered_section_renders_its_task(record, monkeypatch):
    calls = []

    @report.register_section("test-only")
    def section(rec, key, entry):
        calls.append(key)
        return [
            report.Text("a warning", strong=True),
            report.Table(["a", "b"], [["x|y", "1"]], title="inner", note="a note"),
            report.Pre("verbatim <text>", title="before"),
        ]

    try:
        record["quality"]["fidelity"]["section"] = "test-only"
        md = report.render_markdown(record)
        assert "**a warning**" in md and "### inner" in md and "| x\\|y | 1 |" in md and "_a note_" in md
        assert "before:\n\n```\nverbatim <text>\n```" in md
        page = report.render_html(record, {})
        assert "<strong>a warning</strong>" in page and "verbatim &lt;text&gt;" in page
        assert calls == ["fidelity", "fidelity"]
    finally:
        report._SECTIONS.pop("test-only")


def test_version_1_records_still_render(record, tmp_path):
    old = copy.deepcopy(record)
    old["schema"] = "tokenlean.report/1"
    old["variants"] = [{k: v for k, v in var.items() if k == "name" or k in ("method", "params")}
                       for var in old["variants"][:3]]  # fmt: skip
    for key in ("workload", "tokens"):
        old.pop(key)
    report.validate_record(old)
    paths = report.write_report(old, tmp_path)
    md = paths["markdown"].read_text()
    assert "| sink_window | patch | 1.39× [1.38–1.40] |" in md
    assert report.load_record(tmp_path) == old  # stored as given


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r["variants"][1].update(kind="plugin"), "kind"),
        (
            lambda r: r["variants"].insert(1, dict(r["variants"][0], name="b2")),
            "baseline, and only the baseline",
        ),
        (lambda r: r["tokens"].update({"ghost@0.5": {"saved": 0.5}}), "unknown variant 'ghost@0.5'"),
        (lambda r: r["tokens"]["default@0.33"].update(saved="half"), "object of numbers"),
        (lambda r: r["quality"]["perplexity"].update(section=3), "section name"),
        (lambda r: r["quality"]["perplexity"].update(compare={"ghost": {}}), "unknown variant 'ghost'"),
        (lambda r: r.update(workload=[]), "workload"),
    ],
)
def test_validate_rejects_bad_v2_fields(record, mutate, match):
    mutate(record)
    with pytest.raises(report.ReportError, match=match):
        report.validate_record(record)
