"""How streamed tensors are cut into rows: dim 0 is the row axis, a 0-D tensor is one row of one element.

One mixin owns this arithmetic for every object that describes a tensor (a stored tensor's header entry, a method's
task, a planned output tensor), so they cannot disagree about what a row is.
"""

from __future__ import annotations

import math


class RowLayout:
    """Mixin for objects with a ``shape`` attribute (a tuple of ints)."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows along dim 0 (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row (1 for a scalar or a vector)."""
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
