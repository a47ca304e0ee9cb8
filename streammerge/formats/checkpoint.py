"""Hugging Face model folders, read as data: which tensor lives where, the config, tying and vocab size.

A folder holds either one ``model.safetensors`` or a ``model.safetensors.index.json`` naming shards. Shard names
must be plain file names inside the folder, and every indexed tensor must exist in the shard the index names.
Pickled checkpoints (``*.bin``, ``*.pt``, ``*.ckpt``) are refused, never loaded. Nothing here reads tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .safetensors_header import ShardHeader, TensorInfo, read_header

if TYPE_CHECKING:
    from .peft_adapter import PeftAdapter

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_JSON_BYTES = 64 * 1024 * 1024
CONVERT_HINT = (
    "convert it to safetensors first, e.g. in Python with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True) "
    "(only do this for checkpoints you trust: loading a pickle can run code)"
)


@dataclass(frozen=True)
class Located:
    """A tensor and the shard file that holds it."""

    shard: Path
    info: TensorInfo


@dataclass(frozen=True)
class Checkpoint:
    """One model folder: its tensors in file order, its shards and its config."""

    folder: Path
    shards: dict[str, ShardHeader]
    tensors: dict[str, Located] = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    #: a LoRA adapter applied to this model (``MODEL+ADAPTER``): the input is the virtual model with the adapter
    #: merged in, which streammerge.lora turns into sources; None for a plain model
    adapter: PeftAdapter | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        archs = self.config.get("architectures") or []
        return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        if v is None and isinstance(self.config.get("text_config"), dict):
            v = self.config["text_config"].get("vocab_size")
        return v if isinstance(v, int) else None

    def matrix_rows(self, names: Iterable[str | None]) -> int | None:
        """The rows of the first of ``names`` this checkpoint stores as a 2-D tensor (for a token embedding or an
        output head: one row per token), or None when it stores none of them."""
        loc = next((self.tensors[n] for n in names if n in self.tensors and len(self.tensors[n].info.shape) == 2),
                   None)
        return loc.info.shape[0] if loc is not None else None

    def tied(self, head_name: str = "lm_head.weight") -> bool:
        """Whether the output head is tied to the input embedding.

        ``tie_word_embeddings`` in config.json (or its ``text_config``) decides when present; otherwise a checkpoint
        without a head tensor counts as tied.
        """
        flag = self.config.get("tie_word_embeddings")
        text = self.config.get("text_config")
        if not isinstance(flag, bool) and isinstance(text, dict):  # vision-language models keep it with the text model
            flag = text.get("tie_word_embeddings")
        if isinstance(flag, bool):
            return flag
        return head_name not in self.tensors

    @property
    def total_bytes(self) -> int:
        return sum(loc.info.nbytes for loc in self.tensors.values())

    @property
    def parameter_count(self) -> int:
        return sum(loc.info.numel for loc in self.tensors.values())


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {size} bytes is too large for a JSON metadata file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise InputError(
            f"{folder} has only pickled weights ({', '.join(pickles[:3])}); streammerge never unpickles files: "
            + CONVERT_HINT
        )
    if (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder} is a PEFT LoRA adapter, not a model: give it with the model it applies to, "
                         f"MODEL+{folder} (e.g. streammerge apply MODEL+{folder} --out DIR)")
    raise InputError(f"{folder} contains no {SINGLE_FILE} or {INDEX_FILE}: not a safetensors model folder")


def _shard_names_from_index(folder: Path) -> dict[str, str]:
    index = _read_json(folder / INDEX_FILE)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise InputError(f"{folder / INDEX_FILE}: missing or empty 'weight_map'")
    for name, shard in wmap.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise InputError(
                f"{folder / INDEX_FILE}: tensor {name!r} names shard {shard!r}; shard names must be plain file names "
                "inside the model folder"
            )
    return wmap


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read a model folder's config, index and shard headers (no tensor data)."""
    root = Path(folder)
    if not root.exists():
        hub = "" if root.is_absolute() or str(folder).startswith(".") or len(root.parts) != 2 else (
            f"; streammerge reads local folders: to merge the Hub model {str(folder)!r}, download it first, e.g. "
            f"`hf download {folder} --local-dir {root.name}` (huggingface_hub before 0.34: `huggingface-cli download`), "
            "and pass that folder")
        raise InputError(f"model folder {root} does not exist{hub}")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder (pass the model folder, not a file)")
    if (root / INDEX_FILE).is_file() and (root / SINGLE_FILE).is_file():
        raise InputError(
            f"{root} holds both {SINGLE_FILE} and {INDEX_FILE}, which may be two different models; transformers "
            f"loads {SINGLE_FILE} and ignores the index. Move away the one that is not this model"
        )
    if (root / INDEX_FILE).is_file():
        wmap = _shard_names_from_index(root)
        shard_names = list(dict.fromkeys(wmap.values()))
    elif (root / SINGLE_FILE).is_file():
        wmap = None
        shard_names = [SINGLE_FILE]
    else:
        _refuse_pickles(root)
        raise AssertionError("unreachable")

    shards: dict[str, ShardHeader] = {}
    for name in shard_names:
        path = root / name
        if not path.is_file():
            raise InputError(f"{root / INDEX_FILE} names shard {name!r}, which does not exist in {root}")
        shards[name] = read_header(path)

    tensors: dict[str, Located] = {}
    for shard_name, header in shards.items():
        for tname, info in header.tensors.items():
            if tname in tensors:
                raise InputError(f"{root}: tensor {tname!r} appears in both {tensors[tname].shard.name} and {shard_name}")
            tensors[tname] = Located(header.path, info)
    if wmap is not None:
        for tname, shard_name in wmap.items():
            loc = tensors.get(tname)
            if loc is None or loc.shard.name != shard_name:
                raise InputError(f"{root / INDEX_FILE}: tensor {tname!r} is indexed in {shard_name} but is not there")
        extra = sorted(set(tensors) - set(wmap))
        if extra:
            raise InputError(f"{root}: shards hold tensors the index does not list: {', '.join(extra[:5])}")
    if not tensors:
        raise InputError(f"{root}: the checkpoint holds no tensors")

    config_path = root / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    return Checkpoint(root, shards, tensors, config)
