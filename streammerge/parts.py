"""Work units: one merge split into parts that each own whole output shard files, run anywhere, then finalized.

The plan fixes every output shard (its header and offsets) before any byte is read, so the work splits along the
shards. :func:`split_units` groups them into N units balanced by bytes (each tensor's input read once plus its
output; neither depends on the budget or the machine, so every machine computes the same split), keeping a tied
head with the embedding whose merged bytes it copies. It is the one place this is decided: a part, ``finalize`` and
the Ray executor all call it (``Plan.units``), and the split is recorded in the work folder and checked against it.
When there are fewer shard files than parts, :func:`fit_shard_size` finds the largest ``--shard-size`` that gives
each part one (used only when the user allows it: the layout, and so the bytes, follow the shard size).

``merge --part K/N`` runs unit K (:class:`PartFolder`): it writes only its shards into the shared
``OUT.streammerge-partial/model/``, with its own journal, statistics and fingerprint record. Parts run at the same
time on different machines (each holds a shared flock on the work folder's lock file and an exclusive one on its
own folder's: regular files opened for writing, which network file systems can lock; a file system that cannot is
refused by name, never taken for a running part) and each resumes on its own. :func:`finalize` checks that every
part is complete and its bytes match their journaled CRC-32s, then writes the index, side files, manifest and model
card and publishes the folder, exactly as a single-process merge does (the same bytes, file for file)::

    OUT.streammerge-partial/
      plan.json          the merge: recipe, fingerprint, number of parts and each part's shards (the first part
                         writes it; a part run with --redo-changed updates it)
      model/             every part's shards, then the side files finalize writes
      parts/part-00001-of-00003/
        plan.json        the fingerprint this part's journal was made under
        journal.jsonl    this part's journal (see streammerge.journal), state/ its statistics, owner its process
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import fsio, locks
from .errors import MethodError, StreamMergeError
from .faults import checkpoint
from .fingerprint import changed_tensors, describe_changes, engine_changes, run_fingerprint
from .journal import Journal, ResumeError, TensorProgress, write_json_atomic
from .locks import Held, LockUnsupportedError, holder
from .manifest import MANIFEST, crc
from .methods import ENTRY_POINT_GROUP, Rule, method_origin
from .output import check_destination, check_not_moved, work_folder_for
from .planner import Plan, TensorPlan
from .recipe import Recipe
from .units import format_size
from .workfolder import BusyError, WorkFolder, _check_space
from .writer import OutTensor, ShardFile, split_into_shards

Notify = Callable[[str], None]

#: the folder of the work folder that holds one folder per part
PARTS_DIR = "parts"
PLAN_FILE = "plan.json"
#: in a part's folder: the stamps of its shard files when it had checked their bytes
VERIFIED = "verified.json"


class PartError(StreamMergeError):
    """A split merge cannot go on: a bad ``--part``, more parts than shard files, a work folder that holds another
    kind of run, or (at ``finalize``) a part that is missing, unfinished or damaged."""


# ------------------------------------------------------------------------------------------------- the split


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N), 1 ≤ K ≤ N; raises :class:`PartError` saying how to write it."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise PartError(f"--part {text!r}: write K/N, e.g. --part 2/4 for the second of four parts")
    k, n = int(m[1]), int(m[2])
    if n < 1 or not 1 <= k <= n:
        raise PartError(f"--part {text}: K counts from 1 to N (here 1 to {max(n, 1)})")
    return k, n


def part_folder(k: int, n: int) -> str:
    """The folder name of part ``k`` of ``n`` under the work folder's ``parts/``."""
    return f"part-{k:05d}-of-{n:05d}"


@dataclass(frozen=True)
class WorkUnit:
    """Part ``index`` of ``count`` (1-based): the output shard files it owns and their tensors, in the plan's order;
    ``cost`` is its bytes (inputs read once plus output written), the measure the split balances."""

    index: int
    count: int
    shards: tuple[str, ...]
    tensors: tuple[str, ...]
    cost: int

    @property
    def label(self) -> str:
        """``K/N``, as ``--part`` takes it."""
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        """This part's folder name under ``parts/``."""
        return part_folder(self.index, self.count)

    def describe(self) -> str:
        """``part 2/3 (model-00002-of-00005.safetensors, ...; 12 tensors, 1.2 GiB)``"""
        files = ", ".join(self.shards[:2]) + (f", ... ({len(self.shards)} files)" if len(self.shards) > 2 else "")
        return f"part {self.label} ({files}; {len(self.tensors)} tensors, {format_size(self.cost)})"

    def to_json(self) -> dict[str, Any]:
        return {"part": self.label, "shards": list(self.shards), "tensors": len(self.tensors), "bytes": self.cost}


def tensor_cost(t: TensorPlan, out_bytes: int) -> int:
    """Bytes a tensor moves whatever the budget: its inputs read once (a tied head reads its embedding's output)
    plus ``out_bytes`` written."""
    read = out_bytes if t.rule is Rule.TIED_COPY else t.rows * t.read_bytes_per_row
    return read + out_bytes


def _joined(count: int, ties: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Shard indexes ``0..count-1`` in the groups that must go to one part: each ``(a, b)`` of ``ties`` (a tied
    head's shard and its embedding's) joins two shards' groups. Each group in index order, groups ordered by their
    first shard."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in ties:
        a, b = root(a), root(b)
        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def shard_groups(plan: Plan) -> list[tuple[str, ...]]:
    """The plan's shards in groups that must go to one part (a tied head and the embedding it copies), each group
    in the plan's order, groups ordered by their first shard."""
    order = [s.filename for s in plan.shards]
    index = {name: i for i, name in enumerate(order)}
    ties = [(index[t.shard], index[plan.tensor(t.copy_of).shard]) for t in plan.tensors if t.copy_of]
    return [tuple(order[i] for i in g) for g in _joined(len(order), ties)]


def split_units(plan: Plan, n: int) -> tuple[WorkUnit, ...]:
    """Split ``plan`` into ``n`` units owning whole shard files, balanced by bytes: the costliest group of shards
    goes to the least loaded unit (ties to the lower index), then units are numbered by their first shard.
    Raises :class:`PartError` when there are fewer groups of shards than ``n`` (saying which ``--shard-size``
    would give enough)."""
    if n < 1:
        raise PartError(f"{n} parts: give at least 1")
    groups = shard_groups(plan)
    if n > len(groups):
        raise PartError(too_many_parts(plan, n, len(groups)))
    layouts = {s.filename: s for s in plan.shards}
    shard_cost = {s.filename: 0 for s in plan.shards}
    for t in plan.tensors:
        begin, end = layouts[t.shard].offsets[t.name]
        shard_cost[t.shard] += tensor_cost(t, end - begin)
    cost = [sum(shard_cost[s] for s in g) for g in groups]
    loads, members = [0] * n, [[] for _ in range(n)]  # type: tuple[list[int], list[list[int]]]
    for i in sorted(range(len(groups)), key=lambda i: (-cost[i], i)):
        j = min(range(n), key=lambda j: (loads[j], j))
        members[j].append(i)
        loads[j] += cost[i]
    order = {s.filename: i for i, s in enumerate(plan.shards)}
    units = []
    for index, m in enumerate(sorted(members, key=min), 1):
        shards = tuple(sorted((s for i in m for s in groups[i]), key=order.__getitem__))
        owned = set(shards)
        units.append(WorkUnit(index, n, shards, tuple(t.name for t in plan.tensors if t.shard in owned),
                              sum(cost[i] for i in m)))
    return tuple(units)


def _group_count(plan: Plan, shard_size: int) -> int:
    """How many groups of shards (see :func:`shard_groups`) the plan's tensors would make at ``shard_size``."""
    out = split_into_shards([OutTensor(t.name, t.out_dtype, t.shape) for t in plan.tensors], shard_size)
    where = {t.name: i for i, g in enumerate(out) for t in g}
    return len(_joined(len(out), [(where[t.name], where[t.copy_of]) for t in plan.tensors if t.copy_of]))


def fit_shard_size(plan: Plan, n: int) -> int | None:
    """The largest shard size (bytes, rounded down to two significant digits where that still works) that gives at
    least ``n`` groups of shards, or None if none does (a single tensor, or a tied pair, too large to split)."""
    if _group_count(plan, 1) < n:
        return None
    total = sum(s.size for s in plan.shards) + 1
    lo, hi = 1, total  # _group_count(lo) >= n; hi is past any useful size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _group_count(plan, mid) >= n else (lo, mid)
    step = 10 ** max(0, len(str(lo)) - 2)
    rounded = lo // step * step
    return rounded if rounded and _group_count(plan, rounded) >= n else lo


def most_parts(plan: Plan) -> int:
    """The most parts ``plan`` can be split into at any shard size: one tensor per file (a tied head with its
    embedding)."""
    return _group_count(plan, 1)


def too_many_parts(plan: Plan, n: int, groups: int) -> str:
    """Why ``plan`` cannot be split into ``n`` parts, and what to do."""
    size = fit_shard_size(plan, n)
    tied = " (a tied head stays with its embedding)" if groups < len(plan.shards) else ""
    head = (f"{n} parts need at least {n} output shard files that can go to different parts, and this merge has "
            f"{groups}{tied} with --shard-size {plan.recipe.shard_size} ({format_size(plan.recipe.shard_size)})")
    if size is not None:
        return (f"{head}: use at most {groups} part{'s' if groups > 1 else ''}, or give --shard-size {size}B (to "
                "every part, and to any merge the output is compared with), or add --resize-shards to let "
                "streammerge choose it (streammerge_recipe.yaml records it)")
    most = most_parts(plan)
    together = " (a tied head with its embedding)" if most < len(plan.tensors) else ""
    limit = (f"{head}; no shard size gives {n}: even one tensor per file{together} makes only {most}, so this merge "
             f"has at most {most} part{'s' if most > 1 else ''}")
    if most == groups:
        return f"{limit}: use at most {most}"
    return (f"{limit}: use at most {most} with --resize-shards (or --shard-size {fit_shard_size(plan, most)}B, to "
            f"every part), or at most {groups} with --shard-size {plan.recipe.shard_size}")


def plan_parts(recipe: Recipe, n: int, resize_shards: bool = False, dry_run: bool = False,
               planner: Callable[[Recipe, bool], Plan] | None = None) -> Plan:
    """Plan ``recipe`` for ``n`` parts: as it is, or with ``resize_shards`` and fewer shard files than parts,
    with the shard size :func:`fit_shard_size` chooses. Raises :class:`PartError` if it cannot be split."""
    if planner is None:
        from .api import plan_recipe as planner  # noqa: PLC0415 (api imports the executors)
    plan = planner(recipe, dry_run)
    groups = len(shard_groups(plan))
    if n <= groups:
        return plan
    size = fit_shard_size(plan, n) if resize_shards else None
    if size is None:
        raise PartError(too_many_parts(plan, n, groups))
    return planner(replace(recipe, shard_size=size), dry_run)


def split_summary(plan: Plan, n: int) -> dict[str, Any]:
    """How ``plan`` splits into ``n`` parts (``streammerge plan --parts N``): each part's shard files, tensors, output
    bytes and ``bytes`` (its inputs read once plus its output: what the split balances), and the balance: the
    largest part against the mean, and ``speedup_bound`` (total / largest: n parts at once cannot be faster than
    that, whatever the machines). Raises :class:`PartError` if it cannot be split so."""
    units = plan.units(n)
    sizes = {s.filename: s.size for s in plan.shards}
    costs = [u.cost for u in units]
    total, largest = sum(costs), max(costs)
    return {
        "parts": n, "shard_size": plan.recipe.shard_size, "files": len(plan.shards), "bytes": total,
        "units": [{**u.to_json(), "files": len(u.shards), "output_bytes": sum(sizes[s] for s in u.shards)}
                  for u in units],
        "largest": largest, "smallest": min(costs),
        "imbalance": largest * n / total if total else 1.0, "speedup_bound": total / largest if largest else 1.0,
    }


def unit_plan(plan: Plan, unit: WorkUnit) -> Plan:
    """``plan`` narrowed to ``unit``: its tensors and shards (the fingerprint stays the whole merge's)."""
    names, shards = set(unit.tensors), set(unit.shards)
    tensors = tuple(t for t in plan.tensors if t.name in names)
    layouts = tuple(s for s in plan.shards if s.filename in shards)
    return replace(plan, tensors=tensors, shards=layouts, bytes_read=sum(t.planned_read_bytes for t in tensors),
                   bytes_written=sum(s.size for s in layouts))


# ---------------------------------------------------------------------------------------------- the records


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is none; raises :class:`ResumeError` if it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path} is damaged ({exc}); delete its work folder to start over") from None
    if not isinstance(data, dict) or "fingerprint" not in data or "fingerprint_doc" not in data:
        raise ResumeError(f"{path} is damaged (not a plan record); delete its work folder to start over")
    return data


def _record(plan: Plan, units: tuple[WorkUnit, ...]) -> dict[str, Any]:
    return {**WorkFolder._plan_record(plan), "parts": len(units), "units": [list(u.shards) for u in units]}


def _write_record(path: Path, obj: dict[str, Any], exclusive: bool) -> bool:
    """Write ``obj`` to ``path`` atomically through a temporary file of this process's own (parts on several
    machines may write at once); ``exclusive``: only if ``path`` does not exist (False if it did)."""
    data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8")
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    fsio.write_file(tmp, data)
    try:
        if exclusive:
            try:
                os.link(tmp, path)  # atomic create-if-absent, also on NFS
            except FileExistsError:
                return False
        else:
            fsio.backend.replace(str(tmp), str(path))
    finally:
        fsio.remove_tree(tmp)
        fsio.sync_dir(path.parent)
    return True


def _change_text(old: dict[str, Any], new: dict[str, Any]) -> str:
    return "; ".join(describe_changes(old, new, [])) or "input files modified"


def _check_record(record: dict[str, Any] | None, plan: Plan, units: tuple[WorkUnit, ...], work: Path,
                  allow_change: bool) -> bool:
    """Refuse a work folder that a part of this split may not write to; True if its record must be replaced
    (the merge changed and ``allow_change``, or only input files were touched)."""
    if record is None:
        return False
    out, n = plan.recipe.out, len(units)
    if "parts" not in record:
        raise PartError(f"{work} holds a merge run as one process, not split into parts: continue it with "
                        f"`streammerge resume {out}`, or delete {work} to split the merge into parts")
    if record["parts"] != n:
        raise PartError(f"{work} holds this merge split into {record['parts']} parts: run each with --part "
                        f"K/{record['parts']} and then `streammerge finalize {out}`, or delete {work} to split it "
                        f"into {n}")
    if record.get("fingerprint") == plan.fingerprint:
        if record.get("units") != [list(u.shards) for u in units]:
            raise PartError(f"{work} records another split of this merge into {n} parts than the one computed now "
                            "(another streammerge version?); finish it with the streammerge that began it")
        return False
    old, new = record["fingerprint_doc"], plan.fingerprint_doc
    engine = engine_changes(old, new)
    if engine:
        raise ResumeError(f"{work} holds a split merge made by another engine ({'; '.join(engine)}): every part "
                          "must run with the same streammerge, torch and kind of device. Run this part where the "
                          f"others ran, or delete {work} to start over")
    if changed_tensors(old, new) and not allow_change:
        raise ResumeError(f"{work} holds a split merge with different inputs or options; changed: "
                          f"{_change_text(old, new)}. Add --redo-changed (to each part: each keeps its unaffected "
                          f"work and redoes the rest), or delete {work} to start over")
    return True


def recorded_plugin(record: dict[str, Any]) -> str | None:
    """The method plugin (``"<distribution> <version>"``) a work folder's record says the merge was planned with,
    or None (a built-in method)."""
    doc = record.get("fingerprint_doc")
    engine = doc.get("engine") if isinstance(doc, dict) else None
    plugin = engine.get("method_plugin") if isinstance(engine, dict) else None
    return plugin if isinstance(plugin, str) else None


def plugin_problem(method: str, plugin: str | None, where: str) -> str | None:
    """Why ``method`` cannot run ``where`` ("on this machine", ...) as the merge was planned, or None: ``plugin`` is
    the ``"<distribution> <version>"`` of the plugin that provided it (the fingerprint's ``method_plugin``; None for
    a built-in), and here it is missing, refused or another version."""
    if plugin is None:
        return None
    why = ""
    try:
        here: str | None = method_origin(method)
    except MethodError as exc:
        here, why = None, (f" ({exc})" if "plugin" in str(exc) else "")
    if here == plugin:
        return None
    dist, _, version = plugin.rpartition(" ")
    install = f"install {plugin}" if plugin.startswith("an unknown") else f"pip install '{dist}=={version}'"
    found = f"it is not installed {where}{why}" if here is None else f"{where} it comes from {here} instead"
    return (f"the merge method {method!r} comes from the plugin {plugin} (a distribution declaring it in the "
            f"{ENTRY_POINT_GROUP!r} entry point group), as recorded when the merge was planned, and {found}: "
            f"{install} {where}, in the environment streammerge runs in")


#: the recipe fields that are each machine's own: a part continues with those it ran with, not the first part's
MACHINE_OPTIONS = ("max_ram", "max_vram", "threads")


def part_recipe(work: Path, recipe: dict[str, Any], k: int, n: int) -> dict[str, Any]:
    """The recipe (as JSON) to continue part ``k`` of ``n`` with: the merge's ``recipe`` (the record the first part
    wrote), with :data:`MACHINE_OPTIONS` as part ``k`` recorded them when it ran, or unset if it never did (this
    machine's defaults, unless the caller gives them)."""
    own = _read_json(work / PARTS_DIR / part_folder(k, n) / PLAN_FILE)
    ran = own.get("recipe") if own is not None and isinstance(own.get("recipe"), dict) else {}
    return {**recipe, **{key: ran.get(key) for key in MACHINE_OPTIONS if key in recipe or key in ran}}


def read_record(work: Path) -> dict[str, Any] | None:
    """The split merge's record in ``work`` (None if there is none)."""
    return _read_json(work / PLAN_FILE)


# ------------------------------------------------------------------------------------------------- locking
# The work folder and each part's folder are locked as every work folder is (streammerge.locks): a part holds the
# work folder's lock shared and its own folder's exclusively; finalize holds the work folder's exclusively, so it
# excludes every part, and a one-process merge (exclusive too) excludes them all.


def lock_split_work(work: Path, out: Path, what: str) -> Held:
    """Hold ``work`` exclusively (no part, finalize or one-process merge using it); raises :class:`BusyError`
    naming the parts that run (``what``: what this process is about to do), :class:`LockUnsupportedError`."""
    held = locks.lock(work, fcntl.LOCK_EX)
    if held is None:
        raise BusyError(f"a part of the merge into {out} ({_running(work) or locks.owner(work)}) is still running; wait "
                        f"for every part to finish, then {what}")
    return held


# ------------------------------------------------------------------------------------------- a part's folder


class PartFolder(WorkFolder):
    """The work of one unit inside a split merge's work folder. Use :meth:`open_unit`."""

    def __init__(self, plan: Plan, unit: WorkUnit, work: Path, journal: Journal, resumed: bool, own: Held,
                 shared: Held) -> None:
        super().__init__(plan, work / PARTS_DIR / unit.folder, journal, resumed, None)
        self.unit, self.work, self.own_lock, self.shared_lock = unit, work, own, shared
        self.model_dir = work / "model"  # shared by every part
        self.files = {s.filename: ShardFile(s, self.model_dir) for s in plan.shards}

    @classmethod
    def open_unit(cls, plan: Plan, unit: WorkUnit, notify: Notify) -> PartFolder:
        """Continue part ``unit`` of ``plan`` (the whole merge's plan) or start it. Refused, before anything is
        written, when the work folder holds a single-process run, another split, or another merge (unless
        ``redo_changed``/``restart``), or when this part is running elsewhere."""
        recipe = plan.recipe
        if not recipe.journal:
            raise PartError("--part needs the journal (finalize checks every part's): drop --no-journal")
        assert recipe.out is not None
        work = work_folder_for(recipe.out)
        units = plan.units(unit.count)
        if units[unit.index - 1] != unit:
            raise PartError(f"part {unit.label} is not this plan's (the split is decided by the plan)")
        sub = unit_plan(plan, unit)
        allow = recipe.redo_changed or recipe.restart
        _check_record(read_record(work), plan, units, work, allow)  # refused before anything is created
        if not work.exists():
            _check_space(sub, work)
        try:
            fsio.make_dirs(work)
        except FileExistsError:  # another part created it a moment ago
            pass
        except OSError as exc:
            raise PartError(f"cannot create the work folder {work}: {exc.strerror or exc}; choose another --out") \
                from None
        shared = locks.lock(work, fcntl.LOCK_SH)
        if shared is None:
            raise BusyError(f"another merge or finalize ({locks.owner(work)}) is using {work}; wait for it to finish")
        lock: Held | None = None
        try:
            if not _write_record(work / PLAN_FILE, _record(plan, units), exclusive=True):
                # there is one (maybe written by another part a moment ago): check it again, replace it if allowed
                if _check_record(read_record(work), plan, units, work, allow):
                    _write_record(work / PLAN_FILE, _record(plan, units), exclusive=False)
            for d in (work / "model", work / PARTS_DIR, work / PARTS_DIR / unit.folder):
                try:
                    fsio.make_dirs(d)
                except FileExistsError:
                    pass
            folder = work / PARTS_DIR / unit.folder
            lock = locks.lock(folder, fcntl.LOCK_EX)
            if lock is None:
                raise BusyError(f"part {unit.label} of {recipe.out} is being run by {locks.owner(folder)}; wait for it to "
                                "finish, or stop it first")
            if recipe.restart:  # this part's work only: the other parts' stays
                for s in sub.shards:
                    fsio.remove_tree(work / "model" / s.filename)
                for child in folder.iterdir():
                    if child.name not in locks.LOCK_NAMES:  # held: another start of this part must still see it
                        fsio.remove_tree(child)
            own = _read_json(folder / PLAN_FILE)
            journal = Journal(folder)
            if own is None:
                journal.reset(list(journal.progress))  # (lines without a record: a start that crashed)
                _write_record(folder / PLAN_FILE, WorkFolder._plan_record(plan), exclusive=False)
            elif own["fingerprint"] != plan.fingerprint:
                WorkFolder._accept_changes(sub, folder, journal, own["fingerprint_doc"], notify)
            locks.claim(folder)
            checkpoint("part-opened")
            return cls(sub, unit, work, journal, bool(journal.progress), lock, shared)
        except BaseException:
            if lock is not None:
                lock.close()
            shared.close()
            raise

    def continue_hint(self) -> str:
        out = self.plan.recipe.out
        return (f"run the same command again (or `streammerge resume {out} --part {self.unit.label}`) to continue "
                "this part, or add --restart to redo it")

    def finish(self) -> None:
        """This part is complete: its shards synced and closed, their bytes read back and checked against the
        journal (here, in parallel with the other parts, rather than all in ``finalize``), and the files' stamps
        recorded (``finalize`` publishes the whole)."""
        self.journal.flush()
        for f in self.files.values():
            self.journal.unwatch_fd(f.fd)
            f.finalize(sync=True)
        checkpoint("part-shards-closed")
        names = tuple(s.filename for s in self.plan.shards)
        problem = check_bytes(self.plan, names, self.model_dir,
                              {t.name: self.journal.get(t.name) for t in self.plan.tensors})
        if problem:
            raise PartError(f"part {self.unit.label}: {problem} (a failing disk, or another writer?)")
        write_json_atomic(self.path / VERIFIED, {"fingerprint": self.plan.fingerprint,
                                                 "shards": file_stamps(self.model_dir, names)})
        checkpoint("part-finished")

    def close(self) -> None:
        super().close()
        self.own_lock.close()
        self.shared_lock.close()

    def discard(self) -> None:
        """Delete this part's folder and shards (nothing to resume); the work folder too if nothing else is in it
        and no other part is running."""
        self.journal.close()
        for f in self.files.values():
            f.abort()
        for s in self.plan.shards:
            fsio.remove_tree(self.model_dir / s.filename)
        fsio.remove_tree(self.path)
        self.own_lock.close()
        if self.shared_lock.exclusive():  # no other part is running
            parts = self.work / PARTS_DIR
            if not (parts.is_dir() and any(parts.iterdir())):
                fsio.remove_tree(self.work)
        self.close()


# ---------------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class PartState:
    """What the work folder says about one part: ``state`` is ``missing``, ``running``, ``unfinished``, ``changed``,
    ``damaged`` or ``complete``."""

    unit: WorkUnit
    state: str
    done: int  # tensors complete
    detail: str = ""


def part_states(plan: Plan, n: int) -> list[PartState]:
    """Every part's state, from the journals (reads, never writes)."""
    work = work_folder_for(plan.recipe.out)
    out = []
    for unit in plan.units(n):
        folder = work / PARTS_DIR / unit.folder
        if not folder.is_dir():
            out.append(PartState(unit, "missing", 0))
            continue
        running = holder(folder)
        try:
            own = _read_json(folder / PLAN_FILE)
            journal = Journal(folder, read_only=True)
        except ResumeError as exc:
            out.append(PartState(unit, "damaged", 0, str(exc)))
            continue
        done = sum(1 for name in unit.tensors if _complete(plan.tensor(name), journal.get(name)))
        if running:
            out.append(PartState(unit, "running", done, running))
        elif own is None or own["fingerprint"] != plan.fingerprint:
            out.append(PartState(unit, "changed" if own else "missing", done))
        else:
            out.append(PartState(unit, "complete" if done == len(unit.tensors) else "unfinished", done))
    return out


def _complete(t: TensorPlan, p: TensorProgress) -> bool:
    return bool(p.chunks) and p.rows_done >= t.rows


# -------------------------------------------------------------------------------------------------- finalize


def with_engine_device(plan: Plan, device: str) -> Plan:
    """``plan`` as planned on a machine with ``device`` (finalize computes nothing, so it plans on the CPU and
    takes the kind of device the parts ran on from their record)."""
    engine = {**plan.fingerprint_doc["engine"], "device": device}
    doc = {**plan.fingerprint_doc, "engine": engine}
    return replace(plan, fingerprint_doc=doc, fingerprint=run_fingerprint(doc))


def check_bytes(plan: Plan, shard_names: tuple[str, ...], model_dir: Path, progress: dict[str, TensorProgress],
                counted: Callable[[int], None] | None = None) -> str | None:
    """Why the shard files ``shard_names`` in ``model_dir`` do not hold what the journal says was written (the
    planned size and header, every tensor's bytes matching its journaled CRC-32), or None; ``counted`` is told the
    bytes read."""
    shards = {s.filename: s for s in plan.shards}
    for name in shard_names:
        f = ShardFile(shards[name], model_dir)
        if not f.open_existing():
            return f"{f.path} is missing or its size or header is not the planned one"
        try:
            for t in plan.tensors:
                if t.shard != name:
                    continue
                begin, end = shards[name].offsets[t.name]
                running, at = 0, 0
                while at < end - begin:
                    piece = f.read_at(t.name, at, min(end - begin - at, 16 << 20))
                    running = crc(piece, running)
                    at += len(piece)
                    if counted is not None:
                        counted(len(piece))
                if running != progress[t.name].crc:
                    return (f"{t.name} in {name} does not match the checksum journaled when it was written (changed "
                            "on disk since)")
        finally:
            f.abort()
    return None


def file_stamps(model_dir: Path, shard_names: tuple[str, ...]) -> dict[str, list[int]]:
    """(size, modification time in ns) of each shard file: a part records them once it has checked its bytes, and
    ``finalize`` reads again only the files whose stamp changed since."""
    out = {}
    for name in shard_names:
        st = os.stat(model_dir / name)
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _check_part(work: Path, plan: Plan, unit: WorkUnit, recheck: bool, counted: Callable[[int], None]) -> \
        tuple[str | None, dict[str, TensorProgress]]:
    """(why part ``unit`` cannot be finalized or None, its tensors' journaled progress). The part checked its
    bytes against its journal when it ended; the files modified since (or all, with ``recheck``) are read and
    checked again here (``counted`` is told the bytes read)."""
    out = plan.recipe.out
    again = f"run it (`streammerge merge ... --part {unit.label}`, or `streammerge resume {out} --part {unit.label}`)"
    folder = work / PARTS_DIR / unit.folder
    if not folder.is_dir():
        return f"{unit.describe()} has not run: {again}", {}
    running = holder(folder)
    if running:
        return f"part {unit.label} is still running ({running}): wait for it to finish", {}
    own = _read_json(folder / PLAN_FILE)
    if own is None:
        return f"{unit.describe()} has not started: {again}", {}
    if own["fingerprint"] != plan.fingerprint:
        return (f"part {unit.label} was run with other inputs or options "
                f"({_change_text(own['fingerprint_doc'], plan.fingerprint_doc)}): rerun it with --redo-changed"), {}
    journal = Journal(folder, read_only=True)
    progress = {name: journal.get(name) for name in unit.tensors}
    left = [name for name in unit.tensors if not _complete(plan.tensor(name), progress[name])]
    if left:
        return (f"part {unit.label} is unfinished ({len(unit.tensors) - len(left)} of {len(unit.tensors)} tensors "
                f"done; {left[0]} is not): {again}"), {}
    try:
        stamp = json.loads((folder / VERIFIED).read_text(encoding="utf-8"))
        checked = stamp["shards"] if stamp.get("fingerprint") == plan.fingerprint else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        checked = {}
    try:
        now = file_stamps(work / "model", unit.shards)
    except OSError:
        now = {}
    names = tuple(n for n in unit.shards if recheck or checked.get(n) is None or checked.get(n) != now.get(n))
    problem = check_bytes(plan, names, work / "model", progress, counted)
    if problem:
        return f"part {unit.label}: {problem}: {again} (it merges the damaged tensors again)", {}
    return None, progress


def finalize(out: str | Path, show_progress: bool = False, recheck: bool = False) -> bool:
    """Publish the split merge in ``out``'s work folder: check every part (present, complete, run with this
    merge's inputs and options, every tensor's bytes matching its journaled CRC-32: each part checked its own when
    it ended, and the files modified since, or all with ``recheck``, are checked again here), then write the index,
    side files, manifest and model card and rename the folder into place. Returns False if ``out`` was already
    finalized. Raises :class:`PartError` naming every part that is missing, unfinished or damaged (nothing is
    changed then), :class:`BusyError` while a part runs."""
    from tqdm import tqdm  # noqa: PLC0415

    from .api import plan_recipe  # noqa: PLC0415 (api imports the executors)

    out = Path(out)
    fsio.check_platform()
    work = work_folder_for(out)
    if not work.is_dir():
        if (out / MANIFEST).is_file():
            return False
        raise PartError(f"nothing to finalize for {out}: there is no {work} (run the parts first: `streammerge merge "
                        "... --out OUT --part K/N` for K = 1..N)")
    record = read_record(work)
    if record is None:
        raise PartError(f"{work} has no {PLAN_FILE}: no part of a split merge has started there")
    if "parts" not in record:
        raise PartError(f"{work} holds a merge run as one process, not split into parts: continue it with "
                        f"`streammerge resume {out}`")
    lock = lock_split_work(work, out, "finalize")
    try:
        recipe = Recipe.from_json(record["recipe"])
        check_not_moved(recipe.out, out)
        stored = record["fingerprint_doc"]
        problem = plugin_problem(recipe.method, recorded_plugin(record), "on this machine")
        if problem:
            raise PartError(f"cannot finalize {out} here (finalize plans the merge again to check every part): "
                            f"{problem}; then run finalize again")
        plan = plan_recipe(replace(recipe, device="cpu", restart=False, redo_changed=False), True)
        plan = with_engine_device(plan, stored["engine"].get("device", "cpu"))
        if plan.fingerprint != record["fingerprint"]:
            engine = engine_changes(stored, plan.fingerprint_doc)
            what = "; ".join(engine) if engine else _change_text(stored, plan.fingerprint_doc)
            raise PartError(f"cannot finalize {out}: the inputs or the engine changed since its parts ran ({what}); "
                            "rerun every part with --redo-changed (each redoes only what the change affects), then "
                            "finalize")
        units = plan.units(record["parts"])
        if record.get("units") != [list(u.shards) for u in units]:
            raise PartError(f"{work} records another split into {record['parts']} parts than this streammerge "
                            "computes; finalize with the streammerge that ran the parts")
        if out.exists():
            check_destination(out, recipe.force)
        bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="checking parts", leave=False,
                   disable=not show_progress or not sys.stderr.isatty())
        problems, progress = [], {}
        try:
            for unit in units:
                problem, got = _check_part(work, plan, unit, recheck, bar.update)
                if problem:
                    problems.append(problem)
                progress.update(got)
        finally:
            bar.close()
        if problems:
            raise PartError(f"cannot finalize {out}: " + "; ".join(problems))
        journal = Journal(work, enabled=False)
        journal.progress = progress
        folder = WorkFolder(plan, work, journal, True, None)  # (the lock is held here, released below)
        try:
            for f in folder.files.values():
                if not f.open_existing():  # checked above; changed since?
                    raise PartError(f"{f.path} changed while finalize ran; run finalize again")
            folder.finish()
        finally:
            folder.close()
        return True
    finally:
        lock.close()


def _running(work: Path) -> str:
    """The parts running now in ``work``, named."""
    parts = work / PARTS_DIR
    if not parts.is_dir():
        return ""
    running = []
    for d in sorted(parts.iterdir()):
        who = holder(d) if d.is_dir() else None
        m = re.fullmatch(r"part-(\d+)-of-(\d+)", d.name)
        if who and m:
            running.append(f"part {int(m[1])}/{int(m[2])}: {who}")
    return "; ".join(running)


__all__ = ["LockUnsupportedError", "PartError", "PartFolder", "PartState", "WorkUnit", "finalize", "fit_shard_size",
           "holder", "lock_split_work", "most_parts", "parse_part", "part_recipe", "part_states", "plan_parts",
           "plugin_problem", "recorded_plugin", "shard_groups", "split_summary",
           "split_units", "unit_plan"]
