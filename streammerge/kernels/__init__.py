"""Fused element-wise kernels: one pass over a compute block's raw input rows, in place of a chain of eager torch
operations through float32 temporaries, with the same output bytes.

A method's merge pass is element-wise once its statistics are known: task arithmetic's ``B + λ·Σ w_k(M_k − B)``,
TIES/DARE/Breadcrumbs' keep, rescale and sign election, WIDEN's per-column weighted sum. Eagerly each is several
torch operations, each a pass over memory with its own float32 temporary, then a cast into the output dtype: about
2.3 ns per element on one thread. A fused kernel reads the stored rows (bfloat16, float16 or float32), widens
them in registers, does every operation of the eager code in the same order with the same float32 rounding, and
writes the output dtype directly (the cast fused in), counting non-finite results as it goes.

Why numba (bench/kernels.py, one thread, task arithmetic of two bfloat16 models, bfloat16 out; the same run):
eager torch 2.3 ns/element; torch.compile (inductor) 0.6 ns and byte-identical, but 4–6 s of compiling in every
new process (16 s with an empty inductor cache) and a C++ compiler on the machine; numba 0.6 ns (1.2 as a first
scalar loop; the bit casts as LLVM bitcasts and loops it can vectorise halve that), byte-identical, under a second to
compile a kernel once, and ``cache=True`` keeps the machine code on disk, so a later process loads it in
milliseconds. Its kernels are single-threaded and release the GIL, as the engine's compute workers need
(streammerge.workers). The price: numba's import (0.2 s) and about 100 MiB of memory in a merging process.

The backend: numba when it is installed (``pip install 'streammerge[fast]'``), else eager torch, the reference the
fused path must equal byte for byte. ``STREAMMERGE_KERNELS=eager`` forces eager torch, ``=numba`` forces numba
(an error when it is missing); ``auto`` (the default) picks. The engine asks :func:`enabled` once per tensor, then
calls a method's ``emit_raw``/``accumulate_raw`` (methods.base.TensorMerge) with the raw rows; the wrappers here
return None when the inputs are not something a kernel takes (a GPU tensor, another dtype, models of mixed
dtypes), and the engine falls back to the method's eager code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._torch import torch
from ..errors import StreamMergeError

if TYPE_CHECKING:  # numpy is imported on first use: the runner imports this module, and --help never computes
    import numpy as np

#: the environment variable that forces a backend: ``eager``, ``numba`` or ``auto``
ENV = "STREAMMERGE_KERNELS"
BACKENDS = ("auto", "eager", "numba")

_compiled: ModuleType | None = None  # (not ``_numba``: a package attribute of that name would shadow the submodule)
_missing: str | None = None  # why numba could not be imported, once tried


class KernelsError(StreamMergeError):
    """``STREAMMERGE_KERNELS`` names no backend."""


class KernelsUnavailable(KernelsError, ImportError):
    """``STREAMMERGE_KERNELS=numba`` but the kernels cannot be loaded (numba is not installed, or fails)."""


def _load() -> ModuleType | None:
    global _compiled, _missing
    if _compiled is None and _missing is None:
        try:
            from . import _numba as module  # noqa: PLC0415  (numba's import costs ~0.3 s: only when merging)
        except Exception as exc:  # not installed, or numba cannot set up (e.g. no writable cache folder at all)
            _missing = f"{type(exc).__name__}: {exc}"
        else:
            _compiled = module
    return _compiled


def backend() -> str:
    """``"numba"`` or ``"eager"``, from :data:`ENV` (read at every call, so a test can switch it) and whether
    numba imports."""
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if asked not in BACKENDS:
        raise KernelsError(f"{ENV}={asked!r}: expected one of {', '.join(BACKENDS)}")
    if asked == "eager":
        return "eager"
    if _load() is not None:
        return "numba"
    if asked == "numba":
        raise KernelsUnavailable(f"{ENV}=numba but numba cannot be imported ({_missing}); pip install "
                                 "'streammerge[fast]', or unset it")
    return "eager"


#: ``auto`` uses the kernels for merges of at least this many merged elements (about 100M parameters): loading numba
#: and the cached kernels costs a process about 0.5 s, which they repay at 1.5–5 ns saved per element and pass
#: (bench/kernels.py); a small merge (a test, the quick start) starts faster without them
AUTO_MIN_ELEMENTS = 100_000_000


#: memory the kernels' runtime adds to a merging process, which the plan takes off the budget: numba's import
#: (about 59 MiB of RSS) and the first compiled kernels loaded from the cache (about 46 MiB more), measured beside
#: ``import streammerge.cli, torch`` (224 MiB) with numba 0.68; rounded up
RUNTIME_BYTES = 128 << 20


def enabled(elements: int | None = None, budget: int | None = None) -> bool:
    """Whether the fused kernels are used for a merge of ``elements`` merged elements (None: any size) within
    ``budget`` bytes for its buffers (None: any): always with ``numba``, never with ``eager``, and with ``auto``
    when numba imports, the merge is large enough (:data:`AUTO_MIN_ELEMENTS`; a smaller one does not import numba
    at all) and the runtime takes at most a quarter of the budget (:data:`RUNTIME_BYTES`)."""
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if asked == "auto" and ((elements is not None and elements < AUTO_MIN_ELEMENTS)
                            or (budget is not None and 4 * RUNTIME_BYTES > budget)):
        return False
    return backend() == "numba"


# ---- torch tensors as the kernels' arrays ------------------------------------------------------------------------
def array(x: torch.Tensor) -> np.ndarray | None:
    """A flat numpy view of a contiguous CPU tensor in a kernel's element type (bfloat16 bits as uint16, float16
    bits as int16, float32), sharing its memory; None for anything else.

    Made from the tensor's address, not by torch's ``view``/``numpy``: torch's operators release the GIL, and a
    compute worker taking it back waits for whichever thread holds it, up to the interpreter's switch interval
    (5 ms). Beside a thread running Python, ``x.view(torch.int16)`` took 0.9 ms a call instead of 5 µs, four
    times per block (bench/README.md, "The third session"). The buffer object under the array holds ``x``, so
    the memory lives as long as the array."""
    import ctypes  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    if x.device.type != "cpu" or not x.is_contiguous():
        return None
    if x.dtype == torch.bfloat16:
        kind = np.dtype(np.uint16)
    elif x.dtype == torch.float16:
        kind = np.dtype(np.int16)
    elif x.dtype == torch.float32:
        kind = np.dtype(np.float32)
    else:
        return None
    if x.numel() == 0:
        return np.empty(0, dtype=kind)
    memory = (ctypes.c_char * (x.numel() * kind.itemsize)).from_address(x.data_ptr())
    memory.owner = x  # type: ignore[attr-defined]  (keeps the tensor's storage alive)
    return np.frombuffer(memory, dtype=kind)


def arrays(base: torch.Tensor | None, models: Sequence[torch.Tensor],
           out: torch.Tensor | None = None) -> tuple[Any, tuple[np.ndarray, ...], Any] | None:
    """(base, models, out) as arrays (``models`` a tuple of one element type, as a kernel takes them), or None when
    one of them is not a kernel's array or the models' types differ. ``base``/``out`` None stay None."""
    ms = tuple(array(m) for m in models)
    if not ms or any(m is None for m in ms) or len({m.dtype for m in ms}) != 1:  # type: ignore[union-attr]
        return None
    b = array(base) if base is not None else None
    o = array(out) if out is not None else None
    if (base is not None and b is None) or (out is not None and o is None):
        return None
    n = ms[0].shape[0]  # type: ignore[union-attr]
    if any(m.shape[0] != n for m in ms) or (b is not None and b.shape[0] != n) \
            or (o is not None and o.shape[0] != n):  # type: ignore[union-attr]
        return None
    return b, ms, o  # type: ignore[return-value]


#: how a model's keep factor reaches ``sparse_merge``/``l1_sums``: none, a selection's thresholds, a float32 factor
#: array, DARE's drop mask drawn in the kernel, DELLA's decisions made in ``l1_sums`` and written as bits
#: (MAGPRUNE), or those bits read back by ``sparse_merge`` (BITS)
NO_FACTOR, SELECT, FACTOR, RANDOM, MAGPRUNE, BITS = 0, 1, 2, 3, 4, 5


def f32(values: Sequence[float]) -> np.ndarray:
    """Python numbers as float32, as torch casts a Python number to a float32 tensor's dtype (round to nearest)."""
    import numpy as np  # noqa: PLC0415

    return np.asarray(values, dtype=np.float64).astype(np.float32)


def kernels() -> ModuleType:
    """The compiled kernels (:mod:`._numba`); only when :func:`enabled`."""
    module = _load()
    if module is None:
        raise KernelsUnavailable(f"numba cannot be imported ({_missing})")
    return module
