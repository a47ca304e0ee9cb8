"""The work folder of one merge, ``<out>.streammerge-partial/``: created or continued, filled, published.

Opening it decides what a previous run left is worth. A folder from the same plan is continued as it is. One made
by another engine (streammerge or torch version, kind of device, a plugin method's version) is refused by name. One whose inputs or options
changed keeps the work of every tensor whose fingerprint is unchanged; the changed tensors' journaled work is
forgotten (durably, before the new fingerprints are stored) and redone, but only when the user says so
(``redo_changed``), because that work would be lost. ``--restart`` discards everything. An input shard that was
only touched (same size and header, another modification time) changes no fingerprint: the bytes the journaled
work used from it are re-read and checked against the journal's input checksums (:mod:`streammerge.inputsums`),
and the tensors whose bytes differ or were not recorded count as changed.

Then the output shards are opened (a missing or damaged one is recreated and its tensors start over), the
journaled chunks are checked against the bytes on disk, and each tensor gets its job: its schedule, and the
statistics and emit cursor a previous run saved (statistics that no longer load are reported and recomputed).
Finishing writes the index, the side files, the manifest and the model card, syncs everything and renames the
folder into place. All writes go through :mod:`streammerge.fsio`.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import fsio, locks
from ._torch import torch
from ._version import __version__
from .chat_template import write_template
from .errors import PlanError, StreamMergeError
from .faults import checkpoint
from .fingerprint import changed_tensors, describe_changes, engine_changes, touched_inputs
from .formats.dtypes import parse_output_dtype
from .inputsums import InputSums, TouchCheck, check_touched
from .journal import Journal, ResumeError, write_json_atomic
from .locks import Held
from .manifest import MANIFEST, crc
from .methods import Rule
from .output import (
    check_destination,
    check_output_name,
    copy_side_files,
    publish,
    tokenizer_files,
    work_folder_for,
    write_index,
    write_json,
    write_model_card,
    write_recipe_files,
)
from .planner import Plan, TensorPlan
from .runner import TensorJob
from .schedule import make_schedule
from .units import format_size
from .vocabulary import tokenizer_documents
from .writer import ShardFile

Notify = Callable[[str], None]


OWNER = locks.OWNER  # (the name other modules import from here)


class DiskFullError(StreamMergeError):
    """The disk filled up; the work folder can be resumed once space is freed."""


class BusyError(StreamMergeError):
    """Another merge is writing the same output."""


def lock_work_folder(work: Path, out: Path, what: str = "merge") -> Held:
    """Create ``work`` if needed and hold its lock exclusively (:mod:`streammerge.locks`: released by
    ``Held.close()``, or when the process dies); refuse if another process holds it (``what`` names what that
    process is doing). Raises :class:`BusyError`, :class:`~streammerge.locks.LockUnsupportedError`."""
    try:
        fsio.make_dirs(work)
    except OSError as exc:
        raise PlanError(f"cannot create the work folder {work}: {exc.strerror or exc}; choose another --out") from None
    held = locks.lock(work)
    if held is None:
        raise BusyError(f"another {what} ({locks.owner(work)}) is writing {out}; wait for it to finish, or stop it "
                        "first")
    return held


def writer_of(work: Path) -> str | None:
    """Who holds the lock of the work folder ``work`` now (a running merge), or None; takes no lasting lock."""
    try:
        return locks.holder(work)
    except StreamMergeError:  # a folder that cannot be locked has no writer that locked it
        return None


def _check_space(plan: Plan, where: Path) -> None:
    """Refuse, before anything is created, an output that does not fit the free disk space: the shards, the side
    files copied from the inputs, and a margin for the journal and saved statistics."""
    recipe = plan.recipe
    side = [recipe.base / "config.json", recipe.base / "generation_config.json",
            *tokenizer_files(recipe.tokenizer_from or recipe.base)]
    need = (sum(s.size for s in plan.shards) + sum(f.stat().st_size for f in side if f.is_file())
            + JOURNAL_MARGIN + 8 * sum(t.row_numel for t in plan.tensors if t.stat_passes))
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise DiskFullError(
            f"not enough disk space for the output: {format_size(need)} needed, {format_size(free)} free where "
            f"{plan.recipe.out} would be; free space (or choose another --out) and run the command again"
        )


def touched_since_finished(plan: Plan) -> list[str]:
    """The input files modified (same size and header) since ``out`` was merged from them with these options;
    empty when ``out`` holds another merge or none, or this very one."""
    try:
        manifest = json.loads((plan.recipe.out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return []
    if not isinstance(manifest, dict) or manifest.get("fingerprint") == plan.fingerprint:
        return []
    tensors = manifest.get("tensors") if isinstance(manifest.get("tensors"), dict) else {}
    same = (manifest.get("engine") == plan.fingerprint_doc["engine"] and set(tensors) == {t.name for t in plan.tensors}
            and manifest.get("method") == plan.method.name and manifest.get("options") == plan.options()
            and manifest.get("params") == {k: list(v) if isinstance(v, tuple) else v for k, v in plan.params.items()})
    touched = touched_inputs({"inputs": manifest.get("inputs", [])}, plan.fingerprint_doc) if same else []
    return [f"{t.who} file {t.path}" for t in touched]


def check_output_free(plan: Plan) -> None:
    """Refuse an output folder a merge of ``plan`` cannot be written to (see ``check_destination``), saying so when
    it holds this very merge made before an input was touched."""
    touched = [] if plan.recipe.force else touched_since_finished(plan)
    if touched:
        raise PlanError(f"{plan.recipe.out} holds this merge, made before {'; '.join(touched)} was modified (same size "
                        "and header: a touch or a copy). If its bytes did not change, the output is up to date and "
                        "there is nothing to do; to merge again from the inputs as they are now, add --force")
    check_destination(plan.recipe.out, plan.recipe.force)


#: disk space set aside for the journal and the work folder's small files
JOURNAL_MARGIN = 1 << 20


def finished_output(plan: Plan) -> bool:
    """Whether ``out`` already holds this plan's finished output: the same fingerprint in its manifest, and every
    shard the manifest lists there with its size (a deleted or truncated shard is not a finished output; ``verify``
    checks the bytes). Never with ``force``: the user asked for the merge to be written again."""
    manifest = plan.recipe.out / MANIFEST
    if plan.recipe.force or not manifest.is_file():
        return False
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        files = doc["files"]
        return doc.get("fingerprint") == plan.fingerprint and all(
            (plan.recipe.out / name).is_file() and (plan.recipe.out / name).stat().st_size == size
            for name, size in files.items())
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return False


def describe_destination(plan: Plan) -> str:
    """What a merge of ``plan`` would do with its output folder (for ``streammerge plan``); reads, never writes."""
    out = plan.recipe.out
    if out is None:
        return "not given (--out): a merge needs one"
    try:
        check_output_name(out)
        if not (work_folder_for(out).is_dir() or (out / MANIFEST).is_file()):
            check_destination(out, plan.recipe.force)
    except PlanError as exc:
        return f"a merge would refuse it: {exc}"
    if finished_output(plan):
        return f"{out} already holds this merge: a merge has nothing to do"
    touched = touched_since_finished(plan)
    if touched and not plan.recipe.force:
        return f"{out} holds this merge, made before {'; '.join(touched)} was modified (same size and header): a " \
               "merge refuses to redo it without --force"
    work = work_folder_for(out)
    writer = writer_of(work) if work.is_dir() else None
    if writer:
        return f"a merge ({writer}) is writing {work} now: another merge into {out} is refused until it ends"
    try:
        stored = json.loads((work / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and "parts" in stored:  # a split merge (streammerge.parts)
        return (f"{work} holds a merge split into {stored['parts']} parts: each continues with --part "
                f"K/{stored['parts']}, then `streammerge finalize {out}` publishes it; a merge without --part "
                "refuses it (--restart discards the parts' work)")
    if isinstance(stored, dict) and plan.recipe.journal and not plan.recipe.restart:
        journal = Journal(work, read_only=True)
        done = sum(1 for t in plan.tensors if journal.get(t.name).chunks and journal.get(t.name).rows_done >= t.rows)
        if stored.get("fingerprint") == plan.fingerprint:
            return f"{work} holds an interrupted run of this merge ({done} of {len(plan.tensors)} tensors done): a " \
                   "merge continues it"
        old = stored.get("fingerprint_doc", {})
        touched = touched_inputs(old, plan.fingerprint_doc)
        if touched and not changed_tensors(old, plan.fingerprint_doc) and not engine_changes(old, plan.fingerprint_doc):
            return f"{work} holds an interrupted run of this merge ({done} of {len(plan.tensors)} tensors done); " \
                   f"{', '.join(map(str, touched))} was modified since (same size and header): a merge re-reads " \
                   "the bytes the work done used from it and continues if they match (else it asks for --redo-changed)"
        checked = [f"{t} modified (same size and header; a merge checks the bytes the work done used)" for t in touched]
        changes = "; ".join(engine_changes(old, plan.fingerprint_doc)
                            or describe_changes(old, plan.fingerprint_doc, checked))
        return f"{work} holds an interrupted run with other inputs or options ({changes}; {done} tensors done): a " \
               "merge refuses to overwrite it without --redo-changed or --restart"
    if out.is_dir() and any(out.iterdir()):
        return f"{out} exists and is not empty: a merge " + ("replaces it when complete (--force)" if plan.recipe.force
                                                             else "refuses it without --force")
    return f"{out} will be created when the merge is complete"


def _touch_change(c: TouchCheck) -> str:
    """A touched input file whose check failed, as a change."""
    why = []
    if c.differ:
        why.append(f"the bytes that the work of {len(c.differ)} tensor(s) used from it differ")
    if c.unrecorded:
        why.append(f"{len(c.unrecorded)} tensor(s) with work done have no checksum of the bytes they used from it")
    return f"{c.file} changed (same size and header, new modification time; {' and '.join(why)})"


class WorkFolder:
    """One merge's work folder: its journal and output shards. Use :meth:`open`."""

    def __init__(self, plan: Plan, path: Path, journal: Journal, resumed: bool, lock: Held | None) -> None:
        self.plan = plan
        self.lock = lock
        self.path = path
        self.model_dir = path / "model"
        self.journal = journal
        self.resumed = resumed
        self.files = {s.filename: ShardFile(s, self.model_dir) for s in plan.shards}

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, plan: Plan, notify: Notify) -> WorkFolder:
        """Continue the interrupted run for ``plan.recipe.out`` if there is one it may continue, else start fresh.
        The folder is locked for this process; nothing is created if the output cannot fit the disk."""
        recipe = plan.recipe
        work = work_folder_for(recipe.out)
        plan_file = work / "plan.json"
        if not work.exists():
            _check_space(plan, work)
        lock = lock_work_folder(work, recipe.out)
        try:
            if plan_file.is_file() and not recipe.restart and recipe.journal:
                try:
                    stored = json.loads(plan_file.read_text(encoding="utf-8"))
                    old = stored["fingerprint_doc"]
                except (OSError, ValueError, KeyError, TypeError):
                    raise ResumeError(f"{plan_file} is damaged, so the interrupted merge in {work} cannot be "
                                      "continued; add --restart to discard it") from None
                if "parts" in stored:  # a split merge (streammerge.parts): its parts' journals are elsewhere
                    raise ResumeError(
                        f"{work} holds this merge split into {stored['parts']} parts (--part K/{stored['parts']}): "
                        f"run the parts that are not done, then `streammerge finalize {recipe.out}`; or add "
                        "--restart to discard every part's work and merge in one process")
                journal = Journal(work)
                if stored.get("fingerprint") != plan.fingerprint:
                    cls._accept_changes(plan, work, journal, old, notify)
                locks.claim(work)
                return cls(plan, work, journal, True, lock)
            if recipe.out.exists():  # another run may have published it while this one planned and loaded torch
                try:
                    if finished_output(plan):
                        raise StreamMergeError(f"{recipe.out} was completed by another run of this merge while "
                                               "this one started: nothing to do")
                    check_output_free(plan)
                except StreamMergeError:
                    fsio.remove_tree(work)  # created by this run a moment ago, and empty
                    raise
            for child in work.iterdir():  # a discarded or half-created run: start from an empty folder
                if child.name not in locks.LOCK_NAMES:
                    fsio.remove_tree(child)
            fsio.make_dirs(work / "model")
            locks.claim(work)
            write_json_atomic(plan_file, cls._plan_record(plan))
            checkpoint("work-created")
            return cls(plan, work, Journal(work, enabled=recipe.journal), False, lock)
        except BaseException:
            lock.close()
            raise

    @staticmethod
    def _plan_record(plan: Plan) -> dict[str, Any]:
        return {"fingerprint": plan.fingerprint, "fingerprint_doc": plan.fingerprint_doc,
                "recipe": plan.recipe.to_json(), "streammerge": __version__}

    @classmethod
    def _accept_changes(cls, plan: Plan, work: Path, journal: Journal, old: dict[str, Any], notify: Notify) -> None:
        """Forget the work of tensors whose fingerprint changed (refused unless ``redo_changed``), then store the
        new fingerprints; an engine change is always refused."""
        new = plan.fingerprint_doc
        engine = engine_changes(old, new)
        if engine:
            raise ResumeError(
                f"{work} holds an interrupted merge made by another engine ({'; '.join(engine)}), whose work this "
                "one cannot continue byte for byte. Add --restart to discard it and start over, or finish it with "
                "the streammerge, torch and device it was made with"
            )
        changed = changed_tensors(old, new)
        checks = check_touched(plan, journal, touched_inputs(old, new), set(changed))
        failed = {n for c in checks for n in c.differ + c.unrecorded}
        failed |= {t.name for t in plan.tensors if t.copy_of in failed}  # a tied head copies a redone embedding
        changed += [t.name for t in plan.tensors if t.name in failed and t.name not in changed]
        lost = [n for n in changed if journal.get(n).chunks or journal.get(n).state_file]
        kept = sum(1 for t in plan.tensors if t.name not in changed and journal.get(t.name).chunks)
        changes = describe_changes(old, new, [_touch_change(c) for c in checks if c.differ or c.unrecorded])
        what = "; ".join(changes)
        if lost and not plan.recipe.redo_changed:
            inputs_changed = old.get("inputs") != new.get("inputs")
            original = ("" if inputs_changed else
                        "rerun the original command to continue it as it was, ")
            raise ResumeError(
                f"{work} holds an interrupted merge with different inputs or options; changed: {what}. "
                f"{len(lost)} tensor(s) with work done are affected, {kept} are not. To continue: {original}add "
                "--redo-changed to keep the unaffected work and redo the rest, or add --restart to discard it all"
            )
        journal.reset(changed)  # durable before the new fingerprints are: a crash in between resets again
        write_json_atomic(work / "plan.json", cls._plan_record(plan))
        for c in checks:
            if c.kept:
                notify(f"{c.file} was modified since the interrupted run (same size and header): re-read the bytes "
                       f"that the work of {len(c.kept)} tensor(s) used from it; they match their checksums, so that "
                       "work is kept")
        if lost:
            notify(f"changed since the interrupted run: {what}; redoing {len(lost)} tensor(s) with work done, "
                   f"keeping {kept}")

    def record_inputs(self, name: str, sums: InputSums) -> None:
        """Journal the checksums of the input bytes tensor ``name``'s work uses (on its worker's writer thread)."""
        self.journal.record_inputs(name, sums)

    def open_shards(self) -> None:
        """Open the shards a previous run created (if intact) or create them at full size, durably."""
        need = sum(f.layout.size for f in self.files.values() if not f.path.exists())
        free = shutil.disk_usage(self.model_dir).free
        if need > free:
            raise DiskFullError(
                f"not enough disk space for the output: {format_size(need)} still to allocate, {format_size(free)} "
                f"free where {self.model_dir} is; free space (or choose another --out) and run the command again"
            )
        created = False
        for name, f in self.files.items():
            if not f.open_existing():  # missing or damaged: its tensors' chunks start over (statistics are kept)
                for t in self.plan.tensors:
                    if t.shard == name:
                        self.journal.truncate(t.name, 0)
                try:
                    f.create()
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise DiskFullError(f"disk full: not enough space to create {f.path} "
                                            f"({format_size(f.layout.size)})") from None
                    raise
                created = True
            self.journal.watch_fd(f.fd)
        if created:
            fsio.sync_dir(self.model_dir)  # the shards exist before any journal line can describe their bytes
        checkpoint("shards-open")

    def verify_journaled(self, notify: Notify | None = None) -> None:
        """Check every journaled chunk's bytes against its checksum; forget from the first bad one on (and say so:
        bytes that changed on disk after they were written point at a failing disk or another writer)."""
        for t in self.plan.tensors:
            p = self.journal.get(t.name)
            running = 0
            for i, (r0, r1, checksum) in enumerate(p.chunks):
                data = self.files[t.shard].read_at(t.name, r0 * t.out_row_bytes, (r1 - r0) * t.out_row_bytes)
                running = crc(data, running)
                if running != checksum:
                    self.journal.truncate(t.name, i)
                    if notify is not None:
                        notify(f"{t.name} rows [{r0}, {r1}) in {t.shard} of {self.path} do not match the checksum "
                               "journaled when they were written (changed on disk since); they are merged again")
                    break

    def jobs(self, notify: Notify) -> list[TensorJob]:
        """Every tensor's job, tied heads last (they copy their embedding's merged bytes)."""
        out = []
        for t in sorted(self.plan.tensors, key=lambda t: t.rule is Rule.TIED_COPY):
            p = self.journal.get(t.name)
            complete = p.rows_done >= t.rows and bool(p.chunks)
            state = None
            if t.stat_passes and not complete:
                state, problem = self.journal.load_state(t.name)
                if problem:
                    notify(f"the saved statistics of {t.name} cannot be used ({problem}); computing them again")
            out.append(TensorJob(t, make_schedule(t, p.rows_done, complete, state is not None), state, p.cursor))
        return out

    def has_work(self, besides: str | None = None) -> bool:
        """Whether the journal holds any work (a chunk or saved statistics) that a resume would keep, not counting
        tensor ``besides`` (one whose input must change before it can be merged)."""
        return any(self.journal.get(t.name).chunks or self.journal.get(t.name).state_file
                   for t in self.plan.tensors if t.name != besides)

    def done_count(self) -> int:
        return sum(1 for t in self.plan.tensors
                   if self.journal.get(t.name).rows_done >= t.rows and self.journal.get(t.name).chunks)

    def continue_hint(self) -> str:
        """How to continue after a failure that kept this folder."""
        return (f"run `streammerge resume {self.plan.recipe.out}` (or the same command again) to continue, or add "
                "--restart to start over")

    # ---- filling (on each worker's writer thread) -------------------------------------------------------------
    def write_chunk(self, t: TensorPlan, r0: int, r1: int, data: memoryview, cursor: dict[str, Any]) -> None:
        """Write rows [r0, r1) of ``t`` and journal them (durably, at the next group commit)."""
        try:
            self.files[t.shard].write_at(t.name, r0 * t.out_row_bytes, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full while writing {t.name} rows [{r0}, {r1}) to {self.model_dir}") from None
            raise
        running = crc(data, self.journal.get(t.name).crc)
        self.journal.record_chunk(t.name, r0, r1, running, cursor, len(data))
        checkpoint("chunk-written")

    def save_state(self, t: TensorPlan, state: dict[str, torch.Tensor]) -> None:
        self.journal.save_state(t.name, self.plan.tensors.index(t), state)

    def read_output(self, name: str, byte_offset: int, view: memoryview) -> None:
        self.files[self.plan.tensor(name).shard].read_into(name, byte_offset, view)

    # ---- finishing -------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "streammerge": __version__,
            "fingerprint": self.plan.fingerprint,
            "method": self.plan.method.name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.plan.params.items()},
            "options": self.plan.options(),
            # what made it: a later run can tell "the inputs were only touched" from "other inputs or options"
            "engine": self.plan.fingerprint_doc["engine"],
            "inputs": self.plan.fingerprint_doc["inputs"],
            **({"references": self.plan.recipe.hub_refs} if self.plan.recipe.hub_refs else {}),
            "files": {s.filename: s.size for s in self.plan.shards},
            "tensors": {
                t.name: {"file": t.shard, "dtype": t.out_dtype, "shape": list(t.shape),
                         "crc32": self.journal.get(t.name).crc}
                for t in self.plan.tensors
            },
        }

    def finish(self) -> None:
        """Close the shards durably, write the side files and publish; then remove the work folder."""
        plan, recipe = self.plan, self.plan.recipe
        self.journal.flush()
        for f in self.files.values():
            self.journal.unwatch_fd(f.fd)
            f.finalize(sync=recipe.journal)
        checkpoint("shards-finalized")
        shards = {s.filename for s in plan.shards}
        for f in self.model_dir.iterdir():  # side files an interrupted finish left (torn, or from other options)
            if f.name not in shards:
                fsio.remove_tree(f)
        if len(plan.shards) > 1:
            write_index(self.model_dir, {t.name: t.shard for t in plan.tensors},
                        sum(s.size - len(s.header) for s in plan.shards))
        out_dtype = parse_output_dtype(recipe.dtype).name if recipe.dtype else None
        copy_side_files(self.model_dir, recipe.base, recipe.tokenizer_from, out_dtype, plan.config_updates,
                        tokenizer_documents(plan.vocabulary) if plan.vocabulary is not None else None)
        write_json(self.model_dir / MANIFEST, self.manifest())
        if plan.chat_template is not None:
            write_template(self.model_dir, plan.chat_template)
        write_recipe_files(self.model_dir, recipe)
        write_model_card(self.model_dir, plan.to_dict(), recipe.to_yaml())
        checkpoint("side-files-written")
        publish(self.model_dir, recipe.out, recipe.force)
        checkpoint("published")
        fsio.remove_tree(self.path)

    def close(self) -> None:
        """Release descriptors and the lock (after success or failure); the folder stays as the journal left it."""
        self.journal.close()
        for f in self.files.values():
            f.abort()
        if self.lock is not None:
            self.lock.close()

    def discard(self) -> None:
        """Delete the folder (a run without a journal cannot be resumed)."""
        self.close()
        fsio.remove_tree(self.path)
