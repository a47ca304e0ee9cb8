"""Where the arithmetic runs: ``--device auto|cpu|cuda[:N]``, and how chunks get there and back.

On the CPU the staged chunks are used in place. On a CUDA device the reader's slots and the writer's buffers are
pinned host memory; each chunk's inputs are copied to the GPU with non-blocking transfers on a side stream, merged
there, and the cast output is copied back on the same side stream into the pinned output buffer the writer takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._torch import torch
from .errors import StreamMergeError


class DeviceError(StreamMergeError):
    """The requested device does not exist or cannot be used."""


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {spec}: write cuda or cuda:N with N a device number, e.g. cuda:0")
        if not cuda_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)")
            raise DeviceError(f"--device {spec}: {why}; use --device cpu (or auto)")
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"--device {spec}: there are {count} CUDA device(s), numbered 0 to {count - 1}")
        return torch.device("cuda", index)
    raise DeviceError(f"--device {spec}: choose auto, cpu, cuda or cuda:N")


def gpu_memory_peak(device: str) -> int | None:
    """Peak bytes torch's allocator reserved on a CUDA ``device`` in this process (None for the CPU)."""
    if not device.startswith("cuda") or not cuda_available():
        return None
    return int(torch.cuda.max_memory_reserved(torch.device(device)))


def free_vram(device: torch.device | str) -> int:
    """Bytes of memory free on a CUDA device now."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


@dataclass
class CpuCompute:
    """Chunks are computed where the reader put them."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pin: bool = False  # whether staging buffers are pinned
    copies: bool = False  # whether inputs are copied away (so their slot can be refilled at once)

    def upload(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs

    def output_like(self, host: torch.Tensor) -> torch.Tensor:
        return host

    def download(self, result: torch.Tensor, host: torch.Tensor) -> None:
        pass  # the result was cast straight into the host buffer


class CudaCompute:
    """Pinned staging, copies on a side stream, arithmetic on the GPU's current stream."""

    pin = True
    copies = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    def upload(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy staged (pinned) inputs to the GPU; returns once the copies are done, so the slot can be reused."""
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.side):
            out = [x.to(self.device, non_blocking=True) for x in inputs]
        for x in out:
            x.record_stream(compute)  # the allocator must not reuse them before the compute is done
        compute.wait_stream(self.side)
        self.side.synchronize()
        return out

    def output_like(self, host: torch.Tensor) -> torch.Tensor:
        return torch.empty(host.shape, dtype=host.dtype, device=self.device)

    def download(self, result: torch.Tensor, host: torch.Tensor) -> None:
        """Copy the cast output back into the pinned host buffer (on the side stream, after the compute)."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            host.copy_(result, non_blocking=True)
            result.record_stream(self.side)
        self.side.synchronize()


def compute_class(device: torch.device) -> type[CpuCompute] | type[CudaCompute]:
    """The compute of ``device`` (its ``pin`` says whether host staging buffers are pinned)."""
    return CudaCompute if device.type == "cuda" else CpuCompute


def make_compute(device: torch.device) -> CpuCompute | CudaCompute:
    return CudaCompute(device) if compute_class(device) is CudaCompute else CpuCompute()
