"""Merges in parts, the parts that need no Ray: locks, limits, budgets, the split shown by ``plan``, plugins.

* Locks: the parts lock regular files opened for writing, so a file system that refuses ``flock`` on a folder or on
  a read-only descriptor (as NFS, which emulates flock with byte-range locks, does) runs parts and finalizes; a lock
  file held by another process is a running part; each errno meaning "this file system cannot lock" is refused
  by name (never "busy"), each meaning "another process holds it" is busy. (No NFS mount here: the test machine's
  kernel has no NFS, so the file system's answers are stood in for by a wrapped ``fcntl.flock``.)
* ``--resize-shards`` past one tensor per file: the refusal names the most parts any shard size gives, and that
  many parts work while one more does not.
* ``resume OUT --part K/N`` takes the budget given now, else part K's own, never the first part's.
* ``plan --parts N``: each part's files, tensors and bytes and the balance, in text and JSON.
* A method plugin missing where ``finalize`` or ``resume`` runs is named with its distribution and version.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

import distributed_helpers
import pytest
from distributed_helpers import (
    METHODS,
    SHARD,
    assert_same_output,
    cli,
    family_args,
    partial,
    reference,
    tie_head,
)

from streammerge import api
from streammerge.examples import write_example, write_family
from streammerge.locks import LOCK_FILE, OWNER, LockUnsupportedError
from streammerge.parts import PartError, plan_parts
from streammerge.recipe import Recipe
from streammerge.workfolder import BusyError

fam, refs, takefirst = distributed_helpers.fam, distributed_helpers.refs, distributed_helpers.takefirst  # fixtures


def part(fam: dict[str, Path], out: Path, label: str, method: str = "task_arithmetic", **options: object) -> Path:
    base, models = family_args(fam)
    options.setdefault("shard_size", SHARD)
    return api.merge(base, models, out, method=method, params=METHODS.get(method, {}), part=label, **options)


# ----------------------------------------------------------------------------------------------------- locks


def _nfs_like_flock(real):  # type: ignore[no-untyped-def]
    """``fcntl.flock`` as NFS gives it (flock emulated with byte-range locks): EBADF on a folder, or on a descriptor
    opened read-only, for any lock."""

    def flock(fd: int, operation: int) -> None:
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if read_only or os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(fd, operation)

    return flock


def test_merges_run_and_finalize_where_only_files_opened_for_writing_can_be_locked(fam, refs, tmp_path, monkeypatch):
    ref = refs["task_arithmetic"]
    monkeypatch.setattr(fcntl, "flock", _nfs_like_flock(fcntl.flock))
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, k)
    for folder in (partial(out), partial(out) / "parts" / "part-00001-of-00002"):
        assert (folder / LOCK_FILE).is_file()
    api.finalize(out)
    assert_same_output(out, ref)
    one = reference(fam, tmp_path / "one", "task_arithmetic")  # one process: the same lock file
    assert_same_output(one, ref)
    assert not {LOCK_FILE, OWNER} & {p.name for p in one.rglob("*")}, "the lock stays out of the output"
    example = write_example(tmp_path / "example")[0]["base"].parent
    assert not {LOCK_FILE, OWNER} & {p.name for p in example.rglob("*")}


def test_a_held_lock_file_is_a_running_part(fam, tmp_path):
    """Another process's lock on a part's lock file (a part running on another machine) blocks that part and
    finalize, and nothing else."""
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, k)
    fd = os.open(partial(out) / "parts" / "part-00002-of-00002" / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts as another process's would
        with pytest.raises(BusyError, match="part 2/2 of .* is being run by pid"):
            part(fam, out, "2/2")
        with pytest.raises(PartError, match=r"part 2/2 is still running \(pid"):
            api.finalize(out)
        part(fam, out, "1/2")  # the other part is free
    finally:
        os.close(fd)
    assert api.finalize(out) == out


CANNOT_LOCK = [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL, errno.EIO]
HELD_ELSEWHERE = [errno.EWOULDBLOCK, errno.EACCES]


def _flock_failing_with(code: int):  # type: ignore[no-untyped-def]
    def flock(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    return flock


@pytest.fixture(scope="module")
def one_part_done(fam: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output whose part 1/2 is done (its work folder has a record), part 2/2 not."""
    out = tmp_path_factory.mktemp("onepart") / "out"
    part(fam, out, "1/2")
    return out


@pytest.mark.parametrize("code", CANNOT_LOCK, ids=lambda c: errno.errorcode[c])
def test_a_file_system_that_cannot_lock_is_named_not_taken_for_a_running_part(code, fam, one_part_done, tmp_path,
                                                                               monkeypatch):
    name = errno.errorcode[code]
    monkeypatch.setattr(fcntl, "flock", _flock_failing_with(code))
    said = (rf"cannot lock .*{LOCK_FILE}: the file system it is on refused to lock a file \({name}: .*Mount that file "
            r"system with lock support .* or give (--)?out on a local disk")  # (the API names out=)
    with pytest.raises(LockUnsupportedError, match=said):
        part(fam, tmp_path / "fresh", "1/2")
    with pytest.raises(LockUnsupportedError, match=said):
        part(fam, one_part_done, "2/2")
    with pytest.raises(LockUnsupportedError, match=said):
        api.finalize(one_part_done)
    monkeypatch.undo()
    assert not (partial(one_part_done) / "parts" / "part-00002-of-00002").exists()  # nothing of part 2 was written


@pytest.mark.parametrize("code", HELD_ELSEWHERE, ids=lambda c: errno.errorcode[c])
def test_a_lock_held_elsewhere_is_busy(code, fam, one_part_done, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _flock_failing_with(code))
    with pytest.raises(BusyError, match="another merge or finalize .* is using"):
        part(fam, one_part_done, "2/2")
    with pytest.raises(BusyError, match="is still running; wait for every part to finish, then finalize"):
        api.finalize(one_part_done)


# ------------------------------------------------------------------------------------------ the most parts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head"])
def test_resize_shards_names_the_most_parts_any_shard_size_gives(tied, fam, tmp_path):
    if tied:  # a stored tied head stays with its embedding: one part fewer than tensors
        fam = write_family(tmp_path / "tied", "tiny", dtype="bf16")
        tie_head(fam)
    base, models = family_args(fam)
    recipe = Recipe(base=base, models=tuple(models), out=tmp_path / "out", method="task_arithmetic")  # 5GB: 1 file
    tensors = len(api.plan(base, models, None, method="task_arithmetic").tensors)
    most = tensors - 1 if tied else tensors
    with pytest.raises(PartError) as refused:
        plan_parts(recipe, 40, resize_shards=True)
    said = str(refused.value)
    assert re.search(rf"no shard size gives 40: even one tensor per file.* makes only {most}, so this merge has at "
                     rf"most {most} parts: use at most {most} with --resize-shards", said), said
    assert len(plan_parts(recipe, most, resize_shards=True).units(most)) == most  # that many work
    with pytest.raises(PartError, match=f"at most {most} parts"):
        plan_parts(recipe, most + 1, resize_shards=True)  # and no more


def test_the_cli_states_the_most_parts(fam, tmp_path):
    base, models = family_args(fam)
    tensors = len(api.plan(base, models, None, method="widen").tensors)
    r = cli("merge", "--base", base, "--model", models[0], "--model", models[1], "--out", tmp_path / "out",
            "--part", "1/40", "--resize-shards", "-q")
    assert r.returncode == 1, r.stderr
    assert f"this merge has at most {tensors} parts: use at most {tensors} with --resize-shards" in r.stderr, r.stderr
    assert not partial(tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- resume --part budgets


def _budget_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("budget "))


def test_resume_part_takes_the_budget_given_or_its_own_never_the_first_parts(fam, refs, tmp_path):
    from helpers import interrupt_merge_after_chunks

    out = tmp_path / "out"
    part(fam, out, "1/3", max_ram="600KiB")  # the first part: its budget is in the work folder's record
    interrupt_merge_after_chunks(3, lambda: part(fam, out, "2/3", max_ram="700KiB"))  # part 2 ran, with its own
    assert json.loads((partial(out) / "parts" / "part-00002-of-00003" / "plan.json").read_text())["recipe"][
        "max_ram"] == "700KiB"
    record = json.loads((partial(out) / "plan.json").read_text())
    assert record["recipe"]["max_ram"] == "600KiB"
    # part 3 never ran: this machine's default budget, not part 1's
    r = cli("resume", out, "--part", "3/3")
    assert r.returncode == 0, r.stderr
    assert "600.0 KiB" not in _budget_line(r.stderr) and "--max-ram" not in _budget_line(r.stderr), r.stderr
    # part 2 ran with its own: it continues with it
    r = cli("resume", out, "--part", "2/3")
    assert r.returncode == 0, r.stderr
    assert "700.0 KiB" in _budget_line(r.stderr), r.stderr
    # given now: that one
    r = cli("resume", out, "--part", "2/3", "--max-ram", "800KiB")
    assert r.returncode == 0 and "800.0 KiB" in _budget_line(r.stderr), r.stderr
    assert cli("finalize", out).returncode == 0
    assert_same_output(out, refs["task_arithmetic"])


# --------------------------------------------------------------------------------------------- plan --parts


def test_plan_parts_shows_the_split_and_its_balance(fam, tmp_path):
    base, models = family_args(fam)
    inputs = ["--base", base, "--model", models[0], "--model", models[1], "--method", "widen"]
    p = api.plan(base, models, None, method="widen", shard_size=SHARD)
    units = p.units(3)
    r = cli("plan", *inputs, "--shard-size", SHARD, "--parts", "3", "--json")
    assert r.returncode == 0, r.stderr
    split = json.loads(r.stdout)["split"]
    assert split["parts"] == 3 and split["files"] == len(p.shards)
    assert [u["part"] for u in split["units"]] == ["1/3", "2/3", "3/3"]
    assert [u["shards"] for u in split["units"]] == [list(u.shards) for u in units]
    assert [u["bytes"] for u in split["units"]] == [u.cost for u in units]
    assert [u["files"] for u in split["units"]] == [len(u.shards) for u in units]
    assert [u["tensors"] for u in split["units"]] == [len(u.tensors) for u in units]
    sizes = {s.filename: s.size for s in p.shards}
    assert [u["output_bytes"] for u in split["units"]] == [sum(sizes[s] for s in u.shards) for u in units]
    total, largest = sum(u.cost for u in units), max(u.cost for u in units)
    assert split["bytes"] == total and split["largest"] == largest
    assert split["speedup_bound"] == pytest.approx(total / largest)
    assert split["imbalance"] == pytest.approx(largest * 3 / total)

    r = cli("plan", *inputs, "--shard-size", SHARD, "--parts", "3")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^split +3 part\(s\) of whole shard files \(4 in all\)", r.stdout, re.M), r.stdout
    for u in units:
        assert re.search(rf"^  part {u.index}/3 .* {len(u.shards)} file\(s\), {len(u.tensors)} tensor\(s\)", r.stdout,
                         re.M), r.stdout
    assert re.search(rf"^balance .* 3 parts at once are at most {total / largest:.2f}x as fast as one", r.stdout, re.M)

    r = cli("plan", *inputs, "--parts", "3")  # default 5GB shards: one file
    assert r.returncode == 1 and "3 parts need at least 3 output shard files" in r.stderr, r.stderr
    r = cli("plan", *inputs, "--parts", "3", "--resize-shards", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["split"]["files"] == 3 and len(got["shards"]) == 3
    assert "lowered --shard-size" in cli("plan", *inputs, "--parts", "3", "--resize-shards").stdout
    r = cli("plan", *inputs, "--resize-shards")
    assert r.returncode == 2 and "--resize-shards goes with --parts N" in r.stderr


# --------------------------------------------------------------------------------------------- plugins


def test_finalize_and_resume_without_the_plugin_name_it(takefirst, fam, tmp_path):
    takefirst.install("1.2.3")
    out = tmp_path / "out"
    for k in ("1/2", "2/2"):
        part(fam, out, k, method="takefirst")
    takefirst.remove()  # the finalize machine lacks it
    said = (r"the merge method 'takefirst' comes from the plugin sm-takefirst 1\.2\.3 \(a distribution declaring it in "
            r"the 'streammerge.methods' entry point group\), as recorded when the merge was planned, and it is not "
            r"installed on this machine.*: pip install 'sm-takefirst==1\.2\.3' on this machine")
    with pytest.raises(PartError, match="cannot finalize .* here .*" + said):
        api.finalize(out)
    r = cli("resume", out, "--part", "1/2")  # a fresh interpreter without it
    assert r.returncode == 1 and re.search(said, r.stderr), r.stderr
    takefirst.install("1.2.4")  # another version
    with pytest.raises(PartError, match=r"and on this machine it comes from sm-takefirst 1\.2\.4 instead: pip install "
                                        r"'sm-takefirst==1\.2\.3'"):
        api.finalize(out)
    takefirst.remove()
    takefirst.install("1.2.3")
    assert api.finalize(out) == out
