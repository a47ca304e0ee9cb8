"""What each tensor gets, decided once from the headers: its rule, its dtype policy and its input sources.

Before any tensor is classified the inputs are checked: FP8 weights get sources that dequantize them on the fly
and every other quantized format is refused with what to do (:mod:`streammerge.quantization`), and the models must
be homologous with the base (names, shapes, architectures, tying). Each tensor then gets:

- a **rule** (matrix, embedding, Conv1D, vector, stacked experts, convolution kernel, copy of the base, copy of the
  merged embedding for a tied head), from its name, shape, dtype and the user's ``--exclude`` and ``--embedding``;
- a **kind** (the dtype policy): ``float`` tensors are merged (or, excluded, copied through float32 into the
  output dtype); ``integer`` and ``bool`` tensors are copied from the base byte for byte;
- its **sources**: the base's first, then each model's, from which the reader and the runner take rows.

Everything after this reads these decisions; nothing decides them again.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import IncompatibleModelsError, PlanError
from .formats.checkpoint import Checkpoint, Located
from .lora import adapted_inputs
from .methods import Method, Rule, TensorTask
from .output import REMOVED, TORCH_DTYPE_NAMES
from .quantization import Dequantization, dequantization
from .recipe import (
    DERIVED_BUFFERS,
    HEAD_NAMES,
    STACKED_EXPERTS,
    TOKEN_EMBEDDINGS,
    VISION_PREFIXES,
    Recipe,
    is_conv1d_weight,
)
from .sources import InputSource, StoredSource
from .sources.vocabulary import mapped_sources
from .vocabulary import VocabularyPlan

_DIGITS = re.compile(r"(\d+)")


class Kind(str, Enum):
    """A tensor's dtype policy."""

    FLOAT = "float"  # merged by the method (or, excluded, copied through float32 into the output dtype)
    INTEGER = "integer"  # copied from the base, bytes as stored
    BOOL = "bool"  # copied from the base, bytes as stored


@dataclass(frozen=True)
class TensorClass:
    """The decisions for one output tensor (before any size is chosen)."""

    name: str
    shape: tuple[int, ...]
    rule: Rule
    kind: Kind
    out_dtype: str
    sources: tuple[InputSource, ...]  # base first, then each model; the base only for a copy; none for a tied head
    copy_of: str | None = None  # for TIED_COPY: the tensor whose merged output bytes become this one
    kept_because: str | None = None  # for COPY_BASE: "--exclude", "derived buffer", "empty", "not a float", ...
    scale: float = 1.0  # for COPY_BASE of a float: the copy is multiplied by it (passthrough's ``scale``)


@dataclass(frozen=True)
class Classification:
    """The output's tensors (:class:`TensorClass`, in order), the changes the output's config.json needs (e.g.
    ``tie_word_embeddings: false`` when the output stores a head the base ties), and notes for the user."""

    tensors: list[TensorClass]
    config_updates: dict[str, Any]
    notes: tuple[str, ...]


def classify(recipe: Recipe, method: Method, base: Checkpoint, models: list[Checkpoint], out_dtype: str | None,
             tile: int, vocab: VocabularyPlan | None = None) -> Classification:
    """Every output tensor's rule, kind and sources, in :func:`in_natural_order`; raises (naming every problem) if some
    tensor cannot be merged as asked. ``vocab``: the inputs' row maps onto the output's vocabulary
    (:mod:`streammerge.vocabulary`), which the token embedding and the head are read through."""
    read_as = [dequantization(c, "the base" if k == 0 else f"model {k}") for k, c in enumerate((base, *models))]
    # each input's LoRA adapter (MODEL+ADAPTER): its weights' sources, decided once (streammerge.lora)
    read_as, adapter_notes = adapted_inputs(read_as)
    base, *models = (d.checkpoint for d in read_as)  # without the tensors only quantized inference uses

    def source(k: int, loc: Located) -> InputSource:
        return source_of(read_as[k], loc)

    def dtype_of(kind: Kind, sources: tuple[InputSource, ...], stored: str) -> str:
        return output_dtype(kind, sources, stored, out_dtype)

    excludes = _compile_excludes(recipe.exclude)

    def from_base(name: str) -> str | None:
        """Why the output keeps the base's value whatever the models hold (they need not have it), or None."""
        return "--exclude" if any(rx.match(name) for rx in excludes) else \
            "derived buffer" if is_derived_buffer(name) else \
            "--keep-vision" if recipe.keep_vision and name.startswith(VISION_PREFIXES) else \
            "copy" if not models else None  # no models (passthrough of the base, e.g. `streammerge apply`)

    head = check_homologous(base, models, lambda name: from_base(name) is not None, recipe.embeddings,
                            vocab_rows_vary=vocab is not None)
    embeddings = set(recipe.embeddings)
    vocab_names = {*TOKEN_EMBEDDINGS, *HEAD_NAMES, *((head.embedding,) if head.embedding else ())}

    def shape_of(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (vocab.rows, *shape[1:]) if vocab is not None and name in vocab_names else shape

    def mapped(name: str, sources: tuple[InputSource, ...], copied: bool = False) -> tuple[InputSource, ...]:
        """``sources`` of a vocabulary-indexed tensor read through the row maps (a copy: the base's alone)."""
        if vocab is None or name not in vocab_names:
            return sources
        if len(sources) != len(vocab.maps):
            raise PlanError(f"{name}: its rows are mapped onto the output's vocabulary through every input, but only "
                            f"{len(sources)} of the {len(vocab.maps)} inputs store it")
        return mapped_sources(vocab, name, sources, only=0 if copied else None)
    out: list[TensorClass] = []
    problems: list[str] = []
    for name, loc in in_natural_order(base):
        info = loc.info
        kind = kind_of(info)
        if name == head.name and head.mode == "tied":
            out.append(TensorClass(name, shape_of(name, info.shape), Rule.TIED_COPY, kind, dtype_of(kind, (), info.dtype.name), (),
                                   head.embedding))
            continue
        if name == head.name and head.mode == "mixed":
            continue  # merged from every input's effective head, below
        why = from_base(name) or ("not a float" if kind is not Kind.FLOAT else "empty" if info.numel == 0 else None)
        if why:  # empty: shape [0] or [0, n], which passes through
            sources = (source(0, loc),)
            if vocab is not None and name in vocab_names and kind is Kind.FLOAT and info.numel:
                sources = mapped(name, (*sources, *(source(k, m.tensors[name]) for k, m in enumerate(models, 1)
                                                    if name in m.tensors)), copied=True)
            out.append(TensorClass(name, shape_of(name, info.shape), Rule.COPY_BASE, kind,
                                   dtype_of(kind, sources, info.dtype.name), sources, None, why))
            continue
        if len(info.shape) <= 1:
            rule = Rule.VECTOR
        elif len(info.shape) == 2:
            rule = Rule.EMBEDDING if name in embeddings else Rule.CONV1D if is_conv1d_weight(base.model_type, name) \
                else Rule.MATRIX
        else:  # stacked experts, or a convolution kernel
            rule = Rule.TENSOR if re.search(STACKED_EXPERTS, name) else Rule.CONV
        why = method.rule_error(TensorTask(name, info.shape, rule, tile))
        if why:
            problems.append(f"{name} {list(info.shape)}: {why}")
        for k, m in enumerate(models, 1):
            if not m.tensors[name].info.dtype.is_float:
                problems.append(f"{name}: model {k} stores it as {m.tensors[name].info.dtype.name}, not a float")
        sources = mapped(name, (source(0, loc), *(source(k, m.tensors[name]) for k, m in enumerate(models, 1))))
        out.append(TensorClass(name, shape_of(name, info.shape), rule, kind, dtype_of(kind, sources, info.dtype.name),
                               sources))
    if head.mode == "mixed":
        stored = base.tensors.get(head.name) or head.sources[0]
        shape = head.sources[0].info.shape
        kept = from_base(head.name)
        sources = mapped(head.name, tuple(source(k, loc) for k, loc in enumerate(head.sources)), copied=bool(kept))
        shape = shape_of(head.name, shape)
        dtype = dtype_of(Kind.FLOAT, sources, stored.info.dtype.name)
        if kept:  # the base's effective head: its own, or its embedding
            out.append(TensorClass(head.name, shape, Rule.COPY_BASE, Kind.FLOAT, dtype, sources, None, kept))
        else:
            out.append(TensorClass(head.name, shape, Rule.MATRIX, Kind.FLOAT, dtype, sources))
            why = method.rule_error(TensorTask(head.name, shape, Rule.MATRIX, tile))
            if why:
                problems.append(f"{head.name}: {why}")
    messages = name_problems(recipe, base, models)
    if problems:
        messages.append(
            f"{method.name} cannot merge {len(problems)} tensor(s):\n  " + "\n  ".join(problems[:10])
            + "\nexclude them (they keep the base value) with --exclude REGEX"
        )
    if messages:
        raise PlanError("\n".join(messages))
    notes = _vision_notes(recipe, base) + dequantization_notes(read_as, out_dtype) + adapter_notes
    config_updates: dict[str, Any] = {"quantization_config": REMOVED} if read_as[0].quantized else {}
    if vocab is not None:
        config_updates["vocab_size"] = vocab.rows
    unnamed = [c.name for c in out if c.rule is Rule.MATRIX and c.shape[0] == base.vocab_size
               and c.name not in HEAD_NAMES and not c.name.startswith(VISION_PREFIXES)] \
        if method.embedding_rule and not any(c.rule is Rule.EMBEDDING for c in out) else []
    if unnamed:
        notes.append(f"WARNING: {method.name} merges token embeddings by their own rule (one column per token), but "
                     "no tensor of the base has a known token-embedding name, so it is merged as an ordinary matrix; "
                     f"if {unnamed[0]} (one row per token of the {base.vocab_size}-token vocabulary) is the "
                     f"embedding, say so with --embedding {unnamed[0]}")
    if head.mode != "mixed":
        return Classification(out, config_updates, tuple(notes))
    tied = [("the base" if k == 0 else f"model {k}") for k, c in enumerate((base, *models)) if c.tied(head.name)]
    note = (f"{', '.join(tied)} tie{'s' if len(tied) == 1 else ''} {head.name} to {head.embedding} and the other "
            f"inputs do not: {head.name} is merged from each input's own head, or its embedding where tied, and the "
            "output stores it (untied)")
    return Classification(out, {**config_updates, "tie_word_embeddings": False}, (*notes, note))


def source_of(read_as: Dequantization, loc: Located) -> InputSource:
    """How a checkpoint (read as ``read_as`` decides) is read for tensor ``loc``: dequantized on the fly, or as
    stored."""
    name = loc.info.name
    return read_as.adapted.get(name) or read_as.sources.get(name) or StoredSource(loc)


def output_dtype(kind: Kind, sources: tuple[InputSource, ...], stored: str, out_dtype: str | None) -> str:
    """The output dtype: ``--dtype`` for a float; else the first source's stored dtype, or for a source that makes
    its values (FP8 codes dequantized, a LoRA-adapted weight) the dtype it names (bfloat16 for FP8)."""
    if out_dtype and kind is Kind.FLOAT:
        return out_dtype
    return sources[0].natural_dtype if kind is Kind.FLOAT and sources and sources[0].stored_dtype is None else stored


def kind_of(info: Any) -> Kind:
    """A stored tensor's dtype policy."""
    return Kind.FLOAT if info.dtype.is_float else (Kind.BOOL if info.dtype.name == "BOOL" else Kind.INTEGER)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as numbers)."""
    return tuple(int(part) if k % 2 else part for k, part in enumerate(_DIGITS.split(name)))


def in_natural_order(ckpt: Checkpoint) -> list[tuple[str, Located]]:
    """The order tensors are merged and written in: the checkpoint's shards in order, and within a shard by name
    with layer numbers sorted as numbers (``embed_tokens``, ``layers.0`` … ``layers.27``, ``norm``), which is how
    the progress display walks through the model and how tensors are grouped into output shards."""
    shard_order = {path: k for k, path in enumerate(dict.fromkeys(loc.shard for loc in ckpt.tensors.values()))}
    return sorted(ckpt.tensors.items(), key=lambda item: (shard_order[item[1].shard], natural_key(item[0])))


def name_problems(recipe: Recipe, base: Checkpoint, models: list[Checkpoint]) -> list[str]:
    """What is wrong with the tensor names the user gave (``--exclude`` patterns that match nothing, ``--embedding``
    names that are not 2-D tensors of the base, patterns that are not regular expressions). Checked
    with the other independent problems before planning, and again by :func:`classify`."""
    names = list(dict.fromkeys(name for ckpt in (base, *models) for name in ckpt.tensors))
    out, valid = [], []
    for p in recipe.exclude:
        try:
            valid.append((p, _compile_excludes((p,))[0]))
        except PlanError as exc:
            out.append(str(exc))
    return (out + unmatched_excludes(tuple(p for p, _ in valid), [rx for _, rx in valid], names)
            + bad_embedding_names(recipe.embedding_names or (), base))


def _compile_excludes(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            glob = (f"; patterns are regular expressions, not shell globs: write {p.replace('*', '.*')!r}"
                    if "*" in p else "")
            raise PlanError(f"--exclude {p!r} is not a valid regular expression: {exc}{glob}") from None
    return out


def unmatched_excludes(patterns: tuple[str, ...], compiled: list[re.Pattern[str]], names: list[str]) -> list[str]:
    """A problem for each ``--exclude`` pattern that matches no tensor name, with the nearest pattern that would:
    patterns match at the start of the name (``re.match``), so a part in the middle needs ``.*``."""
    out = []
    for text, rx in zip(patterns, compiled):
        if any(rx.match(n) for n in names):
            continue
        inside = next((n for n in names if rx.search(n)), None)
        if inside is not None:
            # anchored at its end too where it ends in a letter or digit, so "layers.1" does not catch layers.10
            suggestion = ".*" + re.sub(r"(?<!\\)\.", r"\\.", text) + (r"\b" if text[-1:].isalnum() else "")
            hint = (f"patterns match from the start of the name, and {text!r} only occurs inside names such as "
                    f"{inside}: write --exclude '{suggestion}'")
        else:
            near = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
            hint = f"did you mean --exclude '{re.escape(near[0])}'?" if near else \
                f"tensor names look like {names[0]} (streammerge inspect FOLDER lists them)" if names else ""
        out.append(f"--exclude {text!r} matches no tensor" + (f": {hint}" if hint else ""))
    return out


def dequantization_notes(read_as: list[Dequantization], out_dtype: str | None) -> list[str]:
    """One note per quantized input: its format, and that its weights are dequantized on the fly."""
    out = []
    for k, d in enumerate(read_as):
        if d.quantized:
            who = "the base" if k == 0 else f"model {k}"
            written = TORCH_DTYPE_NAMES.get(out_dtype or "BF16", out_dtype)
            out.append(f"{who} is {d.description}: its {len(d.sources)} FP8 weights are dequantized on the fly "
                       "(codes × scales, in float32)"
                       + (f"; the output is written as {written} and its config.json drops the quantization_config"
                          if k == 0 else ""))
    return out


def _vision_notes(recipe: Recipe, base: Checkpoint) -> list[str]:
    """What the user should know about a vision tower: that it is merged, or kept from the base."""
    vision = [n for n in base.tensors if n.startswith(VISION_PREFIXES)]
    if not vision:
        return []
    if recipe.keep_vision:
        return [f"--keep-vision: the {len(vision)} tensors of the vision tower keep the base's values"]
    return [f"the {len(vision)} tensors of the vision tower are merged like the rest; --keep-vision keeps the base's "
            "values"]


def bad_embedding_names(given: tuple[str, ...], base: Checkpoint) -> list[str]:
    """A problem for each ``--embedding`` name that is not a 2-D tensor of the base, with the nearest name that is
    (a name that matches nothing would silently turn the real embedding into an ordinary matrix)."""
    out = []
    matrices = [n for n, loc in base.tensors.items() if len(loc.info.shape) == 2]
    for name in given:
        loc = base.tensors.get(name)
        if loc is not None and len(loc.info.shape) == 2:
            continue
        if loc is not None:
            out.append(f"--embedding {name!r} is a {len(loc.info.shape)}-D tensor; embeddings are 2-D (one row per "
                       "token or position)")
            continue
        near = difflib.get_close_matches(name, matrices, n=1, cutoff=0.5)
        out.append(f"--embedding {name!r} is not a tensor of the base" + (f": did you mean {near[0]!r}?" if near else
                   " (streammerge inspect FOLDER lists them)"))
    return out


def shape_hint(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """What a shape difference of ``name`` means: another vocabulary (embedding rows) or another model size."""
    if len(got) != len(want) or got[1:] != want[1:]:
        return (" (the hidden or layer sizes differ: these are different model sizes or architectures, not variants "
                "of one base)")
    if name in TOKEN_EMBEDDINGS or name in HEAD_NAMES:
        return (" (vocabulary sizes differ: map every input's rows through its tokenizer onto one vocabulary with "
                "--tokenizer-source union, or base; in a recipe, tokenizer_source)")
    return ""


def rows_differ(name: str, a: Located, b: Located, embedding: str | None) -> bool:
    """Whether ``a`` and ``b`` are a vocabulary-indexed tensor differing only in rows (tokens)."""
    return (name in TOKEN_EMBEDDINGS or name in HEAD_NAMES or name == embedding) \
        and len(a.info.shape) == len(b.info.shape) == 2 and a.info.shape[1] == b.info.shape[1]


def is_derived_buffer(name: str) -> bool:
    """Whether ``name`` is a non-trainable buffer computed at load time (see ``DERIVED_BUFFERS``)."""
    return any(re.fullmatch(p, name) for p in DERIVED_BUFFERS)


@dataclass(frozen=True)
class HeadPlan:
    """How the output head (``lm_head.weight``) is made, from how each input ties it to the token embedding.

    ``mode``: ``"tied"`` (every input ties it: the output ties it too, and a stored head is a copy of the merged
    embedding), ``"untied"`` (every input stores its own head: an ordinary matrix), or ``"mixed"``: a tied model's
    head *is* its embedding, so the head is merged from each input's effective head (``sources``, base first:
    its own head, or its embedding when tied) and the output stores it, untied. As in mergekit's handling of
    tied and untied inputs (arcee-ai/mergekit#464)."""

    name: str
    mode: str
    embedding: str | None  # the token embedding's name (None if none is stored)
    sources: tuple[Located, ...] = ()  # for "mixed"


def _effective_head(ckpt: Checkpoint, head: str, embedding: str | None) -> Located | None:
    if not ckpt.tied(head) and head in ckpt.tensors:
        return ckpt.tensors[head]
    return ckpt.tensors.get(embedding) if embedding else None


def exclude_regex(names: list[str], universe: list[str]) -> str:
    """One ``--exclude`` pattern, quoted for a shell, that matches exactly ``names`` among ``universe`` (every
    tensor name): layer and expert numbers are generalised to ``\\d+`` where that catches no other name."""
    exact = [re.escape(n) + "$" for n in dict.fromkeys(names)]
    general = list(dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", p) for p in exact))
    wanted = set(names)
    if all(n in wanted for n in universe if any(re.match(p, n) for p in general)):
        exact = general
    return "'" + "|".join(exact) + "'"


def layout_difference(missing: dict[str, tuple[int, ...]], extra: dict[str, tuple[int, ...]]) -> str | None:
    """Why the tensors a model lacks (name: shape) and those it has instead are the same weights in another layout,
    as different transformers versions save them (MoE experts per expert or stacked; a vision-language model's
    ``language_model.model.*`` or ``model.language_model.*``), or None."""
    per_expert = re.compile(r"(^|\.)experts\.\d+\.")
    stacked = re.compile(STACKED_EXPERTS)
    layouts = {"per": "per expert (experts.N.*)", "stacked": "stacked (one [E, out, in] tensor per projection)"}
    how = ("Save every input in one layout (load and save_pretrained each with the same transformers version); "
           "excluding them would keep the base's values")
    for a, b, model, base in ((missing, extra, "stacked", "per"), (extra, missing, "per", "stacked")):
        if a and b and all(per_expert.search(n) for n in a) and all(stacked.search(n) and not per_expert.search(n)
                                                                     for n in b):
            return (f"stores the MoE experts {layouts[model]} and the base {layouts[base]}: the same weights in two "
                    f"layouts, as different transformers versions save them. {how}")
    # the same tensors under other names: equal shapes and equal last name parts (``q_proj.weight``)
    def key(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        return ".".join(name.split(".")[-2:]), shape

    theirs: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for n, shape in extra.items():
        theirs.setdefault(key(n, shape), []).append(n)
    pairs = [(n, theirs[key(n, shape)].pop()) for n, shape in missing.items() if theirs.get(key(n, shape))]
    if len(pairs) >= 2 and len(pairs) >= 0.9 * max(len(missing), len(extra)):
        a, b = pairs[0]
        return (f"holds the base's tensors under other names (e.g. the base's {a} is {b} here): the same weights "
                f"saved in another key layout, as different transformers versions save them. {how}")
    return None


def check_homologous(base: Checkpoint, models: list[Checkpoint],
                     from_base: Callable[[str], bool] = lambda name: False,
                     embeddings: tuple[str, ...] = TOKEN_EMBEDDINGS, vocab_rows_vary: bool = False) -> HeadPlan:
    """Raise unless every model matches the base; say how the output head is made (:class:`HeadPlan`). Tensors
    for which ``from_base`` is true keep the base's value: a model may lack them, hold them with another shape, or
    hold them when the base does not (then the output does not have them either). The token embedding is the first
    of ``embeddings`` (the recipe's embedding names, token embeddings first) the base stores. ``vocab_rows_vary``:
    the token embedding and the head may differ in rows (they are mapped through the tokenizers)."""
    inputs = (base, *models)
    head_name = next((h for h in HEAD_NAMES if any(h in c.tensors for c in inputs)), HEAD_NAMES[0])
    embedding = next((e for e in embeddings if e in base.tensors and len(base.tensors[e].info.shape) == 2), None)
    ties = {c.tied(head_name) for c in inputs}
    mode = "mixed" if len(ties) > 1 else "tied" if ties == {True} else "untied"
    unmatched: list[str] = []  # each model's tensors that do not match the base's names, reported together
    names: list[str] = []
    universe = list(base.tensors)
    for k, m in enumerate(models, 1):
        who = f"model {k} ({m.folder})"
        if base.model_type and m.model_type and base.model_type != m.model_type:
            raise IncompatibleModelsError(
                f"{who} is a {m.model_type!r} model but the base ({base.folder}) is {base.model_type!r}"
            )
        if base.architectures and m.architectures and base.architectures != m.architectures:
            raise IncompatibleModelsError(
                f"{who} has architectures {m.architectures} but the base has {base.architectures}"
            )
        skip = {head_name} if mode != "untied" else set()
        missing = sorted(n for n in set(base.tensors) - set(m.tensors) - skip if not from_base(n))
        extra = sorted(n for n in set(m.tensors) - set(base.tensors) - skip if not from_base(n))
        if missing or extra:
            layouts = layout_difference({n: base.tensors[n].info.shape for n in missing},
                                        {n: m.tensors[n].info.shape for n in extra})
            if layouts:
                raise IncompatibleModelsError(f"{who} {layouts}")
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} of the base's tensors (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} tensor{'s' if len(extra) != 1 else ''} the base lacks "
                             f"(e.g. {', '.join(extra[:3])})")
            unmatched.append(f"{who} {' and '.join(parts)}")
            names += missing + extra
            universe += list(m.tensors)
        for name, loc in base.tensors.items():
            other = m.tensors.get(name)
            if other is None or from_base(name) or name in skip:
                continue
            if other.info.shape != loc.info.shape and not (vocab_rows_vary and rows_differ(name, other, loc, embedding)):
                hint = shape_hint(name, other.info.shape, loc.info.shape)
                raise IncompatibleModelsError(
                    f"tensor {name}: shape {list(other.info.shape)} in {who} but {list(loc.info.shape)} in the base"
                    + hint
                )
    if unmatched:
        raise IncompatibleModelsError(
            "; ".join(unmatched) + f": the models are not homologous; --exclude "
            f"{exclude_regex(list(dict.fromkeys(names)), list(dict.fromkeys(universe)))} keeps the base's value of "
            "those tensors and leaves out those the base lacks (the models need not have them)")
    if mode == "mixed":
        if embedding is None:
            raise IncompatibleModelsError(f"some inputs tie {head_name} to the token embedding and some do not, but "
                                          f"the base ({base.folder}) stores no known token embedding: name it with "
                                          "--embedding NAME (`streammerge inspect BASE` lists the tensors)")
        sources = []
        for k, c in enumerate(inputs):
            loc = _effective_head(c, head_name, embedding)
            who = "the base" if k == 0 else f"model {k}"
            if loc is None:
                raise IncompatibleModelsError(f"{who} ({c.folder}) stores neither {head_name} nor {embedding}")
            if loc.info.shape != base.tensors[embedding].info.shape and embedding not in TOKEN_EMBEDDINGS:
                raise IncompatibleModelsError(
                    f"{embedding} {list(base.tensors[embedding].info.shape)} is taken as the token embedding (it is "
                    f"the first --embedding name the base stores), but {who}'s output head is "
                    f"{list(loc.info.shape)}: --embedding must name the token embedding (one row per token)")
            if loc.info.shape != base.tensors[embedding].info.shape and not (
                    vocab_rows_vary and rows_differ(embedding, loc, base.tensors[embedding], embedding)):
                raise IncompatibleModelsError(
                    f"{who} ({c.folder}): its output head is {list(loc.info.shape)} but the base's embedding is "
                    f"{list(base.tensors[embedding].info.shape)}" + shape_hint(embedding, loc.info.shape,
                                                                              base.tensors[embedding].info.shape))
            sources.append(loc)
        return HeadPlan(head_name, mode, embedding, tuple(sources))
    if mode == "tied" and head_name in base.tensors:
        if embedding is None:
            raise IncompatibleModelsError(
                f"{base.folder}: config ties {head_name} to the embedding, but no known token embedding is stored"
            )
        if base.tensors[embedding].info.shape != base.tensors[head_name].info.shape:
            raise IncompatibleModelsError(f"{base.folder}: tied {head_name} and {embedding} have different shapes")
    return HeadPlan(head_name, mode, embedding)
