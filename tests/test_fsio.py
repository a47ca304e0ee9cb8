"""Durable file operations and portability: which platforms run, how data is synced on each, preallocation,
atomic replacement, and that the light entry points do not load torch."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from streammerge import fsio
from streammerge.cli import main
from streammerge.examples import write_family
from streammerge.writer import OutTensor, ShardFile, layout_shard


@pytest.mark.parametrize("platform", ["win32", "cygwin", "emscripten"])
def test_unsupported_platforms_are_refused_by_name_with_a_way_out(platform):
    with pytest.raises(fsio.PlatformError, match=f"not on {platform}.*WSL2"):
        fsio.check_platform(platform)


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_linux_and_macos_are_supported(platform):
    fsio.check_platform(platform)


def test_windows_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    fam = write_family(tmp_path / "fam", "tiny", dtype="bf16")
    monkeypatch.setattr(fsio.sys, "platform", "win32")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                  str(fam["multilingual"]), "--out", str(out), "-q"])
    assert r.exit_code == 1 and "WSL2" in r.output
    assert not out.exists() and not list(tmp_path.glob("*.streammerge-partial"))


def test_macos_syncs_with_f_fullfsync_and_falls_back_to_fsync():
    calls: list[tuple[str, int]] = []
    fake_os = SimpleNamespace(fsync=lambda fd: calls.append(("fsync", fd)))  # no fdatasync on macOS

    def fcntl(fd: int, op: int) -> None:
        if fd == 2:
            raise OSError(errno.ENOTSUP, "not supported on this file system")
        calls.append(("F_FULLFSYNC", fd))

    fake_fcntl = SimpleNamespace(F_FULLFSYNC=51, fcntl=fcntl)
    data, full = fsio.choose_sync(fake_os, "darwin", fake_fcntl)
    data(1)
    full(2)  # a file system that refuses F_FULLFSYNC: plain fsync
    assert calls == [("F_FULLFSYNC", 1), ("fsync", 2)]


def test_linux_syncs_data_with_fdatasync():
    calls: list[str] = []
    fake_os = SimpleNamespace(fsync=lambda fd: calls.append("fsync"), fdatasync=lambda fd: calls.append("fdatasync"))
    data, full = fsio.choose_sync(fake_os, "linux")
    data(3)
    full(3)
    assert calls == ["fdatasync", "fsync"]


def test_shards_are_preallocated_so_a_full_disk_shows_up_at_creation(tmp_path):
    layout = layout_shard("model.safetensors", [OutTensor("w", "F32", (4096, 256))])
    shard = ShardFile(layout, tmp_path)
    shard.create()
    try:
        st = os.stat(shard.path)
        assert st.st_size == layout.size
        if hasattr(os, "posix_fallocate"):
            probe = tmp_path / "probe"
            fd = os.open(probe, os.O_RDWR | os.O_CREAT)
            try:
                os.posix_fallocate(fd, 0, 4096)
                supported = True
            except OSError:
                supported = False
            finally:
                os.close(fd)
            if supported:
                assert st.st_blocks * 512 >= layout.size, "the shard's blocks are reserved, not sparse"
    finally:
        shard.abort()


def test_no_space_at_preallocation_is_raised(tmp_path, monkeypatch):
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "posix_fallocate", full, raising=False)
    layout = layout_shard("model.safetensors", [OutTensor("w", "F32", (64, 64))])
    with pytest.raises(OSError) as info:
        ShardFile(layout, tmp_path).create()
    assert info.value.errno == errno.ENOSPC


def test_atomic_replacement_keeps_the_old_or_the_new_contents(tmp_path):
    target = tmp_path / "plan.json"
    fsio.write_file_atomic(target, b"old")
    fsio.write_file_atomic(target, b"new")
    assert target.read_bytes() == b"new" and not (tmp_path / "plan.json.tmp").exists()


def test_remove_tree_and_make_dirs(tmp_path):
    fsio.make_dirs(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "link")
    fsio.remove_tree(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    fsio.remove_tree(tmp_path / "missing")  # fine


def test_verify_and_the_header_parser_do_not_load_torch():
    code = ("import sys, streammerge.verify, streammerge.formats.checkpoint; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_package_api_is_still_there():
    import streammerge

    assert callable(streammerge.merge) and callable(streammerge.plan) and callable(streammerge.inspect)
    assert streammerge.Recipe.__name__ == "Recipe"
    with pytest.raises(AttributeError):
        streammerge.nothing_here  # noqa: B018



def _resident_pages(path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of ``path``), by Linux ``mincore`` on a shared read-only map."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec), pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise as on Linux")
def test_drop_cached_leaves_the_bytes_and_frees_the_synced_pages(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(64 * 4096)
    fd = fsio.open_file(path, create=True)
    try:
        fsio.pwrite_all(fd, data, 0)
        assert _resident_pages(path)[0] == 64  # dirty pages stay whatever the hint
        fsio.sync_data(fd)
        fsio.drop_cached(fd)
        assert _resident_pages(path)[0] == 0
    finally:
        fsio.close(fd)
    assert path.read_bytes() == data
    fsio.drop_cached(fd)  # a closed descriptor: a hint, no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise as on Linux")
def test_a_merge_leaves_its_output_out_of_the_page_cache_and_syncs_before_dropping(tmp_path, monkeypatch):
    """The journal drops the output shards' pages after each group commit's fdatasync, never before it: the
    output does not fill the page cache (the inputs stay), and no unsynced page is asked to go."""
    fam = write_family(tmp_path / "fam", "tiny", dtype="bf16")
    events: list[tuple[str, int]] = []
    sync, drop = fsio.sync_data, fsio.drop_cached
    monkeypatch.setattr(fsio, "sync_data", lambda fd: (events.append(("sync", fd)), sync(fd))[1])
    monkeypatch.setattr(fsio, "drop_cached", lambda fd: (events.append(("drop", fd)), drop(fd))[1])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                  str(fam["multilingual"]), "--out", str(out), "-q", "--max-ram", "64MiB"])
    assert r.exit_code == 0, r.output
    drops = [i for i, (kind, _) in enumerate(events) if kind == "drop"]
    assert drops, "no page was dropped"
    for i in drops:
        assert events[i - 1] == ("sync", events[i][1])
    resident, pages = _resident_pages(out / "model.safetensors")
    assert resident < pages / 4, f"{resident} of {pages} output pages still cached"
