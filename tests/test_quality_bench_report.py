"""bench/quality/report.py on a stored result: the replot entry point (plot and Markdown from a results JSON, no
training), the merges' numbering on the plot, and the legend's account of what the base was trained on. Seconds,
not minutes: nothing is trained or merged."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "quality" / "report.py"
RESULTS = REPO / "bench" / "results"
STORED = RESULTS / "20261201T122235Z-quality-format-ptlight.json"  # 2 seeds, --ft-style format --pt-style light

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plot needs matplotlib"),
    pytest.mark.skipif(not STORED.is_file(), reason=f"{STORED.name} is not in bench/results"),
]


def load_report():
    spec = importlib.util.spec_from_file_location("quality_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replot_writes_plot_and_same_markdown(tmp_path: Path) -> None:
    source = tmp_path / STORED.name
    shutil.copy(STORED, source)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = source.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
    # the Markdown renderer is unchanged: the stored report comes back byte for byte
    assert source.with_suffix(".md").read_text() == STORED.with_suffix(".md").read_text()


def test_replot_help_and_refusal(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "RESULTS.json" in proc.stdout and "--no-md" in proc.stdout
    analyze = tmp_path / "x-quality-analyze-seed0.json"
    analyze.write_text(json.dumps({"model": {"models": []}}))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(analyze)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not a results JSON" in proc.stderr
    assert not analyze.with_suffix(".png").exists()


def test_every_merge_numbered_once() -> None:
    report = load_report()
    result = json.loads(STORED.read_text())
    groups = report._groups(result)
    labels = [label for g in groups for label in g["labels"]]
    scored = [r["label"] for r in result["rows"] if r["kind"] == "merge" and r["summary"]["seeds_ok"]]
    assert sorted(labels) == sorted(scored)  # nothing hidden, nothing twice; failed merges have no point
    assert [g["number"] for g in groups] == list(range(1, len(groups) + 1))
    by_label = {label: g for g in groups for label in g["labels"]}
    # identical scores share a number (every density defaults to 1.0: these coincide)
    assert by_label["task_arithmetic"] is by_label["breadcrumbs"] is by_label["dare_linear"]
    assert by_label["ties"] is by_label["della"]
    for key in ("widen", "task_arithmetic", "ties"):
        assert by_label[key]["name"], key
    assert by_label["widen"]["number"] == 1  # this run: WIDEN keeps the most of both (61% FT, 91% PT)
    boths = [g["both"] for g in groups]
    assert boths == sorted(boths, reverse=True)


def test_legend_follows_the_settings() -> None:
    report = load_report()
    result = json.loads(STORED.read_text())
    text = report._descriptions(result)
    assert "English text + the 4 tasks in 4 other prompt format(s)" in text["base"]
    assert "earlier run" in text["base"]  # --base-from
    adam = json.loads(STORED.read_text())
    adam["base"].pop("from")
    for key in ("ft_style", "base_task_rows", "base_task_formats", "ft_replay_rows"):
        adam["settings"].pop(key)
    adam["settings"]["ft_text_rows"] = 6
    text = report._descriptions(adam)
    assert text["base"] == "base (English text only)"
    assert "English text" in text["FT"] and "Vietnamese" in text["PT"]


def test_plot_survives_a_mean_an_ulp_past_max(tmp_path: Path) -> None:
    """With 3 seeds of equal scores, fmean can land an ulp above the max: the error bar must not go negative (the
    plot runs before run.py writes its JSON, so a failure there lost the whole run)."""
    report = load_report()
    result = json.loads(STORED.read_text())
    row = next(r for r in result["rows"] if r["label"] == "widen")
    for key in ("new_bpb", "en_bpb", "ft_exact_match", "ft_answer_bits"):
        v = row["summary"][key]
        v["min"] = v["max"] = v["mean"] * (1 - 1e-15)
    report.plot(result, tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")
