"""A merge split into parts (``merge --part K/N``, ``finalize``): byte-identical to one process, whatever N.

* The split (``Plan.units``): every shard file in exactly one part, balanced by bytes, the same whatever the budget,
  a tied head with its embedding; too many parts are refused with the shard size that would work, which
  ``--resize-shards`` then takes.
* widen, ties and task_arithmetic in N = 1, 2, 3 parts (each part with its own chunking): the output folder equals a
  single-process merge file for file, the index, manifest, model card and recipe included.
* Parts run as separate processes at the same time, one of them killed (SIGKILL) mid-part and continued.
* ``finalize`` refuses, naming the part, while a part is missing, unfinished, damaged on disk, or running; nothing
  is changed and the parts can still be completed.
* A work folder of another kind (one process, another N, other options) is refused by name; --redo-changed and
  --restart do what they say.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import distributed_helpers
import pytest
from distributed_helpers import (
    METHODS,
    SHARD,
    assert_same_output,
    cli,
    cli_env,
    cli_start,
    family_args,
    merge_argv,
    partial,
    reference,
    tie_head,
)

from streammerge import api
from streammerge.errors import StreamMergeError
from streammerge.journal import ResumeError
from streammerge.locks import LOCK_FILE
from streammerge.parts import PartError, fit_shard_size, parse_part, plan_parts, shard_groups
from streammerge.recipe import Recipe
from streammerge.workfolder import BusyError

fam, refs = distributed_helpers.fam, distributed_helpers.refs  # the shared fixtures


def part(fam: dict[str, Path], out: Path, method: str, label: str, **options: object) -> Path:
    base, models = family_args(fam)
    options.setdefault("shard_size", SHARD)
    return api.merge(base, models, out, method=method, params=METHODS[method], part=label, **options)


def plan_of(fam: dict[str, Path], **options: object):  # type: ignore[no-untyped-def]
    base, models = family_args(fam)
    return api.plan(base, models, None, method="widen", **{"shard_size": SHARD, **options})


# ------------------------------------------------------------------------------------------------- the split


def test_the_split_covers_every_shard_once_balanced_and_independent_of_the_budget(fam):
    p = plan_of(fam)
    assert len(p.shards) == 4
    for n in (1, 2, 3, 4):
        units = p.units(n)
        assert [u.index for u in units] == list(range(1, n + 1)) and {u.count for u in units} == {n}
        shards = [s for u in units for s in u.shards]
        assert sorted(shards) == sorted(s.filename for s in p.shards)  # each once
        assert sorted(t for u in units for t in u.tensors) == sorted(t.name for t in p.tensors)
        for u in units:
            assert all(p.tensor(t).shard in u.shards for t in u.tensors)
        # the same split whatever the budget or chunking (every machine computes it on its own)
        assert plan_of(fam, max_ram="600KiB").units(n) == units
        assert plan_of(fam, chunk_rows=3).units(n) == units
    costs = [u.cost for u in p.units(2)]
    assert max(costs) <= 1.2 * min(costs), costs  # 4 shards of about the same size: 2 + 2


def test_a_tied_head_goes_to_the_part_of_its_embedding(fam, tmp_path):
    tied = {k: tmp_path / k for k in fam}
    for k, folder in fam.items():
        shutil.copytree(folder, tied[k])
    tie_head(tied)
    p = plan_of(tied)
    head = p.tensor("lm_head.weight")
    assert head.rule.value == "tied_copy" and head.copy_of == "model.embed_tokens.weight"
    embed = p.tensor("model.embed_tokens.weight")
    assert head.shard != embed.shard  # first and last file: one group
    assert len(shard_groups(p)) == len(p.shards) - 1
    for n in (2, 3):
        unit = next(u for u in p.units(n) if "lm_head.weight" in u.tensors)
        assert embed.shard in unit.shards
    with pytest.raises(PartError, match="tied head stays with its embedding"):
        p.units(len(p.shards))
    # and the bytes: 3 parts equal one process
    ref = reference(tied, tmp_path / "ref", "widen")
    for k in ("1/3", "3/3", "2/3"):
        part(tied, tmp_path / "out", "widen", k)
    api.finalize(tmp_path / "out")
    assert_same_output(tmp_path / "out", ref)


def test_too_many_parts_are_refused_with_the_shard_size_that_works(fam):
    p = plan_of(fam)
    with pytest.raises(PartError, match=r"5 parts need at least 5 output shard files .* has 4 .* --shard-size (\d+)"):
        p.units(5)
    size = fit_shard_size(p, 5)
    assert size is not None and len(shard_groups(plan_of(fam, shard_size=size))) >= 5
    # a single tensor cannot be split: past one file per tensor there is no size that works
    assert fit_shard_size(p, 10_000) is None
    with pytest.raises(PartError, match="no shard size gives"):
        p.units(10_000)


@pytest.mark.parametrize("text", ["3", "0/3", "4/3", "a/b", "1/0", "-1/2"])
def test_a_bad_part_is_refused(text):
    with pytest.raises(PartError, match="--part"):
        parse_part(text)


def test_resize_shards_gives_each_part_a_file_and_records_the_size(fam, tmp_path):
    base, models = family_args(fam)
    recipe = Recipe(base=base, models=tuple(models), out=tmp_path / "out", method="widen")  # default 5GB: 1 file
    with pytest.raises(PartError, match="--resize-shards"):
        plan_parts(recipe, 3)
    p = plan_parts(recipe, 3, resize_shards=True)
    assert len(shard_groups(p)) >= 3
    for k in ("1/3", "2/3", "3/3"):
        api.merge(base, models, tmp_path / "out", method="widen", part=k, resize_shards=True)
    api.finalize(tmp_path / "out")
    size = p.recipe.shard_size
    assert f"shard_size: {size}" in (tmp_path / "out" / "streammerge_recipe.yaml").read_text()
    ref = api.merge(base, models, tmp_path / "ref", method="widen", shard_size=size)
    assert_same_output(tmp_path / "out", ref)


# ------------------------------------------------------------------------------------- byte identity, N parts


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_parts_then_finalize_equal_one_process(method, n, fam, refs, tmp_path):
    out = tmp_path / "out"
    # parts in reverse order, each with its own chunking and budget: none of that changes a byte
    for k in range(n, 0, -1):
        part(fam, out, method, f"{k}/{n}", chunk_rows=[None, 3, 7][k - 1])
        if k > 1:
            assert not out.exists()
            with pytest.raises(PartError, match=f"part 1/{n} .* has not run"):
                api.finalize(out)
    assert not out.exists()
    assert api.finalize(out) == out
    assert_same_output(out, refs[method])
    assert api.finalize(out) == out  # finalized before: nothing to do


def test_parts_as_separate_processes_at_once_one_killed_and_continued(fam, refs, tmp_path):
    """Three part processes start together (they race to create the work folder); part 2 is SIGKILLed mid-part,
    finalize names it as unfinished, and rerunning it continues from its journal."""
    out = tmp_path / "out"
    log = tmp_path / "events"
    probe = cli(*merge_argv(fam, tmp_path / "probe", "ties", "--part", "2/3", "--chunk-rows", "2"),
                env=cli_env(STREAMMERGE_CHECKPOINT_LOG=str(log)))
    assert probe.returncode == 0, probe.stderr
    events = log.read_text().split()
    chunks = [i + 1 for i, e in enumerate(events) if e == "chunk-written"]
    kill_at = chunks[len(chunks) // 2]
    procs = {k: cli_start(*merge_argv(fam, out, "ties", "--part", f"{k}/3", "--chunk-rows", "2"),
                          env=cli_env(**({"STREAMMERGE_KILL_AT": str(kill_at)} if k == 2 else {})))
             for k in (1, 2, 3)}
    codes = {k: p.wait(300) for k, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    assert codes == {1: 0, 2: -9, 3: 0}
    journal = partial(out) / "parts" / "part-00002-of-00003" / "journal.jsonl"
    assert journal.read_text().count('"r0"') > 0  # some of its work is journaled
    r = cli("finalize", out)
    assert r.returncode == 1 and "part 2/3 is unfinished" in r.stderr, r.stderr
    r = cli("resume", out, "--part", "2/3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parts_left"] == [] and json.loads(r.stdout)["summary"]["tensors_resumed"] > 0
    r = cli("finalize", out)
    assert r.returncode == 0 and "merged model written to" in r.stdout, r.stderr
    assert_same_output(out, refs["ties"])


# --------------------------------------------------------------------------------------- finalize refuses


def test_finalize_refuses_a_damaged_part_and_the_part_repairs_it(fam, refs, tmp_path):
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, "widen", k)
    assert (partial(out) / "parts" / "part-00002-of-00002" / "verified.json").is_file()  # checked as it ended
    shard = partial(out) / "model" / "model-00002-of-00004.safetensors"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x5A
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as if the disk changed it, not a write
    with pytest.raises(PartError, match=r"part 2/2: .* in model-00002-of-00004.safetensors does not match"):
        api.finalize(out, recheck=True)  # reads every file again
    os.utime(shard)  # a file modified since its part checked it is read again anyway
    with pytest.raises(PartError, match=r"part 2/2: .* in model-00002-of-00004.safetensors does not match"):
        api.finalize(out)
    assert not out.exists()
    with pytest.warns(UserWarning, match="do not match the checksum"):
        part(fam, out, "widen", "2/2")  # verifies its journaled chunks and merges the damaged one again
    api.finalize(out)
    assert_same_output(out, refs["widen"])


def test_finalize_refuses_while_a_part_runs_and_without_parts(fam, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PartError, match="nothing to finalize"):
        api.finalize(out)
    part(fam, out, "widen", "1/2")
    fd = os.open(partial(out) / LOCK_FILE, os.O_RDWR)  # what a running part holds
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.raises(BusyError, match="still running"):
            api.finalize(out)
    finally:
        os.close(fd)
    with pytest.raises(PartError, match=r"part 2/2 .* has not run"):
        api.finalize(out)


def test_another_kind_of_work_folder_is_refused_by_name(fam, refs, tmp_path, monkeypatch):
    from helpers import interrupt_at_tensor

    out = tmp_path / "out"
    base, models = family_args(fam)
    interrupt_at_tensor(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        api.merge(base, models, out, method="widen", shard_size=SHARD)  # a single-process run, interrupted
    monkeypatch.undo()
    with pytest.raises(PartError, match="merge run as one process"):
        part(fam, out, "widen", "1/2")
    with pytest.raises(PartError, match="merge run as one process"):
        api.finalize(out)
    api.merge(base, models, out, method="widen", shard_size=SHARD)  # it continues as it was
    assert_same_output(out, refs["widen"])

    out = tmp_path / "split"
    part(fam, out, "widen", "1/3")
    with pytest.raises(PartError, match="split into 3 parts"):
        part(fam, out, "widen", "1/2")
    with pytest.raises(ResumeError, match="split into 3 parts"):
        api.merge(base, models, out, method="widen", shard_size=SHARD)
    with pytest.raises(ResumeError, match="different inputs or options; changed: .*redo_changed=True"):
        part(fam, out, "ties", "2/3")
    # the whole merge in one process instead: --restart discards the parts
    api.merge(base, models, out, method="widen", shard_size=SHARD, restart=True)
    assert_same_output(out, refs["widen"])


@pytest.mark.filterwarnings("ignore:changed since the interrupted run")
def test_redo_changed_parts_give_the_new_merge(fam, refs, tmp_path):
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, "widen", k)
    with pytest.raises(StreamMergeError):
        part(fam, out, "ties", "1/2")
    for k in ("1/2", "2/2"):
        part(fam, out, "ties", k, redo_changed=True)
    api.finalize(out)
    assert_same_output(out, refs["ties"])


def test_restart_redoes_only_its_own_part(fam, refs, tmp_path):
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, "task_arithmetic", k)
    own = partial(out) / "parts" / "part-00001-of-00002" / "journal.jsonl"
    other = partial(out) / "parts" / "part-00002-of-00002" / "journal.jsonl"
    before = other.read_bytes()
    part(fam, out, "task_arithmetic", "1/2", restart=True)
    assert other.read_bytes() == before and own.is_file()
    api.finalize(out)
    assert_same_output(out, refs["task_arithmetic"])


def test_cli_part_finalize_and_messages(fam, refs, tmp_path):
    out = tmp_path / "out"
    r = cli(*merge_argv(fam, out, "widen", "--part", "1/2"))
    assert r.returncode == 0, r.stderr
    assert "part 1/2 done" in r.stdout and "part 2/2 (missing)" in r.stdout
    r = cli("finalize", out)
    assert r.returncode == 1 and "part 2/2" in r.stderr and "has not run" in r.stderr
    r = cli(*merge_argv(fam, out, "widen", "--part", "2/2", "--json"))
    assert r.returncode == 0 and json.loads(r.stdout)["parts_left"] == []
    r = cli("finalize", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"out": str(out), "already_complete": False}
    assert_same_output(out, refs["widen"])
    r = cli(*merge_argv(fam, tmp_path / "x", "widen", "--part", "5/4"))
    assert r.returncode == 1 and "K counts from 1 to N" in r.stderr
    r = cli(*merge_argv(fam, tmp_path / "x", "widen", "--part", "1/2", "--executor", "ray"))
    assert r.returncode == 2 and "give one of them" in r.stderr
    r = cli(*merge_argv(fam, tmp_path / "x", "widen", "--resize-shards"))
    assert r.returncode == 2 and "--resize-shards goes with" in r.stderr
    assert not (tmp_path / "x").exists() and not partial(tmp_path / "x").exists()


def test_finalize_on_a_cpu_machine_publishes_parts_run_on_gpus(fam, tmp_path, monkeypatch):
    """finalize computes nothing: it plans on the CPU and takes the kind of device from the parts' record, so parts
    run on GPU nodes are finalized anywhere (the manifest names the parts' device). The GPU is simulated by the
    engine document the plan is fingerprinted with."""
    import streammerge.planner
    from streammerge.fingerprint import engine_document

    def on_gpu(device: str, *args: object) -> dict:
        return engine_document("cuda", *args)  # type: ignore[arg-type]

    monkeypatch.setattr(streammerge.planner, "engine_document", on_gpu)
    ref = reference(fam, tmp_path / "ref", "task_arithmetic")
    for k in ("1/2", "2/2"):
        part(fam, tmp_path / "out", "task_arithmetic", k)
    monkeypatch.undo()  # finalize here, "on a CPU machine"
    api.finalize(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "streammerge-manifest.json").read_text())["engine"]["device"] == "cuda"
    assert_same_output(tmp_path / "out", ref)


def test_a_moved_work_folder_is_refused_not_published_elsewhere(fam, tmp_path):
    """A work folder moved or copied to another output's name names its own output in its recipe and journal:
    finalize and resume refuse it, and nothing is written at either name."""
    out, moved = tmp_path / "out", tmp_path / "moved"
    for k in (1, 2):
        part(fam, out, "task_arithmetic", f"{k}/2")
    partial(out).rename(partial(moved))
    for args in (("finalize", moved), ("resume", moved, "--part", "1/2"), ("resume", moved)):
        r = cli(*args)
        assert r.returncode != 0 and "cannot be moved or copied" in r.stderr and str(out) in r.stderr, r.stderr
    assert not out.exists() and not moved.exists() and partial(moved).is_dir()
