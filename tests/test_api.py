"""The Python API as a user meets it: the README's example, argument forms, errors that name Python arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import streammerge
from streammerge import api
from streammerge.errors import PlanError, ProblemsError, StreamMergeError
from streammerge.examples import write_family
from streammerge.pythonic import pythonize


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("family"), "tiny", dtype="bf16")


def test_the_readme_example_runs_as_written(fam, tmp_path, monkeypatch):
    monkeypatch.chdir(fam["base"].parent)
    out = tmp_path / "merged"
    streammerge.merge("base", ["chat", "multilingual"], out, method="widen", params={"t": 1.0, "s": 1.0},
                      max_ram="2GiB")
    p = streammerge.plan("base", ["chat", "multilingual"], out)  # after the merge, to the same folder
    assert p.to_dict()["out"] == str(out)
    assert repr(p).startswith("Plan(method='widen'") and len(repr(p)) < 400  # a summary, not headers


def test_a_single_model_may_be_given_as_a_path(fam, tmp_path):
    for models in (str(fam["chat"]), fam["chat"]):
        p = streammerge.plan(fam["base"], models, method="slerp")
        assert [str(m) for m in p.recipe.models] == [str(fam["chat"])]


def test_errors_name_the_python_arguments(fam, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PlanError) as info:
        streammerge.merge(fam["base"], [fam["chat"], fam["multilingual"]], out)
    message = str(info.value)
    assert "force=True" in message and "--force" not in message and "--out" not in message, message
    assert (out / "keep.txt").read_text() == "mine"


def test_several_problems_come_together_with_their_type(fam, tmp_path):
    with pytest.raises(ProblemsError) as info:
        streammerge.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", method="ties",
                          params={"density": 2}, dtype="int4", max_ram="lots")
    assert len(info.value.errors) == 3
    assert "density" in str(info.value) and "int4" in str(info.value) and "max_ram" in str(info.value)


@pytest.mark.parametrize("typo, near", [("max_ramm", "max_ram"), ("methd", "method")])
def test_an_unknown_option_names_the_nearest_and_lists_the_known_ones(typo, near, fam, tmp_path):
    with pytest.raises(TypeError) as info:
        streammerge.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", **{typo: "1GiB"})
    message = str(info.value)
    assert f"unexpected keyword argument '{typo}': did you mean '{near}'?" in message
    assert ("method, params, progress, handle_signals, notify, part, executor, ray_address, parts, resize_shards, "
            "dtype, exclude") in message
    assert "chunk_rows" not in message and "journal" not in message


def test_parameters_take_any_number_type_and_0_or_1_for_a_flag(fam, tmp_path):
    import numpy as np

    p = streammerge.plan(fam["base"], [fam["chat"], fam["multilingual"]], method="ties",
                         params={"density": np.float32(0.5), "weight": [1, np.float64(0.5)], "normalize": 0})
    assert p.params["density"] == (0.5, 0.5) and p.params["weight"] == (1.0, 0.5) and p.params["normalize"] is False


@pytest.mark.parametrize("cli, python", [
    ("pass --force to replace it", "pass force=True to replace it"),
    ("run `streammerge resume /x/out` (or the same command again) to continue, or add --restart to start over",
     "run the same merge(...) call again to continue, or add restart=True to start over"),
    ("with --exclude '^a\\.b$', then", "with exclude=['^a\\.b$'], then"),
    ("raise --max-ram to at least that", "raise max_ram to at least that"),
    ("or use --device cpu", "or use device='cpu'"),
])
def test_command_line_terms_become_python_terms(cli, python):
    assert pythonize(cli) == python


def test_plan_writes_nothing(fam, tmp_path):
    before = sorted(os.listdir(tmp_path))
    streammerge.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == before


def test_one_pattern_and_sizes_may_be_given_as_strings(tmp_path):
    fam = write_family(tmp_path / "fam", "tiny")
    p = api.plan(fam["base"], fam["chat"], method="task_arithmetic", exclude="model.norm", shard_size="100KB",
                 embedding_names="model.embed_tokens.weight")
    assert p.recipe.exclude == ("model.norm",) and p.recipe.embedding_names == ("model.embed_tokens.weight",)
    assert p.recipe.shard_size == 100_000 and len(p.shards) > 1
    with pytest.raises(StreamMergeError, match="shard_size"):
        api.plan(fam["base"], fam["chat"], method="task_arithmetic", shard_size="big")


def test_ctrl_c_in_a_python_merge_is_a_keyboard_interrupt_that_says_how_to_continue(tmp_path, monkeypatch):
    """``except Exception`` must not swallow Ctrl-C; ``except KeyboardInterrupt`` catches it, with the advice."""
    from helpers import interrupt_at_tensor

    fam = write_family(tmp_path / "fam", "tiny")
    interrupt_at_tensor(monkeypatch, 5)
    caught = None
    try:
        api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out")
    except Exception as exc:  # noqa: BLE001 (what the test guards against)
        pytest.fail(f"Ctrl-C arrived as an Exception: {exc!r}")
    except KeyboardInterrupt as exc:
        caught = exc
    assert caught is not None and "merge(...) call again" in str(caught) and "--" not in str(caught)
    monkeypatch.undo()
    assert api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out") == tmp_path / "out"


def test_a_torch_dtype_is_taken_as_the_output_dtype(tmp_path):
    import torch

    fam = write_family(tmp_path / "fam", "tiny")
    out = api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
