"""What a merge shows while it runs and says when it ends.

One bar over the input bytes the merge reads, labelled with the overall phase (``merging 37/290``) and, after
the bar, the current tensor and its step (``model.layers.3.mlp.up_proj.weight · statistics 1/2``). Tensors go by
in the plan's order (layer numbers sorted as numbers, see :func:`streammerge.classify.in_natural_order`). On a
resumed run the bytes of the work already done start the bar (so the percentage is of the whole merge) but do
not count toward the rate. At the end, one line (:class:`RunSummary`): elapsed time, bytes read and written in
this run, the read rate, peak RSS, peak GPU memory and the output's size.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .units import format_size


@dataclass(frozen=True)
class RunSummary:
    """What one run of a merge did. Sizes in bytes, times in seconds; ``peak_vram`` is torch's allocator peak on
    a CUDA device (None on the CPU); ``peak_rss`` is this process's peak resident memory."""

    out: str
    tensors: int
    tensors_resumed: int  # already done by an earlier, interrupted run
    elapsed: float
    bytes_read: int
    bytes_written: int
    peak_rss: int
    peak_vram: int | None
    output_bytes: int
    output_files: int

    @property
    def read_rate(self) -> float:
        """Bytes read per second of this run."""
        return self.bytes_read / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        """``merged 290 tensors in 12.3 s: read 2.7 GiB (224.0 MiB/s), wrote 988.0 MiB; peak RSS 1.1 GiB; …``"""
        resumed = f" ({self.tensors_resumed} done before)" if self.tensors_resumed else ""
        vram = f", peak GPU memory {format_size(self.peak_vram)}" if self.peak_vram is not None else ""
        return (f"merged {self.tensors} tensors{resumed} in {self.elapsed:.1f} s: read {format_size(self.bytes_read)} "
                f"({format_size(self.read_rate)}/s), wrote {format_size(self.bytes_written)}; peak RSS "
                f"{format_size(self.peak_rss)}{vram}; output {format_size(self.output_bytes)} in "
                f"{self.output_files} file(s)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "read_rate": self.read_rate}


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files directly in ``folder``."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


class Progress:
    """The bar of one run, and the figures of its summary. ``show=False`` keeps the figures and draws nothing."""

    def __init__(self, total_bytes: int, show: bool) -> None:
        self.started = time.monotonic()
        self.total_bytes = total_bytes
        self.show = show
        self.bar: tqdm | None = None
        self.tensors = self.resumed = self.index = 0
        self.bytes_read = self.bytes_written = 0
        self._lock = threading.Lock()  # the compute workers report from their threads

    def say(self, text: str) -> None:
        """A line before the bar exists (a phase that reads no input: checking a resumed run's work)."""
        if self.show:
            print(text, file=sys.stderr)

    def begin(self, tensors: int, resumed: int, done_bytes: int) -> None:
        """The merge proper starts: ``tensors`` in all, ``resumed`` of them finished before, ``done_bytes`` of
        the input reads already done by an earlier run (they start the bar and are left out of the rate)."""
        self.tensors, self.resumed = tensors, resumed
        self.bar = tqdm(total=self.total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        # a bar redrawn with carriage returns garbles a log or a pipe: drawn on a terminal only
                        disable=not self.show or not sys.stderr.isatty(), desc=self._label(), dynamic_ncols=True,
                        leave=False)

    def tensor(self, index: int) -> None:
        """Tensor ``index`` (0-based, in the order the run takes them) starts."""
        with self._lock:
            self.index = max(self.index, index)
            if self.bar is not None:
                self.bar.set_description(self._label(), refresh=False)

    def step(self, name: str, text: str) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.set_postfix_str(f"{name} · {text}", refresh=False)

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
        self.moved(nbytes)

    def skipped(self, nbytes: int) -> None:
        """``nbytes`` of the plan's reads were left unread (a statistics pass the merge settled early): the bar
        moves on, the bytes read do not."""
        self.moved(nbytes)

    def moved(self, nbytes: int) -> None:
        """``nbytes`` more of the plan's reads are done, read or left unread: the bar moves on."""
        with self._lock:
            if self.bar is not None and nbytes:
                self.bar.update(nbytes)

    def wrote(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes

    def finishing(self) -> None:
        if self.bar is not None:
            self.bar.set_description("publishing", refresh=False)
            self.bar.set_postfix_str("", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, out: Path, peak_vram: int | None) -> RunSummary:
        size, files = folder_size(out)
        return RunSummary(str(out), self.tensors, self.resumed, time.monotonic() - self.started, self.bytes_read,
                          self.bytes_written, peak_rss(), peak_vram, size, files)

    def _label(self) -> str:
        return f"merging {min(self.index + 1, self.tensors)}/{self.tensors}"
