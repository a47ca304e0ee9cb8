"""What a merge shows while it runs and when it ends: the overall phase, tensors in natural order, a rate that
leaves out resumed work, and one summary line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import interrupt_at_tensor
from tqdm import tqdm

from streammerge import api
from streammerge.cli import main
from streammerge.examples import SHAPES, write_family
from streammerge.execute import MergeInterrupted, RunSummary, execute
from streammerge.progress import Progress

TWELVE_LAYERS = replace(SHAPES["tiny"], layers=12)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("fam"), TWELVE_LAYERS)


def _layer_numbers(names: list[str]) -> list[int]:
    return [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]


def test_tensors_are_merged_and_written_in_natural_order(fam, tmp_path):
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out")
    names = [t.name for t in p.tensors]
    layers = _layer_numbers(names)
    assert layers == sorted(layers) and layers[-1] == 11, "layers.10 must come after layers.2"
    assert names.index("model.embed_tokens.weight") < names.index("model.layers.0.mlp.up_proj.weight")
    # the output shards are filled in this order (within a file, tensors sit in safetensors' own order)
    small = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", shard_size="100KB")
    by_shard = [t.shard for t in small.tensors]
    assert len(set(by_shard)) > 2 and by_shard == sorted(by_shard)


def test_the_bar_shows_the_overall_phase_and_the_current_tensor(fam, tmp_path, monkeypatch):
    labels: list[str] = []
    postfixes: list[str] = []
    set_description, set_postfix_str = tqdm.set_description, tqdm.set_postfix_str
    monkeypatch.setattr(tqdm, "set_description", lambda self, d=None, refresh=True: (
        labels.append(d), set_description(self, d, refresh))[1])
    monkeypatch.setattr(tqdm, "set_postfix_str", lambda self, s="", refresh=True: (
        postfixes.append(s), set_postfix_str(self, s, refresh))[1])
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", max_ram="1MiB")
    # one worker: the tensors in the plan's order (several take the largest first, each shown as it starts)
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", max_ram="1MiB", progress=True,
              threads=1)
    n = len(p.tensors)
    merging = [d for d in labels if d.startswith("merging")]
    assert merging == [f"merging {k}/{n}" for k in range(1, n + 1)], "one label per tensor, counting up"
    assert labels[-1] == "publishing" and all(d.startswith(("merging", "publishing")) for d in labels)
    shown = list(dict.fromkeys(s.split(" · ")[0] for s in postfixes if s))
    assert shown == [t.name for t in p.tensors if t.rule.value != "tied_copy"] or \
        shown == [t.name for t in p.tensors], shown
    assert {s.split(" · ")[1] for s in postfixes if s} >= {"statistics 1/1", "merge"}


def test_the_rate_leaves_out_the_work_of_an_earlier_run(monkeypatch):
    import io

    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]  # the bar is drawn on a terminal only
    monkeypatch.setattr("sys.stderr", terminal)
    shown = Progress(total_bytes=1000, show=True)
    shown.begin(tensors=4, resumed=2, done_bytes=600)
    assert shown.bar is not None and shown.bar.n == 600 and shown.bar.initial == 600
    shown.read(100)
    assert shown.bytes_read == 100 and shown.bar.n == 700
    # the rate tqdm shows counts from ``initial``: 100 bytes in one second, not 700
    meter = tqdm.format_meter(**{**shown.bar.format_dict, "elapsed": 1.0, "rate": None, "unit_divisor": 1000})
    shown.close()
    assert "100B/s" in meter and "700B/s" not in meter, meter


def test_the_merge_ends_with_one_summary_line(fam, tmp_path):
    out = tmp_path / "out"
    args = ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out", out]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    line = next(s for s in r.stderr.splitlines() if s.startswith("merged "))
    size = sum(p.stat().st_size for p in out.iterdir())
    assert f"merged {2 + 12 * 12} tensors in " in line
    for part in ("read ", "/s), wrote ", "peak RSS ", "output ", "in 7 file(s)"):
        assert part in line, line
    r = CliRunner().invoke(main, [str(a) for a in args[:-1]] + [str(tmp_path / "json"), "--json"])
    summary = json.loads(r.stdout)["summary"]
    assert summary["output_bytes"] == size and summary["bytes_read"] > summary["bytes_written"] > 0
    assert summary["tensors"] == 2 + 12 * 12 and summary["tensors_resumed"] == 0 and summary["peak_rss"] > 0


def test_a_resumed_run_counts_only_its_own_reads(fam, tmp_path, monkeypatch):
    """Interrupt a merge half way, continue it: the summary says how many tensors were done before and counts only
    the bytes this run read."""
    out, models = tmp_path / "out", [fam["chat"], fam["multilingual"]]
    interrupt_at_tensor(monkeypatch, 60)
    with pytest.raises(MergeInterrupted):
        execute(api.plan(fam["base"], models, out), show_progress=False)
    monkeypatch.undo()
    summaries: list[RunSummary] = []
    p = api.plan(fam["base"], models, out)
    execute(p, show_progress=False, report=summaries.append)
    (summary,) = summaries
    assert 0 < summary.tensors_resumed < summary.tensors == len(p.tensors)
    assert 0 < summary.bytes_read < p.bytes_read
    assert f"({summary.tensors_resumed} done before)" in summary.line()


def test_no_bar_is_drawn_into_a_pipe_or_a_log(fam, tmp_path, capfd):
    """Carriage-return redraws garble a log: off a terminal, only the summary line is written."""
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "merging" not in err and err.startswith("merged ") and err.count("\n") == 1, err
