"""Quantized inputs: FP8 checkpoints are dequantized on the fly; every other quantized format is refused up front.

:func:`dequantization` decides, once per checkpoint and from its headers and config alone, how each FP8 weight is
read (an :class:`~streammerge.sources.fp8.Fp8Source`: codes times their scales) and which tensors exist only for
quantized inference and are not part of the model (the scales themselves, static activation scales
``input_scale``, KV-cache scales ``k_scale``/``v_scale``). Everything after reads the checkpoint it returns, in which
those tensors do not exist, and the sources it names.

Formats streammerge does not dequantize (bitsandbytes 4/8-bit, GPTQ, AWQ, MXFP4/MXFP8, integer compressed-tensors,
FP4/FP6 codes) are refused before anything is written, naming the format and saying to dequantize first: merging
quantized codes as if they were weights gives a broken model.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import QuantizationError
from .formats.checkpoint import Checkpoint, Located
from .sources.base import InputSource
from .sources.fp8 import Fp8Source

#: the FP8 code dtypes dequantized on the fly
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
#: safetensors dtypes that only hold quantized codes or scales
QUANTIZED_DTYPES = frozenset({*FP8_DTYPES, "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})
#: scale dtypes an FP8 weight may carry (E8M0 power-of-two scales belong to the MX formats, not dequantized)
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
#: the scale tensor beside FP8 weight ``X.weight``: ``X.weight_scale_inv`` (block scales) or ``X.weight_scale``
SCALE_SUFFIXES = ("_scale_inv", "_scale")
#: ``quant_method`` values whose checkpoints hold FP8 weights with float scales
FP8_METHODS = frozenset({"fp8", "fbgemm_fp8", "compressed-tensors", "modelopt"})
#: the block size of DeepSeek-V3-style block scales when the config does not give one
DEFAULT_BLOCK = (128, 128)
#: tensors only quantized inference uses: static activation scales and KV-cache scales (dropped with the scales)
_INFERENCE_SCALES = re.compile(r"\.(input_scale|output_scale|[kvq]_scale|kv_scale)$")
#: tensors that only exist beside weights quantized in a format streammerge does not dequantize
_FOREIGN_COMPANION = re.compile(
    r"(\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map|\.qweight|\.qzeros|\.g_idx|\.SCB|"
    r"\.weight_format|\.weight_zero_point|_blocks|\.weight_packed|\.weight_shape|\.weight_global_scale)$"
    r"|\.quant_state\."
)


@dataclass(frozen=True)
class Dequantization:
    """How one checkpoint is read: ``checkpoint`` without the tensors only quantized inference uses, the FP8
    weights' sources by name, and a one-line description of the format (None when nothing is quantized)."""

    checkpoint: Checkpoint
    sources: dict[str, Fp8Source]
    dropped: tuple[str, ...]
    description: str | None
    #: the sources a LoRA adapter on the checkpoint decides (streammerge.lora.adapted), by stored name; they read
    #: the weights through ``sources`` where those are FP8, and take precedence over them
    adapted: dict[str, InputSource] = dataclasses.field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.description is not None


def quantization_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The ``quantization_config`` of config.json (or its ``text_config``), or None."""
    for config in (ckpt.config, ckpt.config.get("text_config")):
        if isinstance(config, dict) and isinstance(config.get("quantization_config"), dict):
            return config["quantization_config"]
    return None


def dequantization(ckpt: Checkpoint, who: str = "the checkpoint") -> Dequantization:
    """Decide how ``ckpt`` is read (see the module docstring).

    Raises :class:`~streammerge.errors.QuantizationError` for a quantized format streammerge does not dequantize,
    an FP8 weight without a float scale tensor or whose scale grid does not fit its shape, naming ``who``, the
    folder and the evidence."""
    qc = quantization_config(ckpt)
    problem = _foreign_format(ckpt, qc)
    if problem:
        raise QuantizationError(who, ckpt.folder, problem)
    block = _configured_block(qc)
    sources: dict[str, Fp8Source] = {}
    dropped: list[str] = []
    for name, loc in ckpt.tensors.items():
        if loc.info.dtype.name not in FP8_DTYPES:
            continue
        scale_name = next((name + s for s in SCALE_SUFFIXES if name + s in ckpt.tensors), None)
        if scale_name is None:
            raise QuantizationError(who, ckpt.folder, f"tensor {name} is stored as {loc.info.dtype.name} but has no "
                                    f"scale tensor ({name}_scale_inv or {name}_scale), so its values are unknown")
        # keyed by the stored name: a view may list the tensor under another name (streammerge.slices)
        sources[loc.info.name] = _fp8_source(who, ckpt, name, loc, scale_name, ckpt.tensors[scale_name], block)
        dropped.append(scale_name)
    for name, loc in ckpt.tensors.items():
        if name in dropped:
            continue
        weight = _scaled_weight(name)
        if weight != name and weight in ckpt.tensors:  # scales of a weight that is not FP8 (e.g. int8 codes)
            raise QuantizationError(who, ckpt.folder, f"tensor {name} holds the scales of {weight}, which is "
                                    f"stored as {ckpt.tensors[weight].info.dtype.name}, not FP8")
        if _INFERENCE_SCALES.search(name):
            if not sources:
                raise QuantizationError(who, ckpt.folder, f"tensor {name} holds quantization scales but no weight "
                                        "is stored as FP8")
            dropped.append(name)
    if not sources and qc is None:
        return Dequantization(ckpt, {}, (), None)
    kept = {n: loc for n, loc in ckpt.tensors.items() if n not in set(dropped)}
    schemes = sorted({f"{s.codes.info.dtype.name} with {_scheme_words(s)}" for s in sources.values()})
    method = qc.get("quant_method", "unnamed") if qc else None
    description = (f"FP8 ({'; '.join(schemes) or 'no FP8 tensors'}"
                   + (f", quant_method {method!r}" if method else "") + ")")
    misfit = [n for n, src in sources.items() if block and src.scheme == "block" and src.block != block]
    if misfit:
        description += (f"; config.json's block size {list(block)} does not fit the scales of {len(misfit)} weight(s) "
                        f"(e.g. {misfit[0]}), which fit {DEFAULT_BLOCK[0]}×{DEFAULT_BLOCK[1]} blocks and are read so")
    return Dequantization(dataclasses.replace(ckpt, tensors=kept), sources, tuple(dropped), description)


def _scaled_weight(scale_name: str) -> str:
    for suffix in SCALE_SUFFIXES:
        if scale_name.endswith(suffix):
            return scale_name[: -len(suffix)]
    return scale_name


def _scheme_words(s: Fp8Source) -> str:
    return {"block": f"{s.block[0]}×{s.block[1]} block scales", "channel": "per-channel scales",
            "tensor": "per-tensor scales"}[s.scheme]


def _foreign_format(ckpt: Checkpoint, qc: dict[str, Any] | None) -> str | None:
    """Why ``ckpt`` is quantized in a format streammerge does not dequantize, or None."""
    if qc is not None:
        method = qc.get("quant_method", "unnamed")
        if method not in FP8_METHODS:
            return f"its config.json declares a quantization_config with quant_method {method!r}"
        if method == "compressed-tensors":
            for group in (qc.get("config_groups") or {}).values():
                weights = group.get("weights") if isinstance(group, dict) else None
                if isinstance(weights, dict) and (weights.get("type") != "float" or weights.get("num_bits") != 8):
                    return (f"its compressed-tensors quantization stores weights as {weights.get('num_bits')}-bit "
                            f"{weights.get('type')}, not FP8")
        if method == "modelopt" and "FP8" not in str(qc.get("quant_algo", "FP8")).upper():
            return f"its ModelOpt quantization is {qc.get('quant_algo')!r}, not FP8"
    for name, loc in ckpt.tensors.items():
        if loc.info.dtype.name in QUANTIZED_DTYPES - FP8_DTYPES:
            return f"tensor {name} is stored as {loc.info.dtype.name} (packed sub-byte codes or MX scales)"
    for name in ckpt.tensors:
        if _FOREIGN_COMPANION.search(name):
            return f"tensor {name} is a quantization companion (bitsandbytes/GPTQ/AWQ/MX state)"
    return None


def _configured_block(qc: dict[str, Any] | None) -> tuple[int, int] | None:
    """The block size of block scales as the config gives it (``weight_block_size``, or compressed-tensors'
    ``block_structure``), or None."""
    if not qc:
        return None
    candidates = [qc.get("weight_block_size")]
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            candidates.append(group["weights"].get("block_structure"))
    for c in candidates:
        if isinstance(c, list) and len(c) == 2 and all(isinstance(v, int) and v > 0 for v in c):
            return c[0], c[1]
    return None


def _fp8_source(who: str, ckpt: Checkpoint, name: str, loc: Located, scale_name: str, scale: Located,
                block: tuple[int, int] | None) -> Fp8Source:
    """The source of FP8 weight ``name``: its scheme from the scale's shape (see :mod:`streammerge.sources.fp8`)."""
    where = f"tensor {name} {list(loc.info.shape)}"
    if len(loc.info.shape) != 2:
        raise QuantizationError(who, ckpt.folder, f"{where} is a {len(loc.info.shape)}-D FP8 tensor (2-D FP8 weights "
                                "are dequantized)")
    if scale.info.dtype.name not in SCALE_DTYPES:
        raise QuantizationError(who, ckpt.folder, f"the scales of {where}, {scale_name}, are "
                                f"{scale.info.dtype.name} (MX-style power-of-two scales)")
    out, cols = loc.info.shape
    shape, n = tuple(scale.info.shape), scale.info.numel
    for b in (block, DEFAULT_BLOCK):
        if b and len(shape) == 2 and shape == (-(-out // b[0]), -(-cols // b[1])) and (b[0] > 1 or b[1] < cols):
            return Fp8Source(loc, scale, b, "block")
    if n == out and shape in ((out,), (out, 1)) and out > 1:
        return Fp8Source(loc, scale, (1, cols), "channel")
    if n == 1:
        return Fp8Source(loc, scale, (out, cols), "tensor")
    expect = f"[{-(-out // block[0])}, {-(-cols // block[1])}] for {block[0]}×{block[1]} blocks, " if block else ""
    raise QuantizationError(who, ckpt.folder, f"the scales of {where}, {scale_name}, have shape {list(shape)}, "
                            f"which fits no FP8 scheme ({expect}[{out}, 1] per channel or [1] per tensor)")
