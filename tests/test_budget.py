"""The default budget respects memory cgroup limits (v1 and v2), walking up the hierarchy; sizes need a unit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streammerge.budget import cgroup_headroom, make_budget
from streammerge.errors import StreamMergeError


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_limit_in_an_ancestor_counts(tmp_path):
    root = tmp_path / "cg"
    _write(tmp_path / "self", "4:memory:/outer/inner\n0::/\n")
    _write(root / "memory/outer/inner/memory.limit_in_bytes", str(1 << 62))  # unlimited here
    _write(root / "memory/outer/inner/memory.usage_in_bytes", "100")
    _write(root / "memory/outer/memory.limit_in_bytes", str(2 << 30))
    _write(root / "memory/outer/memory.usage_in_bytes", str(512 << 20))
    assert cgroup_headroom(tmp_path / "self", root) == (2 << 30) - (512 << 20)


def test_v2_max_and_current(tmp_path):
    root = tmp_path / "cg"
    _write(tmp_path / "self", "0::/user.slice/app\n")
    _write(root / "user.slice/app/memory.max", str(3 << 30))
    _write(root / "user.slice/app/memory.current", str(1 << 30))
    _write(root / "user.slice/memory.max", "max")
    _write(root / "user.slice/memory.current", "5")
    assert cgroup_headroom(tmp_path / "self", root) == 2 << 30


def test_no_limits_or_no_cgroup_file(tmp_path):
    root = tmp_path / "cg"
    _write(tmp_path / "self", "0::/a\n")
    _write(root / "a/memory.max", "max")
    _write(root / "a/memory.current", "7")
    assert cgroup_headroom(tmp_path / "self", root) is None
    assert cgroup_headroom(tmp_path / "missing", root) is None


def test_default_budget_uses_the_cgroup_headroom(monkeypatch):
    monkeypatch.setattr("streammerge.budget.cgroup_headroom", lambda: 1 << 30)
    b = make_budget(None)
    assert b.max_ram == 1 << 29 and "cgroup" in b.source
    assert make_budget("512MiB").max_ram == 512 << 20 and not make_budget("512MiB").note
    capped = make_budget("2GiB")  # more than the machine can give: capped, with a note
    assert capped.max_ram == 1 << 30 and "2.0 GiB is more than the 1.0 GiB" in capped.note


def test_max_ram_errors_name_the_option():
    with pytest.raises(StreamMergeError, match="--max-ram"):
        make_budget("lots")


@pytest.mark.parametrize("text, expected", [("512MiB", 512 * 2**20), ("5GB", 5 * 10**9), ("1.5G", 3 * 2**29),
                                            ("4096B", 4096), (" 2 gib ", 2 * 2**30), (4096, 4096)])
def test_sizes_are_read_with_their_unit(text, expected):
    from streammerge.units import parse_size

    assert parse_size(text, "--max-ram") == expected


@pytest.mark.parametrize("text", ["4", "0.5", "1000000"])
def test_a_size_without_a_unit_is_refused_with_the_choices(text):
    from streammerge.units import parse_size

    with pytest.raises(StreamMergeError, match=rf"--shard-size: '{re.escape(text)}' has no unit: write it, e\.g\. "
                                               rf"{re.escape(text)}GiB"):
        parse_size(text, "--shard-size")
