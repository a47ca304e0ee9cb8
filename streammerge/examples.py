"""Synthetic model families for examples, tests and benchmarks (no downloads).

``write_family`` writes a base model and variants that differ from it the way a chat fine-tune (small deltas)
or a continual pre-train (larger deltas) would, as Hugging Face folders with a Qwen2- or Llama-shaped
``config.json``. Tensors are generated and written row chunk by row chunk through the streaming writer, so a
multi-gigabyte family needs little RAM. Values are deterministic functions of (seed, tensor, chunk).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import fsio, locks
from ._torch import torch
from .errors import PlanError
from .formats.dtypes import DTYPES, parse_output_dtype
from .output import check_can_create_in, publish, work_folder_for, write_index
from .workfolder import lock_work_folder
from .writer import OutTensor, ShardFile, layout_shard, shard_filename, split_into_shards


@dataclass(frozen=True)
class Shape:
    """Decoder dimensions of a Qwen2/Llama-style model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    attention_bias: bool = True  # Qwen2 has q/k/v biases; Llama has none
    model_type: str = "qwen2"


SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 160, 2, 4, 2, 257, tied=True),
    "tiny-untied": Shape(64, 160, 2, 4, 2, 257, tied=False),
    "tiny-llama": Shape(48, 112, 2, 4, 4, 301, tied=False, attention_bias=False, model_type="llama"),
    "qwen2-0.5b": Shape(896, 4864, 24, 14, 2, 151936, tied=True),
    "qwen2-1.5b": Shape(1536, 8960, 28, 12, 2, 151936, tied=True),
    "qwen2.5-3b": Shape(2048, 11008, 36, 16, 2, 151936, tied=True),
    "qwen2-7b": Shape(3584, 18944, 28, 28, 4, 152064, tied=False),
    "qwen1.5-14b": Shape(5120, 13696, 40, 40, 40, 152064, tied=False),
    # every tensor shape of Qwen1.5-14B but 8 of its 40 layers: 8.2 GB per model, so base + 2 and the output fit a
    # 64 GB disk (the full family and its output need 113 GB)
    "qwen1.5-14b-8layers": Shape(5120, 13696, 8, 40, 40, 152064, tied=False),
    # Qwen2-0.5B's embedding and 2 of its 24 layers: the embedding holds 82% of the elements, one tensor that would
    # keep one compute worker busy while the others idle (bench/README.md, workers helping with a large tensor)
    "qwen2-0.5b-2layers": Shape(896, 4864, 2, 14, 2, 151936, tied=True),
}

#: Variants of the base written by :func:`write_family`: (folder name, relative delta size).
DEFAULT_VARIANTS: tuple[tuple[str, float], ...] = (("chat", 0.1), ("multilingual", 0.3))


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order HF models list them."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out.append((p + "self_attn.q_proj.weight", (h, h)))
        out.append((p + "self_attn.k_proj.weight", (kv, h)))
        out.append((p + "self_attn.v_proj.weight", (kv, h)))
        if shape.attention_bias:
            out += [(p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        out.append((p + "self_attn.o_proj.weight", (h, h)))
        out.append((p + "mlp.gate_proj.weight", (shape.intermediate, h)))
        out.append((p + "mlp.up_proj.weight", (shape.intermediate, h)))
        out.append((p + "mlp.down_proj.weight", (h, shape.intermediate)))
        out.append((p + "input_layernorm.weight", (h,)))
        out.append((p + "post_attention_layernorm.weight", (h,)))
    out.append(("model.norm.weight", (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def config_for(shape: Shape, dtype: str) -> dict:
    arch = "Qwen2ForCausalLM" if shape.model_type == "qwen2" else "LlamaForCausalLM"
    return {
        "architectures": [arch], "model_type": shape.model_type, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": shape.tied, "torch_dtype": {"F32": "float32", "F16": "float16"}.get(dtype, "bfloat16"),
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": shape.attention_bias,
    }


def _gen(*key: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _chunk(name: str, shape: tuple[int, ...], r0: int, r1: int, seed: int, delta: float) -> torch.Tensor:
    """Rows [r0, r1) of a tensor: base values, plus a column-scaled delta for a variant."""
    rest = shape[1:]
    rows = r1 - r0
    if len(shape) == 1:  # norms near 1, biases near 0
        is_norm = "norm" in name
        base = torch.randn(rows, generator=_gen(seed, name, "base", r0)) * (0.05 if is_norm else 0.02)
        base += 1.0 if is_norm else 0.0
        scale = 0.05 if is_norm else 0.02
    else:
        base = torch.randn((rows, *rest), generator=_gen(seed, name, "base", r0)) * 0.02
        scale = 0.02
    if delta:
        # Each variant changes some columns (input features) much more than others, like real fine-tunes.
        cols = torch.rand(rest or (rows,), generator=_gen(seed, name, "cols", delta)) * 1.8 + 0.2
        if not rest:
            cols = cols[:rows]
        noise = torch.randn(base.shape, generator=_gen(seed, name, "delta", delta, r0))
        base += noise * cols * (scale * delta)
    return base


def write_model(folder: Path, shape: Shape, seed: int = 0, delta: float = 0.0, dtype: str = "bf16",
                shard_size: int = 2 * 1000**3, chunk_elements: int = 1 << 22) -> Path:
    """Write one model folder; ``delta`` 0 is the base, otherwise a variant with relative delta size ``delta``."""
    folder.mkdir(parents=True, exist_ok=True)
    out_dtype = parse_output_dtype(dtype)
    torch_dtype = DTYPES[out_dtype.name].torch
    specs = [OutTensor(name, out_dtype.name, s) for name, s in tensor_shapes(shape)]
    groups = split_into_shards(specs, shard_size)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        layout = layout_shard(shard_filename(i, len(groups)), group)
        f = ShardFile(layout, folder)
        f.create()
        try:
            for t in group:
                rows = t.shape[0]
                row_numel = max(1, t.nbytes // max(rows, 1) // (out_dtype.bits // 8))
                step = rows if len(t.shape) == 1 else max(1, chunk_elements // row_numel)
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    data = _chunk(t.name, t.shape, r0, r1, seed, delta).to(torch_dtype)
                    f.write_at(t.name, r0 * row_numel * out_dtype.bits // 8, data.reshape(-1).view(torch.uint8).numpy())
                weight_map[t.name] = layout.filename
                total += t.nbytes
            f.finalize()
        finally:
            f.abort()
    if len(groups) > 1:
        write_index(folder, weight_map, total)
    (folder / "config.json").write_text(json.dumps(config_for(shape, out_dtype.name), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "note": "synthetic"}) + "\n")
    return folder


#: the file that marks a folder written by ``make-example`` (what was asked for, so a rerun can say it is there)
EXAMPLE_MARKER = "streammerge-example.json"


def model_bytes(shape: Shape, dtype: str = "bf16") -> int:
    """Bytes of tensor data in one model of ``shape`` stored as ``dtype``."""
    itemsize = parse_output_dtype(dtype).bits // 8
    return sum(math.prod(s) for _, s in tensor_shapes(shape)) * itemsize


def write_example(folder: str | Path, shape: str = "tiny", seed: int = 0, dtype: str = "bf16",
                  force: bool = False) -> tuple[dict[str, Path], bool]:
    """Write an example family (base, chat, multilingual) into ``folder`` the way merges are written: into
    ``FOLDER.streammerge-partial`` first, then published in one rename, so an interrupted or failed run leaves
    nothing behind. Returns (the models' paths, whether they were written); a folder that already holds this
    very example (same shape, dtype and seed) is left as it is, so the quick start can be run again.

    Raises :class:`~streammerge.errors.PlanError` for a path that cannot hold the example, or a folder that holds
    something else (unless ``force``: once the new example is complete, its ``base``, ``chat``, ``multilingual``
    and marker replace the folder's; anything else there, like a merge written beside it, is kept)."""
    folder = Path(folder)
    asked = {"shape": shape, "dtype": parse_output_dtype(dtype).name, "seed": seed}
    names = ("base", *(name for name, _ in DEFAULT_VARIANTS))
    if str(folder) in ("", ".") or folder.name in ("", ".", ".."):
        raise PlanError(f"{str(folder)!r} does not name a folder to create: give a new folder, e.g. demo")
    if folder.exists() and not folder.is_dir():
        raise PlanError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        try:
            marker = json.loads((folder / EXAMPLE_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = None
        if marker == asked and all((folder / n / "config.json").is_file() for n in names):
            return {n: folder / n for n in names}, False
        if isinstance(marker, dict):
            raise PlanError(f"{folder} holds another example ({marker}); choose another folder, or pass --force to "
                            "replace its base, chat and multilingual (other entries are kept)")
        raise PlanError(f"{folder} holds other files; choose another folder, or pass --force to write the example's "
                        "base, chat and multilingual there (replacing those, keeping the rest)")
    work = work_folder_for(folder)
    parent = fsio.parent_of(folder)
    existing = parent
    while not existing.exists():
        existing = existing.parent
    check_can_create_in(existing, "the example", "choose another folder")
    fsio.make_dirs(parent)
    lock = lock_work_folder(work, folder, "make-example")  # one writer at a time
    try:
        for entry in list(work.iterdir()):  # what an earlier, interrupted run left
            fsio.remove_tree(entry)
        write_family(work, shape, seed=seed, dtype=dtype)
        fsio.write_file(work / EXAMPLE_MARKER, (json.dumps(asked, indent=2) + "\n").encode(), sync_folder=True)
        if folder.is_dir() and any(folder.iterdir()):
            _replace_entries(work, folder, [*names, EXAMPLE_MARKER])
        else:
            for name in locks.LOCK_NAMES:  # the lock (held until the end) stays out of the published folder
                fsio.remove_tree(work / name)
            publish(work, folder, force=True)
    except BaseException:
        fsio.remove_tree(work)
        raise
    finally:
        lock.close()
    return {n: folder / n for n in names}, True


def _replace_entries(new: Path, folder: Path, entries: list[str]) -> None:
    """Put ``new``'s ``entries`` in place of ``folder``'s, one rename each, leaving the folder's other entries (a
    merge written beside the example, say) where they are; then delete ``new``."""
    for name in entries:
        old = folder / name
        trash = folder / f"{name}.streammerge-old"
        fsio.remove_tree(trash)
        if old.exists() or old.is_symlink():
            fsio.rename(old, trash)
        fsio.rename(new / name, old, sync_folders=[folder])
        fsio.remove_tree(trash)
    fsio.remove_tree(new)


def write_family(root: str | Path, shape: str | Shape = "tiny", seed: int = 0, dtype: str = "bf16",
                 variants: tuple[tuple[str, float], ...] = DEFAULT_VARIANTS, shard_size: int = 2 * 1000**3) -> dict[str, Path]:
    """Write ``root/base`` and one folder per variant; returns their paths by name."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root)
    paths = {"base": write_model(root / "base", s, seed, 0.0, dtype, shard_size)}
    for name, delta in variants:
        paths[name] = write_model(root / name, s, seed, delta, dtype, shard_size)
    return paths
