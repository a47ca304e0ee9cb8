"""bench/threads.py's scaling report: the speed-up table over the one-thread run, the threads beyond the physical
cores marked, the plot's panels, and the plan's worker count it reads for each ``--threads``. Nothing is timed."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_threads():  # type: ignore[no-untyped-def]
    """bench/threads.py, loaded as a module (it imports bench/run.py)."""
    spec = importlib.util.spec_from_file_location("bench_threads", BENCH / "threads.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method: str, threads: int, compute: float, busy: int = 0, workers: int | None = None) -> dict:
    return {"method": method, "build": "streammerge", "threads": threads, "workers": workers or threads,
            "busy": busy, "wall_s": compute + 2.0, "cpu_s": 3.0 * compute, "compute_s": compute,
            "peak_rss": 800 << 20, "steal_s": 0.0, "iowait_s": 0.0}


ROWS = [row("widen", 1, 8.0), row("widen", 2, 4.5), row("widen", 4, 2.5, workers=3), row("widen", 2, 9.0, busy=2),
        row("ties", 2, 3.0)]  # ties has no one-thread run: no scaling rows


def test_scaling_is_each_method_against_its_own_one_thread_run() -> None:
    table = bench_threads().scaling(ROWS)
    assert [(r["method"], r["threads"]) for r in table] == [("widen", 1), ("widen", 2), ("widen", 4)]
    assert [round(r["speedup"], 4) for r in table] == [1.0, round(8.0 / 4.5, 4), 3.2]
    assert [round(r["of_linear"], 4) for r in table] == [1.0, round(8.0 / 9.0, 4), 0.8]


def test_report_has_the_scaling_table_and_marks_threads_beyond_the_physical_cores() -> None:
    report = bench_threads().render(ROWS, {"streammerge": 2.0}, cores=4, shape="qwen2-0.5b", max_ram="1GiB",
                                    outputs_on="ext4", physical=2)
    assert "4 cores (2 physical)" in report
    assert "| widen | 2 | 2 | 4.50 | 13.5 | 1.78× | 0.89 |" in report
    assert "| widen | 4 | 3 | 2.50 | 7.5 | 3.20× | 0.80 (beyond the physical cores) |" in report
    assert "| widen | streammerge | 2 | 2 | 2 | 11.0 |" in report  # the busy row, with its plan's workers
    assert "| ties | 2 |" not in report.split("## Scaling")[1]


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">I", data[16:20])[0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plot needs matplotlib")
def test_plot_has_a_scaling_panel_beside_the_load_panel(tmp_path: Path) -> None:
    threads = bench_threads()
    threads.plot(ROWS, 4, tmp_path / "both.png", physical=2)
    threads.plot([r for r in ROWS if r["busy"] == 0], 4, tmp_path / "scaling.png", physical=2)
    threads.plot([r for r in ROWS if r["threads"] == 2], 4, tmp_path / "load.png", physical=2)
    assert png_width(tmp_path / "both.png") == 2 * png_width(tmp_path / "scaling.png")
    assert png_width(tmp_path / "scaling.png") == png_width(tmp_path / "load.png")


def test_plan_workers_reads_the_plan_of_each_thread_count(tmp_path: Path) -> None:
    threads = bench_threads()
    if not Path(threads.script(sys.executable)).is_file():
        pytest.skip("no streammerge console script beside this python")
    from streammerge.examples import write_family

    write_family(tmp_path / "tiny", "tiny")
    cli = [threads.script(sys.executable)]
    got = [threads.plan_workers(cli, tmp_path / "tiny", "widen", [], t, "1GiB") for t in (1, 2)]
    assert got == [1, 2]
    # a budget with no room for a second worker's share: the plan merges one tensor at a time
    assert threads.plan_workers(cli, tmp_path / "tiny", "widen", [], 2, "600KiB") == 1


def test_each_cell_shows_its_median_round() -> None:
    threads = bench_threads()
    runs = [{**row("widen", 1, c), "round": i} for i, c in enumerate([8.0, 6.0, 9.0])]
    runs += [{**row("widen", 2, c), "round": i} for i, c in enumerate([5.0, 3.0])]
    cells = threads.medians(runs)
    assert [(r["threads"], r["compute_s"], r["rounds"], r["wall_range"]) for r in cells] == \
        [(1, 8.0, 3, (8.0, 11.0)), (2, 3.0, 2, (5.0, 7.0))]  # two rounds: the lower middle one
    report = threads.render(cells, {"streammerge": 2.0}, cores=2, shape="s", max_ram="1GiB", rounds=3)
    assert "3 rounds of the whole grid" in report and "| widen | streammerge | 1 | 1 | 0 | 10.0 (8.0–11.0) |" in report
    assert "| widen | 2 | 2 | 3.00 | 9.0 | 2.67× | 1.33 |" in report


def test_kernels_e2e_merges_with_this_builds_console_script(tmp_path: Path) -> None:
    """bench/kernels.py's end-to-end table shares threads.py's merge command: one round on the tiny family runs,
    times the merge and compares its output (a launcher passed as a string was split into its characters)."""
    if importlib.util.find_spec("numba") is None or not Path("/usr/bin/time").exists():
        pytest.skip("the end-to-end table needs numba and /usr/bin/time")
    if not Path(bench_threads().script(sys.executable)).is_file():
        pytest.skip("no streammerge console script beside this python")
    from streammerge.examples import write_family

    write_family(tmp_path / "tiny", "tiny")
    sys.path.insert(0, str(BENCH))  # kernels.py imports run.py and threads.py from its folder
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
        assert spec is not None and spec.loader is not None
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
        report, data = kernels.e2e(tmp_path / "tiny", ["task_arithmetic"], [1], 1, "1GiB", None,
                                   work_arg=tmp_path, with_eager=False)
    finally:
        sys.path.remove(str(BENCH))
    assert "task_arithmetic" in report and "| 1 |" in report
