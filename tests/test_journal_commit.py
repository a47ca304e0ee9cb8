"""Group commits: a commit that falls due while the previous one is still syncing does not stall the writer thread
(which would stall every compute worker waiting for an output buffer); its lines go with the next commit."""

from __future__ import annotations

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
