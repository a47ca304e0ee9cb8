"""The error types streammerge raises.

Every failure a user can cause (bad input files, bad options, an impossible budget) raises a subclass of
:class:`StreamMergeError` with a message that says what is wrong, where (file, tensor, rows) and what to do.
The CLI turns these into exit status 1; anything else is a bug. Header validation has one named error per
failure so tests (and callers) can tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class StreamMergeError(Exception):
    """Base class of every error caused by the user's input or options."""


class InputError(StreamMergeError):
    """A model folder or checkpoint cannot be used (missing, pickled, inconsistent)."""


class IncompatibleModelsError(InputError):
    """The models are not homologous: names, shapes, architectures or tying differ."""


class QuantizationError(IncompatibleModelsError):
    """An input is quantized in a form streammerge does not dequantize; ``evidence`` says what shows it."""

    def __init__(self, who: str, folder: object, evidence: str) -> None:
        self.evidence = evidence
        super().__init__(
            f"{who} ({folder}) is quantized in a form streammerge does not dequantize (it dequantizes FP8 weights "
            f"with float scales): {evidence}. Dequantize it first (e.g. load it with transformers and save it as "
            "bfloat16 safetensors), or merge the unquantized release of the same model; merging quantized codes as "
            "if they were weights gives a broken model")


class AdapterError(InputError):
    """A LoRA adapter cannot be applied: not a PEFT LoRA folder, pickled, a feature streammerge does not apply, or
    tensors that do not fit the model they are applied to. The message names the adapter folder and the tensor."""


class MethodError(StreamMergeError):
    """Unknown method or parameter, or a parameter value out of range."""


class PlanError(StreamMergeError):
    """The merge cannot be planned: budget too small, output folder in the way, ..."""


class NonFiniteError(StreamMergeError):
    """A merged chunk contains NaN or infinity, or overflows the output dtype."""

    def __init__(self, message: str, tensor: str = "", overflow: bool = False) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.overflow = overflow


class HeaderError(InputError):
    """A safetensors file's header is malformed; subclasses name the exact defect."""


class FileTooSmallError(HeaderError):
    """The file is shorter than the 8-byte header-length prefix."""


class HeaderTooLargeError(HeaderError):
    """The declared header length exceeds the hard cap."""


class HeaderLengthError(HeaderError):
    """The declared header length runs past the end of the file."""


class HeaderEncodingError(HeaderError):
    """The header bytes are not valid UTF-8."""


class HeaderNotJSONError(HeaderError):
    """The header is not valid JSON (or uses NaN/Infinity, or does not start with '{')."""


class HeaderNotObjectError(HeaderError):
    """The header JSON is not an object."""


class DuplicateKeyError(HeaderError):
    """The header JSON repeats a key."""


class MetadataError(HeaderError):
    """``__metadata__`` is not a map of strings to strings."""


class TensorEntryError(HeaderError):
    """A tensor entry is not an object with exactly dtype, shape and data_offsets, or has an empty name."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype is not one safetensors defines."""


class ShapeError(HeaderError):
    """A tensor's shape is not a list of non-negative integers, or its size overflows."""


class OffsetsError(HeaderError):
    """A tensor's data_offsets are not two non-negative integers with begin <= end."""


class SizeMismatchError(HeaderError):
    """shape x dtype size does not equal the tensor's byte range."""


class OffsetGapError(HeaderError):
    """The tensors' byte ranges leave a gap (they must be contiguous from 0)."""


class OffsetOverlapError(HeaderError):
    """Two tensors' byte ranges overlap."""


class TruncatedDataError(HeaderError):
    """The tensor data runs past the end of the file."""


class TrailingBytesError(HeaderError):
    """The file has bytes after the last tensor."""


class ProblemsError(StreamMergeError):
    """Several independent problems, reported together so they can be fixed in one go."""

    def __init__(self, errors: list[StreamMergeError]) -> None:
        super().__init__(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))
        self.errors = errors


class Problems:
    """Collects the errors of independent checks: ``with problems.check(): ...`` for each, then :meth:`raise_all`."""

    def __init__(self) -> None:
        self.errors: list[StreamMergeError] = []

    @contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except StreamMergeError as exc:
            self.errors.append(exc)

    def raise_all(self) -> None:
        """Raise the one error as it is, several as a :class:`ProblemsError`; nothing if all checks passed."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ProblemsError(self.errors)
