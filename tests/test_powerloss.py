"""Durability you can prove: every write and sync of a merge is recorded, the disk is rebuilt as a power cut at
many points would leave it (``tests/powerloss.py``: lost, zeroed, partly kept or torn unsynced data; lost or kept
unsynced folder entries), and at each point:

1. **promises are kept**: journal lines that were synced are still there (their folder entries were synced too);
2. **the journal does not lie**: every chunk line it holds describes bytes on disk with that CRC, every statistics
   line a state file that loads;
3. **nothing looks finished until it is**: an output folder that exists is complete, byte for byte;
4. **resume gives the exact bytes** of an uninterrupted run (continued with another chunking or budget), passes
   ``verify`` and leaves no work folder.

WIDEN (a statistics pass), TIES (two, and an emit cursor) and task arithmetic (none) are each cut at ~25 points
(every folder operation, then evenly spaced writes and syncs), under the four models in rotation. The journal
commits after every chunk here, so there are many durable states in between. Finally the write order is broken
on purpose, four ways (journal lines appended before the data they describe is synced; shards, statistics files or
the published folder not synced), to show the harness catches each.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from powerloss import VARIANTS, Disk, Recorder

from streammerge import api, fsio
from streammerge import journal as journal_module
from streammerge.examples import write_family
from streammerge.journal import Journal
from streammerge.manifest import crc
from streammerge.verify import verify_output

METHODS: dict[str, dict[str, Any]] = {"widen": {}, "ties": {"density": 0.5}, "task_arithmetic": {"weight": "0.7,0.4"}}
POINTS = 25  # crash points per method
CONTINUATIONS: list[dict[str, Any]] = [{"chunk_rows": 7}, {"max_ram": "1GiB"}, {"chunk_rows": 16}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {k: p.resolve() for k, p in write_family(tmp_path_factory.mktemp("family"), "tiny", dtype="bf16").items()}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: compute workers of every merge here: two, so the recorded operations interleave two tensors' chunks
THREADS = 2


def merge(fam: dict[str, Path], out: Path, method: str, **options: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notices about recomputed statistics are expected after some crashes
        options.setdefault("threads", THREADS)
        return api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, METHODS[method], **options)


def record(fam: dict[str, Path], root: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every write and sync of an uninterrupted merge into ``root/out``, committing the journal after each chunk."""
    root.mkdir()
    recorder = Recorder(fsio.backend, root)
    with monkeypatch.context() as m:
        m.setattr(fsio, "backend", recorder)
        m.setattr(journal_module, "COMMIT_SECONDS", 0.0)
        merge(fam, root / "out", method, chunk_rows=16)
    return recorder.ops


def crash_points(ops: list[tuple[Any, ...]], n: int) -> list[int]:
    """Prefix lengths to cut at: after every operation of the finishing phase (side files, manifest, publish,
    clean-up), around every rename, folder operations spread over the run, and evenly spaced cuts just before a
    sync (the write done, its sync not): about ``n`` during the merge, with the very start and end."""
    structural = [i + 1 for i, op in enumerate(ops) if op[0] in ("mkdir", "rename", "unlink", "syncdir")]
    renames = [i + 1 for i, op in enumerate(ops) if op[0] == "rename"]  # plan.json, then the publish
    side = next(i for i, op in enumerate(ops)
                if op[0] == "open" and "/model/" in op[2] and not op[2].endswith(".safetensors"))
    points = {0, len(ops), *renames, *(k - 1 for k in renames), *(k + 1 for k in renames),
              *structural[:: max(1, len(structural) // (n // 3))], *range(side, len(ops))}
    paths: dict[int, str] = {}
    syncs: dict[str, list[int]] = {}  # by kind of file: cut = ops[:i], the sync did not happen
    for i, op in enumerate(ops[:side]):
        if op[0] == "open":
            paths[op[1]] = op[2]
        elif op[0] == "sync":
            path = paths.get(op[1], "")
            kind = "shard" if path.endswith(".safetensors") and "/model/" in path else Path(path).parent.name
            syncs.setdefault(kind, []).append(i)
    for kind, at in syncs.items():  # every kind of sync (shard data, journal, statistics) gets its share of cuts
        points.update(at[:: max(1, len(at) // max(1, n // (2 * len(syncs))))])
    return sorted(points)


def journal_lies(work: Path, plan: Any) -> list[str]:
    """Lines of the journal in ``work`` that describe bytes which did not survive."""
    lies = []
    j = Journal(work)
    try:
        for t in plan.tensors:
            p = j.get(t.name)
            if p.chunks:
                shard = work / "model" / t.shard
                begin = next(s for s in plan.shards if s.filename == t.shard).offsets[t.name][0]
                data = shard.read_bytes() if shard.is_file() else b""
                running = 0
                for r0, r1, checksum in p.chunks:
                    running = crc(data[begin + r0 * t.out_row_bytes : begin + r1 * t.out_row_bytes], running)
                    if running != checksum:
                        lies.append(f"journal says {t.name} rows [{r0}, {r1}) are written, the bytes say otherwise")
                        break
            if p.state_file:
                _, problem = j.load_state(t.name)
                if problem:
                    lies.append(f"journal says the statistics of {t.name} are saved, but {problem}")
    finally:
        j.close()
    return lies


def same_folder(out: Path, ref: Path) -> list[str]:
    names, ref_names = sorted(p.name for p in out.iterdir()), sorted(p.name for p in ref.iterdir())
    if names != ref_names:
        return [f"files {names} != reference {ref_names}"]
    return [f"{n} differs from the reference" for n in names if (out / n).read_bytes() != (ref / n).read_bytes()]


def check_crash(ops: list[tuple[Any, ...]], k: int, variant: str, seed: int, fam: dict[str, Path], method: str,
                ref: Path, plan: Any, root: Path, continuation: dict[str, Any]) -> list[str]:
    """The four properties of the module docstring after a crash that keeps ``ops[:k]`` under ``variant``."""
    disk = Disk(ops[:k])
    disk.materialize(root, variant, random.Random(seed))
    out, work = root / "out", root / "out.streammerge-partial"
    problems: list[str] = []
    synced = disk.file("out.streammerge-partial/journal.jsonl")
    if synced is not None and synced.promised:
        kept = (work / "journal.jsonl").read_bytes() if (work / "journal.jsonl").is_file() else b""
        if not kept.startswith(synced.promised):
            problems.append(f"synced journal lines were lost ({len(kept)} of {len(synced.promised)} bytes survived)")
    if out.exists():  # published: the work folder's journal no longer describes anything
        problems += [f"published before complete: {p}" for p in same_folder(out, ref)]
    elif (work / "journal.jsonl").is_file():
        problems += journal_lies(work, plan)
    if out.exists() and not work.exists():
        return problems  # published and cleaned up: nothing to continue
    try:
        merge(fam, out, method, **continuation)
    except Exception as exc:  # noqa: BLE001 (any failure to continue is the finding)
        return problems + [f"resume failed: {type(exc).__name__}: {exc}"]
    problems += same_folder(out, ref)
    if work.exists():
        problems.append(f"{work} left behind")
    problems += [f"verify: {p}" for p in verify_output(out)[0]]
    return problems


def run_harness(fam: dict[str, Path], method: str, tmp: Path, monkeypatch: pytest.MonkeyPatch,
                points: int = POINTS) -> tuple[int, list[str]]:
    ref = merge(fam, tmp / "ref", method, chunk_rows=16)
    plan = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp / "plan-only", method, METHODS[method],
                    chunk_rows=16)
    ops = record(fam, tmp / "recorded", method, monkeypatch)
    assert (tmp / "recorded" / "out").is_dir() and not (tmp / "recorded" / "out.streammerge-partial").exists()
    failures = []
    cuts = crash_points(ops, points)
    for i, k in enumerate(cuts):
        variant, cont = VARIANTS[i % len(VARIANTS)], CONTINUATIONS[i % len(CONTINUATIONS)]
        where = f"cut after {k} of {len(ops)} operations ({ops[k - 1][0] if k else 'none'}), {variant}, {cont}"
        for p in check_crash(ops, k, variant, i, fam, method, ref, plan, tmp / f"crash{i}", cont):
            failures.append(f"[{method} {where}] {p}")
        shutil.rmtree(tmp / f"crash{i}", ignore_errors=True)
    return len(cuts), failures


@pytest.mark.parametrize("method", list(METHODS))
def test_power_loss_at_any_point_keeps_promises_and_resumes_to_the_same_bytes(method, fam, tmp_path, monkeypatch):
    n, failures = run_harness(fam, method, tmp_path, monkeypatch)
    assert n >= 50, f"only {n} crash points"
    assert not failures, "\n".join(failures[:30])


def _journal_before_data(m: pytest.MonkeyPatch) -> None:
    """Append the journal lines first and sync the shard data they describe only afterwards."""
    pending: list[list[int]] = []
    real_append = Journal._append_lines

    def append_then_sync(self: Journal, lines: list[str]) -> None:
        real_append(self, lines)
        while pending:
            for fd in pending.pop():
                fsio.sync_data(fd)

    m.setattr(Journal, "_sync_data", staticmethod(lambda fds: pending.append(list(fds))))
    m.setattr(Journal, "_append_lines", append_then_sync)


def _skip_folder_sync(folder_name: str) -> Any:
    """Never fsync folders named ``folder_name``."""

    def apply(m: pytest.MonkeyPatch) -> None:
        real = fsio.sync_dir
        m.setattr(fsio, "sync_dir", lambda path: None if Path(path).name == folder_name else real(path))

    return apply


def _publish_unsynced_folder(m: pytest.MonkeyPatch) -> None:
    """Rename the finished folder into place without fsyncing its entries first."""
    from streammerge import output, workfolder

    def publish(model: Path, out: Path, force: bool) -> None:
        with pytest.MonkeyPatch.context() as inner:
            real = fsio.sync_dir
            inner.setattr(fsio, "sync_dir", lambda path: None if Path(path) == model else real(path))
            output.publish(model, out, force)

    m.setattr(workfolder, "publish", publish)


def _unsynced_state_files(m: pytest.MonkeyPatch) -> None:
    """Write statistics files without fsyncing them (their folder entry is still synced)."""
    real = fsio.write_file

    def write_file(path: Path, data: bytes, sync_folder: bool = False) -> None:
        if path.parent.name != "state":
            return real(path, data, sync_folder)
        fd = fsio.open_file(path, create=True, truncate=True)
        fsio.pwrite_all(fd, data, 0)
        fsio.close(fd)
        if sync_folder:
            fsio.sync_dir(path.parent)

    m.setattr(fsio, "write_file", write_file)


#: a broken write order -> what the harness must then report
MUTANTS: dict[str, tuple[Any, str, str]] = {
    "journal-before-data": (_journal_before_data, "task_arithmetic", "the bytes say otherwise"),
    "shards-created-without-folder-sync": (_skip_folder_sync("model"), "task_arithmetic", "the bytes say otherwise"),
    "statistics-not-synced": (_unsynced_state_files, "widen", "statistics of"),
    "published-before-its-folder-is-synced": (_publish_unsynced_folder, "task_arithmetic", "published before complete"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_harness_catches_a_broken_write_order(mutant, fam, tmp_path, monkeypatch):
    """Break the order on purpose; some crash point must then find the lie or the half-published output."""
    breaks, method, finding = MUTANTS[mutant]
    breaks(monkeypatch)
    _, failures = run_harness(fam, method, tmp_path, monkeypatch)
    assert any(finding in f for f in failures), f"{mutant} went unnoticed:\n" + "\n".join(failures[:10])
