"""Errors that speak Python to Python callers.

Messages are written once, in the command line's terms (``--force``, ``--exclude REGEX``, ``streammerge resume
OUT``), because most users meet them there. At the Python API's boundary :func:`pythonic_errors` rewrites those
terms into the keyword arguments of :func:`streammerge.merge` and :func:`streammerge.plan` (``force=True``,
``exclude=[...]``, calling ``merge(...)`` again), keeping the exception's type.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import StreamMergeError
from .stopping import MergeInterrupted

#: (pattern, replacement), applied in order
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"`streammerge resume [^`]*` \(or the same command again\)"), "the same merge(...) call again"),
    (re.compile(r"`streammerge resume [^`]*`"), "the same merge(...) call again"),
    (re.compile(r"(?:the same|the original) (?:merge )?command"), "the same merge(...) call"),
    (re.compile(r"run the command again"), "call merge(...) again"),
    (re.compile(r"one value per --model, in order, separated by commas,"), "a list with one value per model, in order,"),
    (re.compile(r"--exclude '([^']*)'"), r"exclude=['\1']"),
    (re.compile(r"--exclude REGEX"), "exclude=[REGEX, ...]"),
    (re.compile(r"--param ([\w.]+)=(\S+)"), r"params={'\1': \2}"),
    (re.compile(r"--device (cpu|auto|cuda\S*)"), r"device='\1'"),
    (re.compile(r"--dtype (\w+)"), r"dtype='\1'"),
]
_FLAGS = {  # boolean flags become =True; valued options keep their value after the keyword
    "--force": "force=True", "--restart": "restart=True", "--redo-changed": "redo_changed=True",
    "--allow-incomplete-output": "allow_incomplete_output=True", "--keep-vision": "keep_vision=True",
    "--max-ram": "max_ram", "--max-vram": "max_vram", "--out": "out", "--model": "models", "--base": "base",
    "--tokenizer-from": "tokenizer_from", "--tokenizer-source": "tokenizer_source", "--shard-size": "shard_size", "--embedding": "embedding_names",
    "--exclude": "exclude=[...]", "--dtype": "dtype", "--device": "device", "--param": "params", "--method": "method",
    "--plot": "plot", "--top-k": "top_k",
    "--part": "part", "--parts": "parts", "--resize-shards": "resize_shards=True", "--executor": "executor",
    "--ray-address": "ray_address",
}
_FLAG = re.compile(r"--[a-z][a-z-]*")


def pythonize(message: str) -> str:
    """``message`` with command-line options and commands named as the Python API's arguments and calls."""
    for pattern, replacement in _REWRITES:
        message = pattern.sub(replacement, message)
    return _FLAG.sub(lambda m: _FLAGS.get(m.group(0), m.group(0)), message)


@contextmanager
def pythonic_errors() -> Iterator[None]:
    """Rewrite the message of any :class:`StreamMergeError` or :class:`MergeInterrupted` raised inside (same
    exception, same type)."""
    try:
        yield
    except (StreamMergeError, MergeInterrupted) as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (pythonize(exc.args[0]), *exc.args[1:])
        raise
