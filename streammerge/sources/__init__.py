"""Input sources: where the rows of one input of a tensor come from, and how they become float32.

The planner gives every tensor one source per input (the base first, then the models). A source says which byte
ranges of which files hold rows [r0, r1) (the reader thread reads exactly those into a slot), turns the bytes it
asked for into tensors (``parts``), and turns parts into float32 rows for the method. The runner never looks inside:
a tensor stored as bfloat16, an FP8 tensor with block scales dequantized on the fly, or a LoRA product are all the
same thing to it. Adding an input kind is one module here that subclasses :class:`InputSource`.
"""

from __future__ import annotations

from .base import ByteRange, InputSource
from .stored import StoredSource

__all__ = ["ByteRange", "InputSource", "StoredSource"]
