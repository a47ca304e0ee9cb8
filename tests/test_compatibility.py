"""What `inspect BASE MODEL ...` says and what `merge` then does agree, and every piece of advice works when
followed: the mixed-tying head under another embedding name, heads of another vocabulary, MoE experts saved in
two layouts, the exact --exclude pattern, model sizes that differ, the first non-finite row, the least --max-ram."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge.cli import main
from streammerge.examples import SHAPES, write_family

EMB = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("fam"), "tiny", dtype="f32")  # tied: no lm_head stored


def _copy(src: Path, dst: Path, edit=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        save_file(edit(load_file(dst / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _renamed(ts):
    return {("model.tok.weight" if n == EMB else n): t for n, t in ts.items()}


def test_mixed_tying_under_another_embedding_name_needs_and_takes_embedding(clean, tmp_path):
    base = _copy(clean["base"], tmp_path / "base", _renamed)
    untied = _copy(clean["chat"], tmp_path / "untied",
                   lambda ts: {**_renamed(ts), "lm_head.weight": ts[EMB] + 0.01}, {"tie_word_embeddings": False})
    tied = _copy(clean["multilingual"], tmp_path / "tied", _renamed)
    code, out = _run("inspect", base, untied, tied)
    assert code == 0 and "[needs an option]" in out and "--embedding NAME" in out
    code, out = _run("merge", "--base", base, "--model", untied, "--model", tied, "--out", tmp_path / "x", "-q")
    assert code == 1 and "--embedding NAME" in out
    code, out = _run("merge", "--base", base, "--model", untied, "--model", tied, "--out", tmp_path / "x", "-q",
                     "--embedding", "model.layers.0.self_attn.o_proj.weight")
    assert code == 1 and "--embedding must name the token embedding" in out and "vocabulary" not in out
    code, out = _run("merge", "--base", base, "--model", untied, "--model", tied, "--out", tmp_path / "o", "-q",
                     "--embedding", "model.tok.weight", "--method", "linear")
    assert code == 0, out
    got = load_file(tmp_path / "o" / "model.safetensors")["lm_head.weight"]
    ts = [load_file(f / "model.safetensors") for f in (untied, tied)]
    assert torch.allclose(got, (ts[0]["lm_head.weight"] + ts[1]["model.tok.weight"]) / 2)


def test_a_head_of_another_vocabulary_is_blocked_by_inspect_too(clean, tmp_path):
    big = _copy(clean["chat"], tmp_path / "big", lambda ts: {**ts, "lm_head.weight": torch.zeros(300, 64)},
                {"tie_word_embeddings": False})
    code, out = _run("inspect", clean["base"], big, clean["multilingual"])
    assert code == 1 and "[blocks]" in out and "different shapes" in out
    code, out = _run("merge", "--base", clean["base"], "--model", big, "--model", clean["multilingual"], "--out",
                     tmp_path / "x")
    assert code == 1 and "vocabulary sizes differ" in out


def _stacked(ts):
    """The per-expert layout turned into transformers v5's stacked one."""
    out = {n: t for n, t in ts.items() if ".experts." not in n}
    out["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack([ts[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]
                                                                  for e in range(2)])
    return out


def _per_expert(ts):
    return {**ts, **{f"model.layers.0.mlp.experts.{e}.up_proj.weight": torch.full((8, 64), float(e))
                     for e in range(2)}}


def test_experts_saved_in_two_layouts_are_named_as_such(clean, tmp_path):
    base = _copy(clean["base"], tmp_path / "base", _per_expert)
    chat = _copy(clean["chat"], tmp_path / "chat", lambda ts: _stacked(_per_expert(ts)))
    other = _copy(clean["multilingual"], tmp_path / "other", lambda ts: _stacked(_per_expert(ts)))
    code, out = _run("inspect", base, chat)
    assert code == 1 and "[blocks]" in out and "two layouts" in out and "--exclude" not in out
    code, out = _run("merge", "--base", base, "--model", chat, "--model", other, "--out", tmp_path / "x")
    assert code == 1 and "two layouts" in out and "save_pretrained" in out


def test_the_same_weights_under_another_key_layout_are_named_as_such(clean, tmp_path):
    """A vision-language model saved by an older and a newer transformers: model.* vs model.language_model.*."""
    moved = _copy(clean["chat"], tmp_path / "moved",
                  lambda ts: {n.replace("model.", "model.language_model.", 1): t for n, t in ts.items()})
    code, out = _run("inspect", clean["base"], moved)
    assert code == 1 and "[blocks]" in out and "another key layout" in out and "--exclude" not in out
    code, out = _run("merge", "--base", clean["base"], "--model", moved, "--model", clean["multilingual"], "--out",
                     tmp_path / "x")
    assert code == 1 and "another key layout" in out and "model.language_model.embed_tokens.weight" in out


def test_the_exclude_pattern_in_the_advice_can_be_pasted(clean, tmp_path):
    extra = {f"model.layers.{i}.mlp.adapter.weight": torch.ones(4, 4) for i in range(2)}
    chat = _copy(clean["chat"], tmp_path / "chat", lambda ts: {**ts, **extra})
    code, out = _run("merge", "--base", clean["base"], "--model", chat, "--model", clean["multilingual"], "--out",
                     tmp_path / "x")
    pattern = re.search(r"--exclude '([^']+)'", out).group(1)
    assert code == 1 and "..." not in pattern
    _, inspected = _run("inspect", clean["base"], chat)
    assert f"--exclude '{pattern}'" in inspected
    code, out = _run("merge", "--base", clean["base"], "--model", chat, "--model", clean["multilingual"], "--out",
                     tmp_path / "o", "--exclude", pattern, "-q")
    assert code == 0, out
    # two models with tensors of their own: one error names both, and its one pattern covers both
    other = _copy(clean["multilingual"], tmp_path / "other",
                  lambda ts: {**ts, "model.value_head.weight": torch.ones(1, 64)})
    code, out = _run("merge", "--base", clean["base"], "--model", chat, "--model", other, "--out", tmp_path / "y")
    assert code == 1 and "model 1" in out and "model 2" in out
    pattern = re.search(r"--exclude '([^']+)'", out).group(1)
    code, out = _run("merge", "--base", clean["base"], "--model", chat, "--model", other, "--out", tmp_path / "p",
                     "--exclude", pattern, "-q")
    assert code == 0, out


def test_another_model_size_is_not_called_a_vocabulary_difference(clean, tmp_path):
    wide = write_family(tmp_path / "wide", replace(SHAPES["tiny"], hidden=96), dtype="f32")
    code, out = _run("merge", "--base", clean["base"], "--model", wide["chat"], "--model", clean["multilingual"],
                     "--out", tmp_path / "x")
    assert code == 1 and "different model sizes" in out and "vocabulary" not in out
    code, out = _run("inspect", clean["base"], wide["chat"])
    assert code == 1 and "[blocks]" in out and "different model sizes" in out


def test_a_non_finite_input_names_its_first_bad_row(clean, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(ts):
        ts[name] = ts[name].clone()
        ts[name][137, 5] = float("nan")
        return ts

    bad = _copy(clean["chat"], tmp_path / "bad", poison)
    code, out = _run("merge", "--base", clean["base"], "--model", bad, "--model", clean["multilingual"], "--out",
                     tmp_path / "x", "--method", "task_arithmetic")
    assert code == 1 and "first at row 137" in out


def test_the_least_max_ram_quoted_is_enough_and_one_byte_less_is_not(clean):
    inputs = ["--base", clean["base"], "--model", clean["chat"], "--model", clean["multilingual"], "--method",
              "breadcrumbs", "--param", "density=0.5"]
    code, out = _run("plan", *inputs, "--max-ram", "40KiB")
    least = int(re.search(r"\(--max-ram (\d+)B\)", out).group(1))
    assert code == 1 and _run("plan", *inputs, "--max-ram", f"{least}B")[0] == 0
    assert "too small" in _run("plan", *inputs, "--max-ram", f"{least - 1}B")[1]
    shown = re.search(r"needs at least ([\d.]+) (\w+)", out)
    value = float(shown.group(1)) * {"KiB": 2**10, "MiB": 2**20}[shown.group(2)]
    assert value >= least  # the rounded figure is enough too
