"""The recipe: everything a user asks for, as one data object, whatever built it (CLI flags, Python, YAML later).

Nothing below the recipe cares where it came from. It names inputs and options; the plan turns it into work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StreamMergeError
from .units import parse_size

#: Token-embedding tensor names per architecture family; their columns are tokens (stored rows).
TOKEN_EMBEDDINGS: tuple[str, ...] = (
    "model.embed_tokens.weight",  # Llama, Qwen2, Mistral, Gemma, Phi-3, ...
    "transformer.wte.weight",  # GPT-2, GPT-J, Falcon-style
    "wte.weight",  # GPT-2 as stored on the Hub (no "transformer." prefix)
    "gpt_neox.embed_in.weight",  # GPT-NeoX, Pythia
    "transformer.word_embeddings.weight",  # BLOOM, Falcon
    "model.decoder.embed_tokens.weight",  # OPT
    "transformer.embedding.word_embeddings.weight",  # ChatGLM
    # vision-language models: the text model's embedding
    "model.language_model.embed_tokens.weight",  # Qwen2-VL/2.5-VL, LLaVA, Gemma 3 as saved by transformers >= 4.52
    "language_model.model.embed_tokens.weight",  # LLaVA, Gemma 3, Mllama as saved before 4.52
)
#: Learned position embeddings get the same transposed rule: one column per position.
POSITION_EMBEDDINGS: tuple[str, ...] = (
    "transformer.wpe.weight", "wpe.weight",
    "model.decoder.embed_positions.weight",
)
#: Output-head names that may be tied to the token embedding.
HEAD_NAMES: tuple[str, ...] = ("lm_head.weight", "embed_out.weight", "language_model.lm_head.weight")
#: Architectures whose projection weights are transformers' ``Conv1D`` (stored (in, out), the transpose of
#: ``nn.Linear``), and the names of those weights (regexes, ``re.fullmatch``).
CONV1D_MODEL_TYPES: tuple[str, ...] = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_WEIGHTS: str = r"(.*\.)?h\.\d+\.(attn\.(c_attn|q_attn|c_proj)|mlp\.(c_fc|c_proj))\.weight"


def is_conv1d_weight(model_type: str | None, name: str) -> bool:
    """Whether tensor ``name`` of a ``model_type`` checkpoint is a transformers ``Conv1D`` weight (stored (in, out))."""
    return model_type in CONV1D_MODEL_TYPES and re.fullmatch(CONV1D_WEIGHTS, name) is not None

#: Stacked MoE experts (transformers v5: ``mlp.experts.gate_up_proj`` [E, out, in]); other tensors of 3-D or more are
#: convolution kernels [out, in, *kernel] (regex, ``re.search``)
STACKED_EXPERTS: str = r"(^|\.)experts\."
#: Name prefixes of the vision tower and projector of vision-language models (``--keep-vision`` keeps the base's).
VISION_PREFIXES: tuple[str, ...] = (
    "visual.", "model.visual.",  # Qwen2-VL, Qwen2.5-VL
    "vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",  # LLaVA, Gemma 3
    "vision_model.", "model.vision_model.",  # Mllama, Idefics
)
#: Non-trainable buffers some transformers versions save and others do not (computed from the config at load
#: time): rotary inverse frequencies, GPT-2's causal-mask buffers. They come from the base; models need not have
#: them (regexes, matched with ``re.fullmatch``).
DERIVED_BUFFERS: tuple[str, ...] = (r".*rotary_emb\.inv_freq", r"(.*\.)?h\.\d+\.attn\.(masked_)?bias")

DEFAULT_SHARD_SIZE = 5 * 1000**3


def tokenizer_source_fields(source: str | Path | None) -> dict[str, Any]:
    """The Recipe fields that mergekit's ``tokenizer_source`` sets: ``base`` and ``union`` (the rows mapped onto that
    vocabulary), or a model folder (its tokenizer, the rows mapped onto it); None sets nothing."""
    if source is None:
        return {}
    if str(source) in ("base", "union"):
        return {"tokenizer_from": None, "vocabulary": "tokenizer" if str(source) == "base" else "union"}
    return {"tokenizer_from": Path(source)}


def _strings(value: str | Sequence[str]) -> tuple[str, ...]:
    """A tuple of strings from one string or a sequence of them (a string is not split into characters)."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``[start, end)`` of ``model`` as a source of output slice ``index`` (mergekit's ``slices:`` with
    ``layer_range``; ``end`` -1: every layer); ``parameters`` are the slice's settings, ``source_parameters`` this
    source's (they win). The output's layers are the slices' in turn: a slice with one source is copied
    (passthrough), one with several is merged."""

    model: Path
    start: int
    end: int
    parameters: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    source_parameters: dict[str, Any] = field(default_factory=dict)  # this source's own settings (they win)

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.model.resolve()), "start": self.start, "end": self.end,
                "parameters": self.parameters, "index": self.index, "source_parameters": self.source_parameters}


@dataclass(frozen=True)
class Recipe:
    """A merge request.

    ``params`` maps parameter names to values (strings from the CLI, or numbers/lists from Python); per-model
    parameters take one value per model, in the order of ``models``. ``parameters`` and ``model_parameters`` (one
    mapping per model) hold a mergekit recipe's settings, which may vary per tensor (gradients, filters): see
    :mod:`streammerge.parameters` for what they mean and which level wins.
    """

    base: Path
    models: tuple[Path, ...]  # a single path is one model
    out: Path | None  # None only to plan without an output (``streammerge plan`` without --out)
    method: str = "widen"
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # output dtype; None = each tensor keeps the base's dtype
    exclude: tuple[str, ...] = ()  # regexes (re.match): matching tensors keep the base value
    embedding_names: tuple[str, ...] | None = None  # None = TOKEN_EMBEDDINGS + POSITION_EMBEDDINGS
    tokenizer_from: Path | None = None
    shard_size: int | str = DEFAULT_SHARD_SIZE  # bytes, or a size such as "2GB" (parsed here)
    max_ram: str | int | None = None
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    max_vram: str | int | None = None  # GPU memory for the merge's tensors; None = 80% of what is free
    chunk_rows: int | None = None  # force a chunk size (testing, debugging); None = from the budget
    threads: int | None = None  # CPU threads to keep busy; None = the cores this process may use (the bytes never depend on it)
    force: bool = False  # replace an existing output folder
    restart: bool = False  # discard an interrupted run's work folder instead of resuming it
    redo_changed: bool = False  # continue an interrupted run whose inputs or options changed, redoing what changed
    journal: bool = True  # journal durable chunks (resumable); off only to measure its cost
    allow_incomplete_output: bool = False  # write an output transformers cannot load (no config.json) anyway
    keep_vision: bool = False  # a vision-language model's vision tower keeps the base's values (VISION_PREFIXES)
    parameters: dict[str, Any] = field(default_factory=dict)  # a recipe's global settings (mergekit ``parameters:``)
    model_parameters: tuple[dict[str, Any], ...] = ()  # a recipe's per-model settings, one mapping per model
    source: str | None = None  # the text of the mergekit recipe this came from (written beside the output)
    chat_template: str | None = None  # auto, a built-in name or a Jinja template (streammerge.chat_template)
    pad_to_multiple_of: int | None = None  # the output's embedding rows are padded to a multiple of it
    #: how the embedding rows relate to tokens (streammerge.vocabulary): None, row i of every input is row i of the
    #: output (shapes must agree); "tokenizer", mapped through each input's tokenizer onto the output tokenizer's
    #: vocabulary (``tokenizer_from``'s, else the base's: mergekit's ``tokenizer_source: base | MODEL``); "union",
    #: onto the union of the inputs' vocabularies (``tokenizer_source: union``)
    vocabulary: str | None = None
    #: ``tokenizer.tokens``: token -> its default row (streammerge.vocabulary.TokenDefault, as JSON), with inputs by
    #: index (0: the base)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the recipe names its base (mergekit's ``base_model``); False for a recipe without one, whose first model
    #: stands in as the base (a token some inputs lack then takes the mean of those that have it, never the base's)
    named_base: bool = True
    slices: tuple[LayerSlice, ...] = ()  # layer stacking (passthrough): the output's layers, slice by slice
    offline: bool = False  # resolve Hub IDs from the local Hugging Face cache only (also HF_HUB_OFFLINE)
    hub_refs: dict[str, str] = field(default_factory=dict)  # resolved folder -> "org/name@commit" (set by planning)
    #: a PEFT LoRA adapter per input, the base's first, then each model's (None: that input has none; empty: none
    #: has one): the input is the model with the adapter merged in (``MODEL+ADAPTER``, see streammerge.lora)
    adapters: tuple[Path | None, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", Path(self.base))
        models = (self.models,) if isinstance(self.models, (str, Path)) else self.models
        object.__setattr__(self, "models", tuple(Path(m) for m in models))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "exclude", _strings(self.exclude))  # one pattern may be given as a string
        if self.tokenizer_from is not None:
            object.__setattr__(self, "tokenizer_from", Path(self.tokenizer_from))
        if self.embedding_names is not None:
            object.__setattr__(self, "embedding_names", _strings(self.embedding_names))
        object.__setattr__(self, "shard_size", parse_size(self.shard_size, "--shard-size"))
        if self.dtype is not None and not isinstance(self.dtype, str):  # a torch.dtype, from Python
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        object.__setattr__(self, "model_parameters", tuple(dict(p or {}) for p in self.model_parameters))
        object.__setattr__(self, "slices", tuple(s if isinstance(s, LayerSlice) else
                                                 LayerSlice(Path(s["model"]), s["start"], s["end"],
                                                            dict(s.get("parameters") or {}), s.get("index", 0),
                                                            dict(s.get("source_parameters") or {}))
                                                 for s in self.slices))
        adapters = tuple(None if a is None else Path(a) for a in self.adapters)
        object.__setattr__(self, "adapters", adapters if any(a is not None for a in adapters) else ())
        if self.adapters and len(self.adapters) != 1 + len(self.models):
            raise StreamMergeError(f"adapters has {len(self.adapters)} entries for the base and {len(self.models)} "
                                   "models: give one per input (None for none), the base's first")
        if self.model_parameters and len(self.model_parameters) != len(self.models):
            raise StreamMergeError(f"model_parameters has {len(self.model_parameters)} entries for "
                                   f"{len(self.models)} models: give one per model, in order")
        if (self.pad_to_multiple_of or self.tokenizer_from is not None) and self.vocabulary is None:
            object.__setattr__(self, "vocabulary", "tokenizer")  # the output speaks that tokenizer: rows follow it
        if self.vocabulary not in (None, "tokenizer", "union"):
            raise StreamMergeError(f"vocabulary {self.vocabulary!r}: give None, 'tokenizer' or 'union'")
        if self.tokens and self.vocabulary is None:
            raise StreamMergeError("tokens (tokenizer.tokens) need the rows mapped through the tokenizers: give "
                                   "vocabulary 'tokenizer' or 'union'")
        if self.restart and self.redo_changed:
            raise StreamMergeError("--restart discards the interrupted run's work and --redo-changed keeps what the "
                                   "change does not affect: give one of them")

    @property
    def tokenizer_source(self) -> str | Path | None:
        """mergekit's ``tokenizer_source`` for this recipe (the inverse of :func:`tokenizer_source_fields`):
        ``"union"``, a model folder, ``"base"``, or None when rows merge as stored."""
        if self.vocabulary == "union":
            return "union"
        return self.tokenizer_from if self.tokenizer_from is not None else "base" if self.vocabulary else None

    def adapter(self, k: int) -> Path | None:
        """The LoRA adapter of input ``k`` (0: the base, k: model k), or None."""
        return self.adapters[k] if self.adapters else None

    def input_reference(self, k: int) -> str:
        """How to name input ``k`` (0: the base) to someone else: :meth:`reference`, with ``+ADAPTER`` when it has
        one (mergekit's ``model+lora``)."""
        folder = self.base if k == 0 else self.models[k - 1]
        adapter = self.adapter(k)
        return self.reference(folder) + (f"+{self.reference(adapter)}" if adapter is not None else "")

    def reference(self, folder: Path) -> str:
        """How to name input ``folder`` to someone else: its Hub ID (``org/name@commit``) or its absolute path."""
        return self.hub_refs.get(str(folder), str(folder.resolve()))

    def to_json(self) -> dict[str, Any]:
        """The fields that define the result, with absolute paths, and the budget asked for (stored in the work
        folder: ``resume`` continues with them unless told otherwise)."""
        return {
            "base": str(self.base.resolve()), "models": [str(m.resolve()) for m in self.models],
            "out": None if self.out is None else str(self.out.resolve()), "method": self.method,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            "dtype": self.dtype, "exclude": list(self.exclude),
            "embedding_names": None if self.embedding_names is None else list(self.embedding_names),
            "tokenizer_from": None if self.tokenizer_from is None else str(self.tokenizer_from.resolve()),
            "shard_size": self.shard_size, "force": self.force, "device": self.device,
            "allow_incomplete_output": self.allow_incomplete_output, "keep_vision": self.keep_vision,
            "max_ram": self.max_ram,
            "max_vram": self.max_vram,
            "threads": self.threads,
            "parameters": self.parameters, "model_parameters": [dict(p) for p in self.model_parameters],
            "source": self.source, "offline": self.offline, "hub_refs": self.hub_refs,
            "slices": [s.to_json() for s in self.slices], "chat_template": self.chat_template,
            "pad_to_multiple_of": self.pad_to_multiple_of, "vocabulary": self.vocabulary, "tokens": self.tokens,
            "named_base": self.named_base,
            **({"adapters": [None if a is None else str(a.resolve()) for a in self.adapters]} if self.adapters else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], **overrides: Any) -> Recipe:
        fields = dict(d)
        fields["models"] = tuple(fields["models"])
        fields["exclude"] = tuple(fields.get("exclude") or ())
        fields["model_parameters"] = tuple(fields.get("model_parameters") or ())
        fields["slices"] = tuple(fields.get("slices") or ())
        fields["adapters"] = tuple(fields.get("adapters") or ())
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    @classmethod
    def from_yaml(cls, path: str | Path, **options: Any) -> Recipe:
        """The recipe in a YAML file (mergekit's schema, see :mod:`streammerge.yaml_recipe`); ``options`` set
        further fields (``out``, ``max_ram``, ...). Raises :class:`~streammerge.yaml_recipe.RecipeError`."""
        from .yaml_recipe import load  # noqa: PLC0415

        return load(path, **options)

    def to_yaml(self) -> str:
        """This recipe in mergekit's schema with absolute paths (what ``streammerge_recipe.yaml`` holds)."""
        from .yaml_recipe import dump  # noqa: PLC0415

        return dump(self)

    @property
    def embeddings(self) -> tuple[str, ...]:
        if self.embedding_names is not None:
            return self.embedding_names
        return TOKEN_EMBEDDINGS + POSITION_EMBEDDINGS
