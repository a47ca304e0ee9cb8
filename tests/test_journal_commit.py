"""Group commits: a commit that falls due while the previous one is still syncing does not stall the writer thread
(which would stall every compute worker waiting for an output buffer); its lines go with the next commit."""

from __future__ import annotations

import sys
import threading

from streammerge import journal as journal_module
from streammerge.journal import Journal


def _lines(j: Journal) -> list[tuple[int, int]]:
    return [(r0, r1) for r0, r1, _ in Journal(j.work, read_only=True).get("w").chunks]


def test_a_due_commit_waits_for_the_one_in_flight_without_blocking(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMMIT_BYTES", 1)  # every chunk is due
    j = Journal(tmp_path)
    release, syncing = threading.Event(), threading.Event()

    def slow_sync(fds: list[int]) -> None:  # the disk still writing the first commit's bytes
        syncing.set()
        assert release.wait(30)

    monkeypatch.setattr(Journal, "_sync_data", staticmethod(slow_sync))
    j.record_chunk("w", 0, 2, 11, {}, 8)  # starts commit 1, which blocks in its sync
    assert syncing.wait(30)
    done = threading.Event()

    def more() -> None:
        j.record_chunk("w", 2, 4, 12, {}, 8)  # due, but commit 1 is in flight: no wait
        j.record_chunk("w", 4, 6, 13, {}, 8)
        done.set()

    threading.Thread(target=more, daemon=True).start()
    assert done.wait(30), "a due commit blocked the writer while the previous one was syncing"
    assert _lines(j) == []  # nothing is journaled before its bytes are synced
    release.set()
    j.flush()
    assert _lines(j) == [(0, 2), (2, 4), (4, 6)]  # the deferred lines went with the next commit, in order


def test_a_due_commit_starts_as_soon_as_the_previous_one_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMMIT_BYTES", 1)
    j = Journal(tmp_path)
    j.record_chunk("w", 0, 2, 11, {}, 8)
    j._join()  # commit 1 done
    j.record_chunk("w", 2, 4, 12, {}, 8)  # due and nothing in flight: committed now
    j._join()
    assert _lines(j) == [(0, 2), (2, 4)]


def test_commits_queue_behind_one_in_flight_without_blocking_and_land_in_order(tmp_path, monkeypatch):
    """The per-tensor commit (``commit()``, from the writer thread) never waits for a sync in flight: it queues its
    lines for the one commit thread, which makes them durable in the order they were asked for; commits asked for
    while one is in flight go together, with one sync."""
    def committers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "streammerge-commit"}

    before = committers()  # (other tests' journals' threads, idling until they exit)
    j = Journal(tmp_path)
    release, syncing = threading.Event(), threading.Event()
    synced: list[int] = []

    def slow_sync(fds: list[int]) -> None:
        syncing.set()
        assert release.wait(30)
        synced.append(len(synced))

    monkeypatch.setattr(Journal, "_sync_data", staticmethod(slow_sync))
    j.record_chunk("w", 0, 2, 11, {}, 8)
    j.commit()  # batch 1 blocks in its sync
    assert syncing.wait(30)
    done = threading.Event()

    def more() -> None:
        for i in range(1, 4):
            j.record_chunk("w", 2 * i, 2 * i + 2, 11 + i, {}, 8)
            j.commit()  # queued: batch 1 is still syncing
        done.set()

    threading.Thread(target=more, daemon=True).start()
    assert done.wait(30), "a commit blocked its caller while the previous one was syncing"
    assert _lines(j) == []
    ours = committers() - before
    assert len(ours) == 1  # one thread serves every commit
    release.set()
    j.flush()
    assert synced == [0, 1]  # the three commits behind the first: one batch, synced before its lines went in
    assert _lines(j) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    j.close()
    assert not any(t.is_alive() for t in ours)  # close stops it


def test_a_failed_commit_is_raised_by_the_next_and_the_batches_after_it_are_dropped(tmp_path, monkeypatch):
    """A sync that fails: its lines and those of every batch queued behind it stay out of the journal (their bytes
    may not be durable), and the next commit or flush raises the error."""
    j = Journal(tmp_path)
    release, syncing = threading.Event(), threading.Event()
    calls = []

    def failing_sync(fds: list[int]) -> None:
        calls.append(1)
        if len(calls) == 2:
            syncing.set()
            assert release.wait(30)
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(Journal, "_sync_data", staticmethod(failing_sync))
    j.record_chunk("w", 0, 2, 11, {}, 8)
    j.flush()  # batch 1 durable
    j.record_chunk("w", 2, 4, 12, {}, 8)
    j.commit()  # batch 2: fails in its sync
    assert syncing.wait(30)
    j.record_chunk("w", 4, 6, 13, {}, 8)
    j.commit()  # batch 3: queued behind the failing one
    release.set()
    try:
        j.flush()
    except OSError as exc:
        assert exc.errno == 5
    else:
        raise AssertionError("the failed commit was not raised")
    assert _lines(j) == [(0, 2)]
    j.close()


def test_a_commit_thread_that_cannot_start_leaves_the_lines_pending_and_nothing_hangs(tmp_path, monkeypatch):
    """``Thread.start`` failing (no thread can be started) is raised by the commit; its lines stay pending, nothing
    is queued, and a later commit starts the thread and makes them durable; flush and close return."""
    j = Journal(tmp_path)
    real_start = threading.Thread.start

    def failing_start(self: threading.Thread) -> None:
        if self.name == "streammerge-commit":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    j.record_chunk("w", 0, 2, 11, {}, 8)
    try:
        j.commit()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failed start was not raised")
    assert not j._committing()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    done = threading.Event()

    def later() -> None:
        j.record_chunk("w", 2, 4, 12, {}, 8)
        j.flush()
        j.close()
        done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(30), "flush or close hung after a failed thread start"
    assert _lines(j) == [(0, 2), (2, 4)]


def test_lines_from_several_writer_threads_each_follow_the_sync_of_their_bytes(tmp_path, monkeypatch):
    """One writer thread per compute worker: each queues a chunk's line after writing its bytes, while the others
    commit. Every line that is appended must describe bytes written before the sync of its batch began, and no
    line may be lost."""
    monkeypatch.setattr(journal_module, "COMMIT_BYTES", 1)  # every chunk is due: commits from every thread
    j = Journal(tmp_path)
    written: set[tuple[str, int]] = set()  # (tensor, r1) whose bytes are "written"
    lock = threading.Lock()
    synced: list[set[tuple[str, int]]] = []  # what each sync made durable, in order
    late: list[str] = []

    def sync(fds: list[int]) -> None:
        with lock:
            synced.append(set(written))

    real_append = Journal._append_lines

    def append(self: Journal, lines: list[str]) -> None:
        import json

        durable = synced[-1]
        late.extend(line for line in lines if (json.loads(line)["t"], json.loads(line)["r1"]) not in durable)
        real_append(self, lines)

    monkeypatch.setattr(Journal, "_sync_data", staticmethod(sync))
    monkeypatch.setattr(Journal, "_append_lines", append)
    chunks = 300

    def writer(name: str) -> None:
        for r in range(chunks):
            with lock:
                written.add((name, r + 1))
            j.record_chunk(name, r, r + 1, r, {}, 8)
            if r % 7 == 0:
                j.commit()  # a finished tensor's commit

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the races of an unlocked queue show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    j.flush()
    assert late == [], f"{len(late)} lines appended before their bytes' sync, e.g. {late[:2]}"
    reread = Journal(tmp_path, read_only=True)
    assert all(reread.get(f"w{i}").rows_done == chunks for i in range(4))


def test_every_commit_after_a_failed_sync_raises_and_appends_nothing(tmp_path, monkeypatch):
    """After an fdatasync fails the kernel may have dropped the unsynced pages, and a later sync of the same file
    reports success: so every later commit (each worker's writer commits) raises the failure, and no line written
    after it reaches the journal, however many writers ask."""
    j = Journal(tmp_path)
    calls = []

    def failing_sync(fds: list[int]) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(Journal, "_sync_data", staticmethod(failing_sync))
    j.record_chunk("w", 0, 2, 11, {}, 8)
    j.flush()  # durable
    j.record_chunk("w", 2, 4, 12, {}, 8)  # its bytes may be lost with the failed sync
    j.commit()  # fails in its sync
    for _ in range(3):  # one worker's writer is told, then the others, each at its next commit
        j.record_chunk("w", 4, 6, 13, {}, 8)
        try:
            j.commit()
            j.flush()
        except OSError as exc:
            assert exc.errno == 5
        else:
            raise AssertionError("a commit after the failed sync did not raise")
    assert j.failed is not None and j.failed.errno == 5
    assert len(calls) == 2  # nothing was synced (nor appended) after the failure
    assert _lines(j) == [(0, 2)]
    j.close()


def test_writers_saving_the_first_statistics_at_once_both_succeed(tmp_path):
    """The statistics folder is made by whichever writer saves first; two at the same moment (two workers finishing
    their first statistics pass together) must not fail on each other's mkdir."""
    import torch

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(40):
            j = Journal(tmp_path / f"run{trial}")
            j.work.mkdir()
            barrier, errors = threading.Barrier(2), []

            def save(i: int, j: Journal = j, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
                barrier.wait()
                try:
                    j.save_state(f"t{i}", i, {"s": torch.ones(4)})
                except OSError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            j.flush()
            j.close()
            assert errors == [], f"trial {trial}: {errors[0]}"
            reread = Journal(j.work, read_only=True)
            assert all(reread.load_state(f"t{i}")[0] is not None for i in range(2))
    finally:
        sys.setswitchinterval(interval)
